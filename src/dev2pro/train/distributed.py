"""Devices and processes: the `accelerate.Accelerator` of a run, spreading the model over processes (DDP or FSDP2),
the per-rank slice of globally drawn tensors, gradient sync over micro-steps, and loading/saving a full model.

Multi-process equality: every random draw of the objective comes from ONE CPU generator identical on every rank; each
step draws the tensors for the *global* batch (per-rank batch x world size) and each rank keeps its own slice
(`global_draw`). So 2 processes with batch b see exactly the noise and times 1 process with batch 2b sees.

Pitfalls: DDP wraps the model (`.module`, see `unwrap`) and hides `model.config`; FSDP2 replaces the parameters by
sharded DTensors, so the optimizer is created after `distribute` (full fine-tunes load straight into the sharded
model: `dev2pro.train.fsdp.load_for_training`; they are exported from DCP shards: `dev2pro.train.sharded`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dev2pro.errors import ConfigError, UserError
from dev2pro.train.config import DistributedConfig, ModelConfig, OutputConfig, TrainConfig
from dev2pro.train.fsdp import shard

OUTPUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn}


def setup_accelerator(train: TrainConfig):
    """An `accelerate.Accelerator` for this run: process group (gloo on CPU, nccl on GPUs) when launched with several
    processes (`accelerate launch`, `torchrun`), device placement, bf16 autocast or none. The model is distributed
    afterwards by `distribute` (DDP through accelerate, or FSDP2)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = train.device == "cpu" or (train.device == "auto" and not torch.cuda.is_available())
    if train.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA GPU is visible (use train.device = 'cpu' or 'auto')")
    # accelerate keeps its settings in a process-wide singleton: a second recipe in the same Python process (the
    # demo, tests) with another mixed_precision would be refused. The run's settings are this call's, so reset them
    # (the process group, in PartialState, is kept).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    # Frozen base weights never get gradients; DDP's unused-parameter search would cost a graph walk per step.
    return Accelerator(cpu=cpu, mixed_precision=train.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def unwrap(model):
    """The module under DDP (`.module`); FSDP2 and plain modules are returned as they are."""
    return getattr(model, "module", model)


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def distribute(accelerator, model: torch.nn.Module, dist: DistributedConfig, train: TrainConfig) -> torch.nn.Module:
    """Spread the model over the processes (a no-op with one process). Create the optimizer AFTER this call (FSDP2
    replaces the parameters by sharded DTensors) and pass it through `accelerator.prepare_optimizer`.

    - `ddp`: `accelerator.prepare_model` (DistributedDataParallel; gradients all-reduced, averaged).
    - `fsdp2`: `torch.distributed.fsdp.fully_shard` on every transformer block, then on the root: parameters,
      gradients and optimizer state are sharded across ranks; each block is all-gathered for its forward and
      backward, gradients are reduce-scattered (averaged). With bf16 mixed precision the gathered parameters are bf16
      and gradients reduce in fp32 (`MixedPrecisionPolicy`). This is the engine accelerate's FSDP plugin
      (fsdp_version=2) calls; we call it directly because accelerate enables FSDP on GPUs only, and the same code
      path then runs (and is tested) on CPU with gloo."""
    if accelerator.num_processes == 1 or dist.strategy == "ddp":
        return accelerator.prepare_model(model)
    return shard(model, accelerator, dist, train)


def accumulation_context(accelerator, model, last_micro_step: bool, dist: DistributedConfig | None = None):
    """Gradient communication of one micro-step of an accumulated step: DDP skips its all-reduce on all but the last
    (`no_sync`); FSDP2 skips HSDP's cross-replica all-reduce and, with `distributed.defer_reduce_scatter`, the
    reduce-scatter too (`dev2pro.train.fsdp`). The accumulated gradient is the same either way (tested)."""
    if accelerator.num_processes == 1:
        return contextlib.nullcontext()
    if not is_fsdp(model):
        return accelerator.no_sync(model) if not last_micro_step else contextlib.nullcontext()
    model.set_requires_gradient_sync(last_micro_step or not (dist is not None and dist.defer_reduce_scatter))
    model.set_requires_all_reduce(last_micro_step)  # after the line above, which sets both
    return contextlib.nullcontext()


def global_draw(accelerator, per_rank: int) -> tuple[int, slice]:
    """(global batch size, this rank's slice) for tensors drawn once for the whole global batch."""
    world, rank = accelerator.num_processes, accelerator.process_index
    return per_rank * world, slice(rank * per_rank, (rank + 1) * per_rank)


def load_model(ref: str, dtype: str, device) -> torch.nn.Module:
    """`dev2pro.flux.checkpoint.load_transformer` with the config's dtype names: "auto" keeps the file's storage (an fp8
    file stays fp8), "fp32"/"bf16" load everything in that dtype, "fp8" loads in bf16 and stores the block linears
    in float8_e4m3fn with per-tensor scales (`dev2pro.flux.fp8`), e.g. to train on a bf16 dev file in fp8 memory."""
    from dev2pro.flux.checkpoint import load_transformer

    if dtype == "fp8":
        from dev2pro.flux.fp8 import swap_linears_to_fp8

        model = load_transformer(ref, dtype=torch.bfloat16, device="cpu")
        return swap_linears_to_fp8(model, scaling="tensor").to(device)
    torch_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return load_transformer(ref, dtype=torch_dtype, device=device)


def require_fp32_weights(model: ModelConfig) -> None:
    """Full fine-tunes keep fp32 master weights: refuse a `model.dtype` they would silently ignore."""
    if model.dtype not in ("auto", "fp32"):
        raise ConfigError(f"model.dtype = '{model.dtype}': a full fine-tune keeps fp32 master weights; use "
                          "train.mixed_precision = 'bf16' for bf16 compute")


def save_model(model: torch.nn.Module, path: Path, output: OutputConfig, metadata: dict | None = None) -> Path:
    """The final full model as a BFL single file in `output.dtype` (fp8 with `output.scaling`), with `metadata`
    (e.g. `dev2pro.base_kind`, which tells samplers how to guide it)."""
    from dev2pro.flux.checkpoint import save_transformer

    fp8 = output.dtype.startswith("fp8")
    save_transformer(model, path, format="bfl", dtype=OUTPUT_DTYPES[output.dtype],
                     scaling=output.scaling if fp8 else None, metadata=metadata)
    return path
