"""Exponential moving average of the trained weights (`[ema]`, dedistill): fp32 shadows of the trainable parameters,
`ema <- d ema + (1 - d) p` after every optimizer step; the EMA weights are what gets exported.

Sharding: the shadows are made from the parameters as they are after `distribute`, so under FSDP2 each is a DTensor
holding only this rank's shard and the update is local (no communication). They are saved and restored as DCP shards
with the rest of the training state (`dev2pro.train.sharded`, key prefix `ema.`) and the final model is exported from
those shards: no rank ever gathers the full EMA.
"""

from __future__ import annotations

import torch


class Ema:
    """EMA of the trainable parameters in fp32, on the parameters' device and with their sharding:
    `ema <- d ema + (1 - d) p`. `shadow` maps parameter names to the (sharded) EMA tensors."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items() if p.requires_grad}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        for n, v in self.shadow.items():
            v.lerp_(named_params[n].detach().float(), 1.0 - self.decay)
