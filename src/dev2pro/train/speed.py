"""train-lora's speed and memory options, `[train]` keys on top of the shared `TrainConfig`, and where they are applied
to the model: `fp8_matmul` (fp8 tensor-core matmuls on an fp8 base, `dev2pro.flux.fp8_matmul`), `blocks_to_swap`
(N transformer blocks held on the CPU and streamed in, `dev2pro.train.block_swap`) and `compile` (regional
torch.compile of the repeated blocks, `dev2pro.train.compile_blocks`).

They are LoRA-only (the other recipes train the base weights, which block swap and fp8 storage do not cover), hence a
subclass of `TrainConfig` used by `TrainLoraConfig` only: the other recipes reject these keys as unknown.

Order matters (`prepare_model`): LoRA is added first (LoRA weights stay resident: block swap moves only the frozen
base tensors), then fp8 matmuls are switched on, then block swap places the model on the devices (the swapped
blocks' frozen weights stay in CPU memory), then the blocks are compiled (the swap hooks stay outside the compiled
regions).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dev2pro.errors import ConfigError
from dev2pro.train.config import TrainConfig


@dataclass(frozen=True)
class LoraTrainConfig(TrainConfig):
    """`[train]` of train-lora: as every recipe, plus `fp8_matmul`, `blocks_to_swap` and `compile` (module docstring).
    """

    fp8_matmul: bool = False
    blocks_to_swap: int = 0
    compile: bool = False

    def validate(self) -> None:
        super().validate()
        if self.blocks_to_swap < 0:
            raise ConfigError(f"train.blocks_to_swap must be >= 0, got {self.blocks_to_swap}")


def options(train: TrainConfig) -> LoraTrainConfig:
    """`train` as a `LoraTrainConfig` (a plain `TrainConfig` built in code gets the defaults: all options off)."""
    if isinstance(train, LoraTrainConfig):
        return train
    return LoraTrainConfig(**{f.name: getattr(train, f.name) for f in fields(TrainConfig)})


def load_device(train: TrainConfig, device: torch.device) -> torch.device:
    """Where the base is loaded: the CPU when blocks are swapped (the whole model never sits on the GPU at once;
    `prepare_model` places it), else the training device."""
    return torch.device("cpu") if options(train).blocks_to_swap else device


def prepare_model(model: torch.nn.Module, train: TrainConfig, device: torch.device, processes: int = 1):
    """Apply the options to a model that already carries its LoRA; returns the `BlockSwap` (or None). With
    `blocks_to_swap`, this call moves the model to `device` (all but the swapped blocks' frozen tensors)."""
    from dev2pro.flux.fp8 import enable_fp8_matmul

    train = options(train)
    if train.fp8_matmul and enable_fp8_matmul(model) == 0:
        raise ConfigError("train.fp8_matmul = true needs an fp8 base (model.dtype = 'fp8', or an fp8 file with "
                          "model.dtype = 'auto')")
    swap = None
    if train.blocks_to_swap:
        if processes > 1:
            raise ConfigError("train.blocks_to_swap works with one process only (several GPUs: use "
                              "distributed.strategy = 'fsdp2' to shard the base instead)")
        from dev2pro.train.block_swap import BlockSwap

        swap = BlockSwap(model, train.blocks_to_swap, device)
    if train.compile:
        from dev2pro.train.compile_blocks import compile_blocks

        compile_blocks(model)
    return swap
