"""Optimizer, learning-rate schedule and the end of every training step: the optimizer over the trainable parameters
(AdamW, AdamW8bit, Adafactor, Prodigy), the LR as a pure function of the step (`lr_factor`, set on the optimizer each
step: no scheduler state can drift on resume) or a diffusers scheduler whose state is checkpointed (`LrSchedule`),
gradient-norm clipping, and `finish_step` (finite checks, clip, step, progress bar, log row).

Pitfall: a NaN/inf loss or gradient norm stops the run with `NonFiniteLoss`, naming the step and the last good
checkpoint to resume from, instead of training on garbage.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dev2pro.errors import ConfigError, UserError
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
    """`train.optimizer` over the trainable parameters, with `train.optimizer_args` as extra keyword arguments:
    adamw (torch), adamw8bit (bitsandbytes: 8-bit moments for tensors of >= 4096 elements), adafactor (transformers,
    with the external LR of `train.lr` and the schedule: relative_step and scale_parameter off, as kohya uses it for
    Flux), prodigy (prodigyopt: `train.lr` is a multiplier of its own step-size estimate, 1.0 as usual)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    name, extra = train.optimizer, dict(train.optimizer_args)
    adam = dict(lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay)
    if name == "adamw":
        cls = torch.optim.AdamW
    elif name == "adamw8bit":
        cls = _import("bitsandbytes.optim", "AdamW8bit", "bitsandbytes")
    elif name == "prodigy":
        cls = _import("prodigyopt", "Prodigy", "prodigyopt")
    else:
        cls = _import("transformers.optimization", "Adafactor", "transformers")
        adam = dict(lr=train.lr, weight_decay=train.weight_decay, relative_step=False, scale_parameter=False,
                    warmup_init=False)
    try:
        return cls(params, **{**adam, **extra})
    except TypeError as e:
        raise ConfigError(f"train.optimizer_args = {extra}: not accepted by {cls.__module__}.{cls.__name__} "
                          f"({e})") from None


def _import(module: str, name: str, package: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise UserError(f"train.optimizer needs the '{package}' package ({e}): pip install {package}") from None


def optimizer_label(optimizer, train: TrainConfig) -> str:
    """kohya's `ss_optimizer` text: `module.Class(arg=value,...)`."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    args = ",".join(f"{k}={v}" for k, v in sorted(train.optimizer_args.items()))
    return f"{type(opt).__module__}.{type(opt).__name__}" + (f"({args})" if args else "")


class LrSchedule:
    """The LR of every step: the built-in `lr_factor` set on the optimizer before each step (`train.scheduler =
    "builtin"`), or a diffusers `get_scheduler` LambdaLR stepped after each optimizer step, whose state goes into the
    checkpoint (`state_dict`) so a resumed run continues on the same curve."""

    def __init__(self, optimizer, train: TrainConfig):
        self.optimizer, self.train, self.scheduler = optimizer, train, None
        if train.scheduler != "builtin":
            from diffusers.optimization import get_scheduler

            self.scheduler = get_scheduler(train.scheduler, optimizer, num_warmup_steps=train.warmup_steps,
                                           num_training_steps=train.steps, num_cycles=train.lr_cycles,
                                           power=train.lr_power)

    def before_step(self, step: int) -> float:
        if self.scheduler is None:
            return set_lr(self.optimizer, step, self.train)
        return float(self.optimizer.param_groups[0]["lr"])

    def after_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {"lr_scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is None:
            return
        if "lr_scheduler" not in state:
            raise UserError("the checkpoint has no LR scheduler state (it was written with train.scheduler = "
                            f"'builtin'); resume with the same train.scheduler, not '{self.train.scheduler}'")
        self.scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


def set_lr(optimizer: torch.optim.Optimizer, step: int, train: TrainConfig) -> float:
    """Set the built-in schedule's LR of `step` on every group (recipes without `LrSchedule` call this directly)."""
    if train.scheduler != "builtin":
        raise ConfigError(f"train.scheduler = '{train.scheduler}' is supported by train-lora only: use "
                          "train.lr_schedule (constant / cosine) with train.scheduler = 'builtin' here")
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
