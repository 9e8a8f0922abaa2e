"""Exponential moving average of the trained weights (`[ema]`, dedistill): fp32 shadows of the trainable parameters,
`ema <- d ema + (1 - d) p` after every optimizer step; the EMA weights are what gets exported.

Pitfall: under FSDP2 each rank keeps only its shard; `state()` gathers full tensors for the checkpoint (collective:
call on every rank) and `load` re-shards them on resume.
"""

from __future__ import annotations

import torch


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
