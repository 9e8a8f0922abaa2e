"""FSDP2 for the full fine-tunes: the device mesh (flat, or 2-D for HSDP), `fully_shard` on every transformer block and
the root, the memory-efficient start, and gradient sync over accumulated micro-steps.

Memory-efficient start (`load_for_training`): the model is built on `meta` (nothing allocated), sharded, materialised
empty (`to_empty`: each rank allocates only its shards), then the checkpoint is streamed one tensor group at a time
(`dev2pro.flux.checkpoint.weight_stream`: a fused BFL linear is one group) and each rank copies in only its slice of
each tensor (`compute_local_shape_and_global_offset`, the same slicing FSDP2 uses). Host and device memory per process
is then ~1/N of the model plus one tensor group, instead of the whole model on every rank. With one process or DDP the
same stream fills a full model (no second copy either).

HSDP (`[distributed] replicate = K`): a 2-D mesh (replicate K) x (shard N/K); parameters are sharded inside a group
(one node) and replicated across groups (nodes): gradients are reduce-scattered in the group, then all-reduced across
groups. Gradient sync over micro-steps (`dev2pro.train.distributed.accumulation_context`): on non-final micro-steps
the cross-replica all-reduce is skipped (no memory cost); the in-group reduce-scatter is skipped too with
`defer_reduce_scatter = true`, at the price of holding unsharded gradients between micro-steps (a full fp32 gradient
per rank: 48 GB for 12B, so off by default).

Pitfall: FSDP2 all-gathers parameters in `param_dtype`; an fp8 weight would be gathered as-is and its scale would
not follow, so fp8 models are refused under FSDP2 (`check_fsdp_dtypes`); keep a frozen fp8 model unsharded.
"""

from __future__ import annotations

import torch

from dev2pro.errors import CheckpointError, ConfigError
from dev2pro.train.config import DistributedConfig, TrainConfig

FSDP_UNITS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")  # one FSDP2 unit per transformer block
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def uses_fsdp(accelerator, dist: DistributedConfig) -> bool:
    return accelerator.num_processes > 1 and dist.strategy == "fsdp2"


def device_mesh(accelerator, dist: DistributedConfig):
    """A 1-D mesh over all processes, or (replicate, shard) for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    world, kind = accelerator.num_processes, accelerator.device.type
    if dist.replicate > 1:
        if world % dist.replicate:
            raise ConfigError(f"distributed.replicate = {dist.replicate} does not divide the {world} processes: use "
                              "the number of nodes (each node then holds one full shard group)")
        return init_device_mesh(kind, (dist.replicate, world // dist.replicate),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))


def check_fsdp_dtypes(model: torch.nn.Module) -> None:
    """Refuse fp8 weights under FSDP2 (see the module docstring)."""
    fp8 = [n for n, p in model.named_parameters() if p.dtype in FP8]
    if fp8:
        raise ConfigError(f"FSDP2 cannot shard fp8 weights ({fp8[0]} and {len(fp8) - 1} more): fp8 scales would not "
                          "follow the all-gather. Train in fp32/bf16 (model.dtype = 'auto'), or use "
                          "distributed.strategy = 'ddp' for a frozen fp8 base (train-lora)")


def shard(model: torch.nn.Module, accelerator, dist: DistributedConfig, train: TrainConfig) -> torch.nn.Module:
    """`fully_shard` every transformer block, then the root (works on a `meta` model). With bf16 mixed precision the
    gathered parameters are bf16 and gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_fsdp_dtypes(model)
    mesh = device_mesh(accelerator, dist)
    mp = MixedPrecisionPolicy()
    if train.mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in model.modules():
        if type(module).__name__ in FSDP_UNITS:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@torch.no_grad()
def fill(model: torch.nn.Module, stream, dtype: torch.dtype, name: str) -> None:
    """Copy each streamed full tensor's slice into this rank's (sharded or plain) parameter, cast to `dtype`."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    params = dict(model.named_parameters())
    left = set(params)
    for key, full in stream:
        p = params.get(key)
        if p is None:
            raise CheckpointError(f"{name}: unexpected tensor {key}")
        if tuple(full.shape) != tuple(p.shape):
            raise CheckpointError(f"{name}: {key} has shape {list(full.shape)}, the model expects {list(p.shape)}")
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
            piece = full
            for d, (o, s) in enumerate(zip(offset, shape)):
                piece = piece.narrow(d, o, s)
            p.to_local().copy_(piece.to(dtype))
        else:
            p.copy_(full.to(dtype))
        left.discard(key)
        del full
    if left:
        raise CheckpointError(f"{name}: missing tensors {', '.join(sorted(left)[:3])}"
                              + (f" (+{len(left) - 3} more)" if len(left) > 3 else ""))


def load_for_training(ref: str, accelerator, dist: DistributedConfig, train: TrainConfig, *,
                      dtype: torch.dtype = torch.float32, trainable: bool = True, spec=None, stream=None):
    """The model of `ref` ready to train (`trainable`) or to serve as a frozen teacher: built on meta, sharded under
    FSDP2 (each rank then reads only its slices, see the module docstring), else filled whole and, when trainable,
    wrapped by accelerate (DDP with several processes). `spec`/`stream` override what is read from `ref` (the distill
    student). Create the optimizer after this call."""
    from dev2pro.flux.checkpoint import weight_stream
    from dev2pro.flux.models import build_transformer

    if stream is None:
        spec, stream = weight_stream(ref)
    model = build_transformer(spec, device="meta")
    fsdp = uses_fsdp(accelerator, dist)
    if fsdp:
        shard(model, accelerator, dist, train)
    model.to_empty(device=accelerator.device)
    fill(model, stream, dtype, str(ref))
    model.requires_grad_(trainable).train(trainable)
    if trainable and not fsdp:
        return accelerator.prepare_model(model)
    return model
