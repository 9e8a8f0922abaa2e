"""Optimizer, learning-rate schedule and the end of every training step: AdamW over the trainable parameters, the LR
as a pure function of the step (`lr_factor`, set on the optimizer each step: no scheduler state can drift on resume),
gradient-norm clipping, and `finish_step` (finite checks, clip, step, progress bar, log row).

Pitfall: a NaN/inf loss or gradient norm stops the run with `NonFiniteLoss`, naming the step and the last good
checkpoint to resume from, instead of training on garbage.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dev2pro.errors import UserError
from dev2pro.train.checkpointing import latest_checkpoint
from dev2pro.train.config import TrainConfig
from dev2pro.train.flow_step import bucket_losses


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
