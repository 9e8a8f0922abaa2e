"""Shared training components: config sections, accelerator setup, optimizer and LR schedule, the flow-matching batch,
logging, checkpoints with exact resume. The recipes (`dev2pro.train.recipes.*`)
are linear files built from these pieces;
nothing here owns a training loop or calls back into a recipe.

Reproducibility and multi-process equality (the design choices that matter):

- Every random draw of the objective (noise, timesteps, caption dropout, distillation scales) comes from ONE CPU
  `torch.Generator` seeded with `train.seed`, identical on every rank. Each step draws the tensors for the *global*
  batch (per-rank batch x world size) and each rank keeps its own slice (`global_draw`). So 2 processes with batch b
  see exactly the noise and times 1 process with batch 2b sees; and the generator state is one tensor to checkpoint.
- The LR schedule is a pure function of the step (`lr_factor`), applied to the optimizer each step: no scheduler state
  can drift on resume.
- Checkpoints hold the *full* (unsharded) trainable weights and optimizer state keyed by parameter name (through
  `torch.distributed.checkpoint.state_dict`, which also gathers FSDP2 shards), so a checkpoint written by N processes
  resumes in M. Everything is safetensors or JSON; no pickle anywhere.
- A checkpoint folder is written under a temporary name and renamed when complete, so `checkpoint-<step>` folders are
  always whole; a full disk leaves the previous one intact and stops with one line.

Pitfalls: DDP/FSDP wrappers hide `model.config`; call `forward_flux` with the guidance flag taken from the unwrapped
model. Python's and numpy's RNG states are saved too (LoRA dropout and peft use torch's global RNG).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dev2pro.errors import ConfigError, UserError
from dev2pro.flux import flow

# ---------------------------------------------------------------------------------------------------------------------
# Config sections shared by the recipes (one TOML table each).


@dataclass(frozen=True)
class ModelConfig:
    """`[model]`: what to train and the encoders used to build the caches.

    `base`: anything `dev2pro.flux.checkpoint.load_transformer` accepts (BFL/ComfyUI file, diffusers folder, fp8 file,
    `preset:NAME[@seed]`). `t5`, `clip`, `autoencoder`: paths, hub ids or "toy". `adapter`: a LoRA merged into the base
    for training only (train-lora). `dtype`: storage of the frozen weights ("auto" = as in the file, "fp8" =
    block linears quantized on load, see `load_model`); the compute dtype is decided in one place,
    `train.mixed_precision`.
    """

    base: str
    t5: str = "toy"
    clip: str = "toy"
    autoencoder: str = "toy"
    adapter: str | None = None
    adapter_strength: float = 1.0
    dtype: Literal["auto", "fp32", "bf16", "fp8"] = "auto"


@dataclass(frozen=True)
class TrainConfig:
    """`[train]`: the optimisation. `batch_size` is per process; the global batch is batch_size x processes."""

    steps: int
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    timestep_sampling: Literal["uniform", "logit_normal", "shift", "flux_shift"] = "logit_normal"
    logit_mean: float = 0.0
    logit_scale: float = 1.0
    shift: float = 3.1582
    loss_weighting: Literal["none", "cosmap"] = "none"
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, got {list(self.betas)}")


@dataclass(frozen=True)
class LoraConfig:
    """`[lora]`: adapter shape. `targets`: `attention` (q/k/v/out and their text twins) or `all-linear` (kohya)."""

    rank: int = 16
    alpha: float = 16.0
    targets: Literal["attention", "all-linear"] = "attention"
    dropout: float = 0.0

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class OutputConfig:
    """`[output]` of full-model recipes: final BFL single file `<dir>/<name>.safetensors` in `dtype` (fp8 with
    `scaling`); checkpoints `checkpoint-<step>` every `save_every` steps (0 = only at the end), the last `keep_last`
    kept."""

    dir: str
    name: str = "model"
    save_every: int = 0
    keep_last: int = 2
    dtype: Literal["bf16", "fp32", "fp8_e4m3fn"] = "bf16"
    scaling: Literal["none", "tensor", "channel"] = "none"

    def validate(self) -> None:
        _check_output(self)


@dataclass(frozen=True)
class LoraOutputConfig:
    """`[output]` of train-lora: final LoRA `<dir>/<name>.safetensors` in `format` (kohya for ComfyUI/Forge,
    diffusers for diffusers/peft)."""

    dir: str
    name: str = "lora"
    format: Literal["kohya", "diffusers"] = "kohya"
    save_every: int = 0
    keep_last: int = 2

    def validate(self) -> None:
        _check_output(self)


def _check_output(o) -> None:
    if not o.dir:
        raise ConfigError("output.dir is empty: set it to the folder for checkpoints and the result")
    if o.save_every < 0 or o.keep_last < 1:
        raise ConfigError("output.save_every must be >= 0 and output.keep_last >= 1")
    if not re.fullmatch(r"[\w.\-]+", o.name):
        raise ConfigError(f"output.name '{o.name}' must be a plain file name (letters, digits, _ . -)")


@dataclass(frozen=True)
class SampleConfig:
    """`[sample]`: images every `every` steps (0 = never) from `prompts` x `seeds`. `guidance` feeds the guidance
    embedding of models that have one (unset: 3.5 without CFG, 1.0 with CFG, as `dev2pro.flux.sampling`); `cfg` != 1
    runs true CFG with `negative`."""

    every: int = 0
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    guidance: float | None = None
    cfg: float = 1.0
    negative: str = ""
    width: int = 512
    height: int = 512


@dataclass(frozen=True)
class MonitorConfig:
    """`[monitor]`: guidance-health probe every `every` steps (0 = off) on `probe_size` fixed inputs."""

    every: int = 0
    probe_size: int = 4
    seed: int = 1234
    t_values: tuple[float, ...] = (0.3, 0.6, 0.9)
    response_low: float = 1.0
    response_high: float = 4.0
    drift_guidances: tuple[float, ...] = (1.0, 3.5)


@dataclass(frozen=True)
class EmaConfig:
    """`[ema]`: exponential moving average of the trained weights (dedistill). The EMA weights are what is exported."""

    enabled: bool = False
    decay: float = 0.999


@dataclass(frozen=True)
class DistributedConfig:
    """`[distributed]`: how several processes share the work (ignored with one process). `ddp` replicates the model;
    `fsdp2` shards parameters, gradients and optimizer state (accelerate's FSDP plugin, fsdp_version=2)."""

    strategy: Literal["ddp", "fsdp2"] = "ddp"


# ---------------------------------------------------------------------------------------------------------------------
# Devices, accelerator, dtypes


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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


FSDP_UNITS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")  # one FSDP2 unit per transformer block


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
    if accelerator.num_processes == 1:
        return accelerator.prepare_model(model)
    if dist.strategy == "ddp":
        return accelerator.prepare_model(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if train.mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in model.modules():
        if type(module).__name__ in FSDP_UNITS:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def accumulation_context(accelerator, model, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-step of an accumulated step (a pure speed-up: the
    reduced gradient is the same). FSDP2 and single processes need nothing."""
    ddp = accelerator.num_processes > 1 and not is_fsdp(model)
    return accelerator.no_sync(model) if ddp and not last_micro_step else contextlib.nullcontext()


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


def save_model(model: torch.nn.Module, path: Path, output: OutputConfig) -> Path:
    """The final full model as a BFL single file in `output.dtype` (fp8 with `output.scaling`)."""
    from dev2pro.flux.checkpoint import save_transformer

    fp8 = output.dtype.startswith("fp8")
    save_transformer(model, path, format="bfl", dtype=OUTPUT_DTYPES[output.dtype],
                     scaling=output.scaling if fp8 else None)
    return path


def full_model(accelerator, model) -> torch.nn.Module | None:
    """The trained model as a plain module for export: the unwrapped module itself for one process or DDP;
    under FSDP2 the full weights are gathered into a fresh CPU module on the main process (None elsewhere).
    Collective: call on every rank."""
    if not is_fsdp(model):
        return unwrap(model) if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dev2pro.flux.models import FluxSpec, build_transformer

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    plain = build_transformer(FluxSpec.from_diffusers_config(dict(unwrap(model).config)), device="meta")
    plain.load_state_dict(sd, assign=True)
    return plain


def global_draw(accelerator, per_rank: int) -> tuple[int, slice]:
    """(global batch size, this rank's slice) for tensors drawn once for the whole global batch."""
    world, rank = accelerator.num_processes, accelerator.process_index
    return per_rank * world, slice(rank * per_rank, (rank + 1) * per_rank)


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and LR schedule


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of `train.lr` at optimizer step `step` (0-based): linear warmup over `warmup_steps`, then constant
    or cosine down to `min_lr_ratio` at `steps`."""
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                             weight_decay=train.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, train: TrainConfig) -> float:
    lr = train.lr * lr_factor(step, train)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def grad_norm_and_clip(accelerator, model, max_norm: float) -> float:
    """Total gradient norm before clipping (equal on all ranks; FSDP2 shards are reduced); clip if max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class NonFiniteLoss(UserError):
    """The loss or the gradient norm became NaN/inf."""


def check_finite(value: float, what: str, step: int, out_dir: Path | None) -> None:
    if math.isfinite(value):
        return
    last = latest_checkpoint(out_dir) if out_dir is not None else None
    where = f"; last good checkpoint: {last}" if last else "; no checkpoint was written yet"
    raise NonFiniteLoss(f"{what} became {value} at step {step} (lower train.lr, raise train.warmup_steps or use "
                        f"train.mixed_precision = 'no'){where}")


def finish_step(accelerator, model, optimizer, per_sample: torch.Tensor, t: torch.Tensor, *, step: int, lr: float,
                train: TrainConfig, out_dir: Path, bar, log, extra: dict[str, float] | None = None) -> float:
    """The end of every training step, the same in every recipe: check the (gathered) loss, clip and check the
    gradient norm, step and zero the optimizer, advance the progress bar and log. Returns the step's mean loss."""
    loss = float(per_sample.mean())
    check_finite(loss, "loss", step + 1, out_dir)
    gn = grad_norm_and_clip(accelerator, model, train.max_grad_norm)
    check_finite(gn, "gradient norm", step + 1, out_dir)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    done = step + 1
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    if done % train.log_every == 0 or done == train.steps:
        log.log(done, {"loss": loss, **(extra or {}), "lr": lr, "grad_norm": gn, **bucket_losses(per_sample, t)})
    return loss


def due(every: int, done: int, total: int) -> bool:
    """Whether a periodic action (samples) runs after step `done`: every `every` steps and at the end; 0 = never."""
    return every > 0 and (done % every == 0 or done == total)


def save_final_model(accelerator, model, out_dir: Path, output: OutputConfig, config_toml: str) -> Path:
    """Write the trained full model (`<name>.safetensors`, BFL) and its resolved config from the main process."""
    final = out_dir / f"{output.name}.safetensors"
    plain = full_model(accelerator, model)
    if plain is not None:
        save_model(plain, final, output)
        (out_dir / f"{output.name}.toml").write_text(config_toml)
    return final


# ---------------------------------------------------------------------------------------------------------------------
# The flow-matching batch


def unwrap(model):
    """The module under DDP (`.module`); FSDP2 and plain modules are returned as they are."""
    return getattr(model, "module", model)


def forward_flux(model, has_guidance: bool, x, t, txt, pooled, img_ids, txt_ids, guidance=None):
    """`models.predict` for wrapped models (DDP hides `.config`): velocity for packed tokens `x` at times `t`."""
    g = None
    if has_guidance:
        if guidance is None:
            raise ValueError("this model has a guidance embedding: pass a guidance value")
        g = guidance.to(x.device, torch.float32) if torch.is_tensor(guidance) and guidance.ndim == 1 else (
            torch.full((x.shape[0],), float(guidance), device=x.device, dtype=torch.float32))
    return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0]


@dataclass
class FlowBatch:
    """One rank's slice of a training batch, ready for the transformer: packed `x_t`, times `t`, target `v`."""

    x0: torch.Tensor  # packed clean latents (b, n, 64)
    noise: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    txt: torch.Tensor
    pooled: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor


def sample_t(train: TrainConfig, n: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    return flow.sample_timesteps(n, train.timestep_sampling, mean=train.logit_mean, scale=train.logit_scale,
                                 shift=train.shift, seq_len=seq_len, generator=generator).float()


def flow_batch(latents: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor, train: TrainConfig,
               generator: torch.Generator, accelerator, device, dtype=torch.float32) -> FlowBatch:
    """Pack latents (b, c, h, w), draw noise and times for the global batch from `generator` and keep this rank's
    slice, build x_t and v = eps - x0 (flow.py's convention)."""
    from dev2pro.flux.models import image_ids, pack_latents, text_ids

    b, _, h, w = latents.shape
    x0 = pack_latents(latents.float())
    n_global, mine = global_draw(accelerator, b)
    noise = torch.randn((n_global, *x0.shape[1:]), generator=generator)[mine]
    t = sample_t(train, n_global, x0.shape[1], generator)[mine]
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    return FlowBatch(
        x0=x0, noise=noise, x_t=flow.interpolate(x0, noise, t).to(dtype), t=t,
        target=flow.velocity_target(x0, noise), txt=txt.to(device, dtype), pooled=pooled.to(device, dtype),
        img_ids=image_ids(h, w, device=device), txt_ids=text_ids(txt.shape[1], device=device),
    )


def bucket_losses(per_sample: torch.Tensor, t: torch.Tensor, n_buckets: int = 4) -> dict[str, float]:
    """Mean loss per t-bucket (`loss/t0` = t in [0, 0.25), ...), only buckets present in the batch."""
    idx = flow.t_bucket(t.detach().float(), n_buckets)
    out = {}
    for k in range(n_buckets):
        sel = idx == k
        if bool(sel.any()):
            out[f"loss/t{k}"] = float(per_sample.detach()[sel].float().mean())
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Data


class InMemoryDataset:
    """Cached items held in memory (dicts with `latents` (c, h, w), `txt` (L, D), `pooled` (P,)): what tests and the
    toy world train on without writing a cache folder. Same interface as `dev2pro.data.cache.CachedDataset`."""

    def __init__(self, latents: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor, captions=None):
        if not (latents.shape[0] == txt.shape[0] == pooled.shape[0]):
            raise ValueError(f"item counts differ: latents {latents.shape[0]}, txt {txt.shape[0]}, "
                             f"pooled {pooled.shape[0]}")
        self.latents, self.txt, self.pooled = latents.float(), txt.float(), pooled.float()
        self.captions = list(captions) if captions is not None else [""] * latents.shape[0]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "txt": self.txt[i], "pooled": self.pooled[i], "caption": self.captions[i],
                "key": str(i)}

    def buckets(self) -> list[tuple[int, int]]:
        return [tuple(self.latents.shape[-2:])] * len(self)


@dataclass
class TrainData:
    """What a recipe trains on: a dataset of cached items (dicts with `latents` (c, h, w), `txt` (L, D), `pooled`
    (P,)), the prompt embeddings encoded once before the encoders were freed (`prompts[text] = (txt (L, D), pooled
    (P,))`; must hold the empty prompt ""), optionally the autoencoder (to decode samples). `bind` makes the
    rank-aware bucket batch sampler once the process layout is known."""

    dataset: Any = None
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    autoencoder: Any = None  # kept only when samples are decoded during training
    info: dict[str, Any] = field(default_factory=dict)
    shuffle: bool = True
    sampler: Any = None
    collate: Any = None
    shards: Path | None = None  # a `dev2pro cache` shard folder, streamed rank by rank instead of `dataset`
    probe_batch: dict | None = None  # a few items of one bucket for the monitor when there is no `dataset`

    def bind(self, accelerator, batch_size: int, seed: int) -> TrainData:
        """Make this process's batch source: a `BucketBatchSampler` over `dataset` (global batches split by rank),
        or a `ShardStream` over `shards` (whole shards per rank)."""
        from dev2pro.data.cache import BucketBatchSampler, collate

        if "" not in self.prompts:
            raise ValueError("TrainData.prompts must hold the empty prompt '' (the unconditional embedding)")
        if self.shards is not None:
            from dev2pro.data.shards import ShardStream

            self.sampler = ShardStream(self.shards, rank=accelerator.process_index,
                                       world_size=accelerator.num_processes, seed=seed, batch_size=batch_size,
                                       shuffle=self.shuffle)
            return self
        self.sampler = BucketBatchSampler(self.dataset, batch_size=batch_size, seed=seed,
                                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                                          shuffle=self.shuffle)
        self.collate = self.collate or collate
        self.info.setdefault("dataset_size", len(self.dataset))
        return self


def encode_prompts(text_encoder, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Embeddings of `prompts` plus the empty prompt, as `TrainData.prompts` wants them."""
    want = list(dict.fromkeys(["", *prompts]))
    with torch.no_grad():
        txt, pooled = text_encoder.encode(want)
    return {p: (txt[i].float().cpu(), pooled[i].float().cpu()) for i, p in enumerate(want)}


def batch_tensors(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (b, c, h, w), txt (b, L, D), pooled (b, P)) of a batch collated by `dev2pro.data.cache.collate`."""
    try:
        return batch["latents"], batch["txt"], batch["pooled"]
    except KeyError as e:
        raise KeyError(f"a collated batch needs 'latents', 'txt' and 'pooled'; it has {sorted(batch)}") from e

def flow_micro_steps(accelerator, model, batches: Iterator[dict], train: TrainConfig, generator: torch.Generator, *,
                     has_guidance: bool, guidance, condition=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of the plain flow-matching objective over `train.grad_accum` micro-batches: draw noise and
    times, predict, per-sample loss, backward. `condition(fb) -> (txt, pooled)` swaps the text conditioning (caption
    dropout in train-base). Returns the per-sample losses and times gathered over processes (for logging)."""
    per_all, t_all = [], []
    for micro in range(train.grad_accum):
        latents, txt, pooled = batch_tensors(next(batches))
        fb = flow_batch(latents, txt, pooled, train, generator, accelerator, accelerator.device)
        c_txt, c_pooled = condition(fb) if condition is not None else (fb.txt, fb.pooled)
        with accumulation_context(accelerator, model, micro == train.grad_accum - 1), accelerator.autocast():
            pred = forward_flux(model, has_guidance, fb.x_t, fb.t, c_txt, c_pooled, fb.img_ids, fb.txt_ids, guidance)
            per = flow.flow_loss(pred, fb.target, flow.loss_weight(fb.t, train.loss_weighting))
            accelerator.backward(per.mean() / train.grad_accum)
        per_all.append(per.detach())
        t_all.append(fb.t)
    return accelerator.gather(torch.cat(per_all)), accelerator.gather(torch.cat(t_all))



def infinite_batches(data: TrainData) -> Iterator[dict]:
    """Collated batches forever, epoch after epoch. The sampler owns the order and position (its state_dict is
    saved in checkpoints); starting a new epoch is its job when iterated again. A shard stream is endless itself."""
    if data.shards is not None:
        yield from data.sampler
        return
    while True:
        empty = True
        for indices in data.sampler:
            empty = False
            yield data.collate([data.dataset[i] for i in indices])
        if empty:
            raise UserError("the dataset yields no batch (fewer items than train.batch_size x processes?)")


def load_train_data(data_cfg, model_cfg: ModelConfig, accelerator, prompts: list[str],
                    keep_autoencoder: bool = False) -> TrainData:
    """Scan `data.dir`, build or reuse the latent/text caches with the encoders of `[model]` (main process first, the
    others then find everything cached), encode `prompts` plus the empty prompt once and free the encoders. Training
    never holds the text encoders; with `keep_autoencoder` (sample images during training) the autoencoder is kept
    on the CPU in float32 for decoding (the real Flux VAE decodes a 512px image in a few seconds there; the toy one
    is free). Call `.bind(...)` on the result for the batch sampler."""
    from dev2pro.data import cache as cache_mod
    from dev2pro.data.folders import scan_dataset
    from dev2pro.flux.autoencoder import load_autoencoder
    from dev2pro.flux.encoders import free
    from dev2pro.flux.text_encoders import load_text_encoder

    device = accelerator.device
    enc_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if (Path(data_cfg.dir) / "dataset.json").is_file():
        return _load_shards(data_cfg, model_cfg, device, enc_dtype, prompts, keep_autoencoder)
    with accelerator.main_process_first():
        autoencoder = load_autoencoder(model_cfg.autoencoder, device=device, dtype=enc_dtype)
        index = scan_dataset(data_cfg, 2 * autoencoder.downsample)
        text_encoder = load_text_encoder(model_cfg.t5, model_cfg.clip, device=device, dtype=enc_dtype)
        dataset = cache_mod.prepare_cache(index, autoencoder, text_encoder, device=device, dtype=enc_dtype,
                                          progress=accelerator.is_main_process)
    embeddings = encode_prompts(text_encoder, prompts)
    free(text_encoder)
    if keep_autoencoder:
        if hasattr(autoencoder, "vae"):
            autoencoder.vae.to("cpu", torch.float32)
    else:
        free(autoencoder)
        autoencoder = None
    return TrainData(dataset=dataset, prompts=embeddings, autoencoder=autoencoder, shuffle=data_cfg.shuffle,
                     info={"dataset_size": len(dataset), "images": len(index.items),
                           "resolution": data_cfg.resolution})


def _load_shards(data_cfg, model_cfg: ModelConfig, device, enc_dtype, prompts: list[str],
                 keep_autoencoder: bool) -> TrainData:
    """`data.dir` is a shard folder written by `dev2pro cache`: stream it; only the text encoder is loaded (for the
    prompt embeddings, checked against the encoder that made the shards) and the autoencoder if samples are decoded."""
    from dev2pro.data.shards import ShardStream, read_info
    from dev2pro.errors import DataError
    from dev2pro.flux.autoencoder import load_autoencoder
    from dev2pro.flux.encoders import free
    from dev2pro.flux.text_encoders import load_text_encoder

    info = read_info(data_cfg.dir)
    text_encoder = load_text_encoder(model_cfg.t5, model_cfg.clip, device=device, dtype=enc_dtype)
    if text_encoder.identity != info["text"]:
        raise DataError(f"{data_cfg.dir}: the shards were encoded with text encoder {info['text']}, [model] t5/clip "
                        f"give {text_encoder.identity}: use the same encoders or rebuild the shards")
    embeddings = encode_prompts(text_encoder, prompts)
    free(text_encoder)
    autoencoder = None
    if keep_autoencoder:
        autoencoder = load_autoencoder(model_cfg.autoencoder, device="cpu", dtype=torch.float32)
    first = min(info["shards"], key=lambda sh: -sh["count"])
    probe = next(iter(ShardStream(data_cfg.dir, seed=0, batch_size=min(8, first["count"]), shuffle=False)))
    return TrainData(prompts=embeddings, autoencoder=autoencoder, shuffle=data_cfg.shuffle, shards=Path(data_cfg.dir),
                     probe_batch=probe, info={"dataset_size": info["items"], "resolution": info["resolution"]})


def get_train_data(data: TrainData | None, data_cfg, model_cfg: ModelConfig, accelerator, train: TrainConfig,
                   sample: SampleConfig) -> TrainData:
    """The injected `data`, or the `[data]` folder cached with `[model]`'s encoders; bound to this process layout."""
    if data is None:
        if data_cfg is None:
            raise ConfigError("missing [data] table (data.dir = folder of images with .txt captions)")
        prompts = [*sample.prompts, sample.negative] if sample.every > 0 else []
        data = load_train_data(data_cfg, model_cfg, accelerator, prompts, keep_autoencoder=sample.every > 0)
    return data.bind(accelerator, train.batch_size, train.seed)


def write_samples(accelerator, model, data: TrainData, sample: SampleConfig, out_dir: Path, step: int) -> Path | None:
    """A grid of `sample.prompts` x `sample.seeds` (one row per prompt) from the model as it is now, written to
    `<out_dir>/samples/step-<step>.png`. Prompt embeddings come from `data.prompts` (encoded once before the text
    encoders were freed), images are decoded with `data.autoencoder`. Under FSDP2 every rank takes part in the
    forward passes; otherwise only the main process samples."""
    from dev2pro.flux.sampling import generate, save_grid

    if not sample.prompts:
        return None
    fsdp = is_fsdp(model)
    if not (fsdp or accelerator.is_main_process):
        accelerator.wait_for_everyone()
        return None
    net = model if fsdp else unwrap(model)
    with accelerator.autocast():
        images = generate(net, data.autoencoder, data.prompts, list(sample.prompts), negative=sample.negative,
                          height=sample.height, width=sample.width, steps=sample.steps, guidance=sample.guidance,
                          cfg=sample.cfg, seeds=list(sample.seeds), progress=False)
    path = out_dir / "samples" / f"step-{step:06d}.png"
    if accelerator.is_main_process:
        save_grid(images, path, ncols=len(sample.seeds))
    accelerator.wait_for_everyone()
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Output folder, logs


def prepare_output_dir(path: str | Path) -> Path:
    """Create `output.dir` and check it is writable: one line at start instead of a crash at the first save."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir '{out}' is not writable ({e.strerror or e}); choose another output.dir") from None
    return out


class RunLog:
    """Scalars to TensorBoard (`<dir>/tb`) and to a CSV (`<dir>/<name>.csv`), main process only. Rows are appended
    (the file is rewritten only when a new column appears, e.g. the first time a t bucket is seen, so long runs stay
    cheap); missing values are empty cells. On resume, rows after the resumed step are dropped so the CSV is one
    consistent history."""

    def __init__(self, out_dir: Path, enabled: bool, name: str = "log", resume_step: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = out_dir / f"{name}.csv"
        self.writer = None
        self._rows: list[dict] = []
        self._keys: list[str] = ["step"]
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self._keys = list(reader.fieldnames or ["step"])
                self._rows = [r for r in reader if int(float(r["step"])) <= resume_step]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step)
            except ImportError:  # tensorboard is a dependency; keep training if an install lacks it
                self.writer = None
        self._rewrite()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        row = {"step": step, **scalars}
        self._rows.append(row)
        new = [k for k in row if k not in self._keys]
        if new:
            self._keys += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._keys, restval="").writerow(row)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._keys, restval="")
            w.writeheader()
            w.writerows(self._rows)
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

def open_run_logs(out_dir: Path, accelerator, resume_step: int | None, monitor: bool) -> tuple[RunLog, RunLog | None]:
    """The run's `log.csv` (+ TensorBoard) and, when the guidance monitor is on, `monitor.csv`."""
    log = RunLog(out_dir, accelerator.is_main_process, resume_step=resume_step)
    mon = RunLog(out_dir, accelerator.is_main_process, name="monitor", resume_step=resume_step,
                 tensorboard=False) if monitor else None
    return log, mon


def end_run(accelerator, log: RunLog) -> None:
    """Wait for every process, flush the logs, release accelerate's process-wide state."""
    accelerator.wait_for_everyone()
    log.close()
    accelerator.end_training()



def progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: folders `checkpoint-<step>` written atomically, full (unsharded) state, safetensors + JSON.

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path | None) -> Path | None:
    found = list_checkpoints(out_dir) if out_dir is not None else []
    return found[-1][1] if found else None


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def gather_train_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Full trainable weights and optimizer state keyed by parameter name (collective under FSDP2: call on every
    rank; rank 0 receives the tensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_sd_options())
    return msd, osd


def _flatten_optim(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, st in osd.get("state", {}).items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}::{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{name}::{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state(generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict]:
    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if generator is not None:
        tensors["generator"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, pstate, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(pstate), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generator: torch.Generator | None) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch"])
    if generator is not None and "generator" in tensors:
        generator.set_state(tensors["generator"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states and len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pstate, gauss = meta["python"]
    random.setstate((version, tuple(pstate), gauss))


def save_checkpoint(out_dir: Path, step: int, accelerator, model, optimizer, *, generator: torch.Generator,
                    sampler=None, config_toml: str = "", extra_tensors: dict[str, torch.Tensor] | None = None,
                    extra_state: dict | None = None, keep_last: int = 2) -> Path:
    """Write `out_dir/checkpoint-<step>` atomically (temp folder, then rename) and delete all but the last
    `keep_last`. Holds trainable weights, optimizer state, RNG states (torch/numpy/python/generator, per rank),
    sampler state, step, the resolved config and recipe extras (e.g. EMA weights). Collective: call on every rank.
    A full disk (OSError) leaves earlier checkpoints intact and raises one line."""
    from safetensors.torch import save_file

    msd, osd = gather_train_state(model, optimizer)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    rank = accelerator.process_index
    try:
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rng_t, rng_meta = rng_state(generator)
        save_file(rng_t, str(tmp / f"rng-{rank}.safetensors"))
        (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_meta))
        (tmp / f"sampler-{rank}.json").write_text(json.dumps(sampler.state_dict() if sampler is not None else None))
        if accelerator.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in msd.items()}, str(tmp / "trainable.safetensors"))
            opt_t, opt_meta = _flatten_optim(osd)
            save_file(opt_t, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
            if extra_tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()},
                          str(tmp / "extra.safetensors"))
            (tmp / "config.toml").write_text(config_toml)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "world_size": accelerator.num_processes, "time": time.time(),
                     "distributed": ("fsdp2" if is_fsdp(model) else "ddp") if accelerator.num_processes > 1 else "none",
                     **(extra_state or {})}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(out_dir)
        raise UserError(f"could not write checkpoint {final} ({e.strerror or e}); "
                        f"{'previous ' + prev.name + ' is intact' if prev else 'no earlier checkpoint'}; "
                        "free disk space and resume with --resume") from None
    return final


@dataclass
class Resumed:
    step: int
    path: Path
    extra_tensors: dict[str, torch.Tensor]
    state: dict


def load_checkpoint(path: Path, accelerator, model, optimizer, *, generator: torch.Generator,
                    sampler=None) -> Resumed:
    """Restore what `save_checkpoint` wrote into a freshly set-up model/optimizer (any number of processes). RNG
    states are restored for this rank when the checkpoint has them; a rank that did not exist when it was written
    gets rank 0's generator state (the objective's draws are global, see the module docstring)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = json.loads((path / STATE_FILE).read_text())
    msd = load_file(str(path / "trainable.safetensors"))
    osd = _unflatten_optim(load_file(str(path / "optimizer.safetensors")),
                           json.loads((path / "optimizer.json").read_text()))
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_sd_options(strict=False))
    rank = accelerator.process_index
    rank_file = path / f"rng-{rank}.safetensors"
    if not rank_file.exists():
        rank, rank_file = 0, path / "rng-0.safetensors"
    set_rng_state(load_file(str(rank_file)), json.loads((path / f"rng-{rank}.json").read_text()), generator)
    if sampler is not None:
        sampler_state = json.loads((path / f"sampler-{rank}.json").read_text())
        if sampler_state is not None:
            sampler.load_state_dict(sampler_state)
    extra = path / "extra.safetensors"
    return Resumed(step=int(state["step"]), path=path, state=state,
                   extra_tensors=load_file(str(extra)) if extra.exists() else {})


def find_resume(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (`--resume`), or None for a fresh run. `--resume` with no complete checkpoint
    yet (a run stopped before its first save) starts from step 0 with a note; a fresh run into a folder that already
    holds checkpoints is refused so two runs never interleave."""
    import sys

    latest = latest_checkpoint(out_dir)
    if resume:
        if latest is None:
            print(f"--resume: no complete checkpoint-<step> folder in {out_dir}: starting from step 0",
                  file=sys.stderr)
        return latest
    if latest is not None:
        raise UserError(f"{out_dir} already holds {latest.name}; pass --resume to continue it or choose a new "
                        "output.dir")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# EMA


class Ema:
    """EMA of the trainable parameters in fp32, on the parameters' device and with their sharding (under FSDP2 each
    rank keeps its shard): `ema <- d ema + (1 - d) p`. `state()` gathers full tensors (collective under FSDP2)."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items() if p.requires_grad}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        for n, v in self.shadow.items():
            v.lerp_(named_params[n].detach().float(), 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ema::{n}": (v.full_tensor() if hasattr(v, "full_tensor") else v) for n, v in self.shadow.items()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, v in self.shadow.items():
            full = tensors[f"ema::{n}"].to(v.device if not hasattr(v, "device_mesh") else "cpu")
            if hasattr(v, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(v.to_local().device), v.device_mesh, v.placements)
            v.copy_(full)

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, torch.Tensor]) -> None:
        """Write the EMA weights into the model (before export)."""
        for n, v in self.shadow.items():
            named_params[n].copy_(v.to(named_params[n].dtype))
