"""Rectified-flow math as small pure functions, in the one time convention of this project.

    x_t = (1 - t) * x0 + t * eps        t = 1 is pure noise, t = 0 is data
    target v = eps - x0                 the model predicts v; Euler: x <- x + (t_next - t) * v, from t = 1 to 0

Reference: BFL flux/sampling.py (get_schedule, time_shift), Esser et al. 2024 (SD3: logit-normal sampling), minRF.
Every trainer, the sampler and the evaluation use these functions; nothing else re-derives them.
Pitfall: diffusers' schedulers count sigmas in [0, 1] but its pipelines pass `timestep * 1000` around; here `t` is
always in [0, 1] and the model wrapper (`models.predict`) hands it to the transformer unchanged.
"""

from __future__ import annotations

import math

import torch

# Dev's resolution-dependent shift: mu is linear in the number of image tokens between these points.
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def flux_mu(seq_len: int, base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256): the dev shift for `seq_len` image tokens."""
    slope = (max_shift - base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return base_shift + slope * (seq_len - BASE_SEQ_LEN)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """t' = e^mu / (e^mu + 1/t - 1) (sigma = 1). t = 0 and t = 1 are fixed points."""
    t = torch.as_tensor(t, dtype=torch.float64 if not torch.is_tensor(t) else t.dtype)
    e = math.exp(mu)
    out = e / (e + 1.0 / t.clamp_min(1e-12) - 1.0)
    return torch.where(t <= 0, torch.zeros_like(out), out)


def static_shift(t: torch.Tensor, k: float) -> torch.Tensor:
    """k t / (1 + (k - 1) t): SD3-style constant shift (k = 3.1582 equals dev's shift at 1024x1024)."""
    return k * t / (1.0 + (k - 1.0) * t)


def sampling_schedule(steps: int, seq_len: int | None = None, shift: bool = True) -> torch.Tensor:
    """Times from 1 to 0, `steps + 1` values (float64). With `shift`, dev's resolution-dependent shift for
    `seq_len` image tokens; schnell and the de-distilled bases may use it too (it depends on resolution only)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift:
        if seq_len is None:
            raise ValueError("seq_len is required for the shifted schedule")
        t = time_shift(flux_mu(seq_len), t)
    return t


# ---------------------------------------------------------------------------------------------------------------------
# Training-time timestep samplers. Each returns a float32 tensor of shape (n,) in (0, 1).


def sample_uniform(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def sample_logit_normal(n: int, mean: float = 0.0, scale: float = 1.0, generator=None, device=None) -> torch.Tensor:
    """sigmoid(N(mean, scale^2)): concentrates training on middle times (SD3)."""
    return torch.sigmoid(mean + scale * torch.randn(n, generator=generator, device=device))


def sample_timesteps(
    n: int,
    method: str = "logit_normal",
    *,
    mean: float = 0.0,
    scale: float = 1.0,
    shift: float = 3.1582,
    seq_len: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Timesteps for a batch. Methods:

    - `uniform`: U(0, 1)
    - `logit_normal`: sigmoid(N(mean, scale))
    - `shift`: U(0, 1) then the static shift `shift`
    - `flux_shift`: sigmoid(N(mean, scale)) then dev's resolution-dependent shift for `seq_len` tokens (as in
      diffusers' and ai-toolkit's Flux trainers)
    """
    if method == "uniform":
        return sample_uniform(n, generator, device)
    if method == "logit_normal":
        return sample_logit_normal(n, mean, scale, generator, device)
    if method == "shift":
        return static_shift(sample_uniform(n, generator, device), shift)
    if method == "flux_shift":
        if seq_len is None:
            raise ValueError("flux_shift needs seq_len (number of image tokens)")
        return time_shift(flux_mu(seq_len), sample_logit_normal(n, mean, scale, generator, device)).float()
    raise ValueError(f"unknown timestep sampler '{method}' (uniform, logit_normal, shift, flux_shift)")


TIMESTEP_METHODS = ("uniform", "logit_normal", "shift", "flux_shift")


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, `t` of shape (b,)."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return eps - x0


def loss_weight(t: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights: `none` (1), `cosmap` (SD3's 2 / (pi (1 - 2t + 2t^2)))."""
    if scheme == "none":
        return torch.ones_like(t)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t * t))
    raise ValueError(f"unknown loss weighting '{scheme}' (none, cosmap)")


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE (mean over all but the batch dim), optionally weighted; returns shape (b,)."""
    per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return per if weight is None else per * weight.to(per.dtype)


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale) -> torch.Tensor:
    """v_u + s (v_c - v_u); `scale` may be a float or a (b,) tensor. s = 1 is no guidance."""
    s = scale if not torch.is_tensor(scale) else _bcast(scale, v_cond)
    return v_uncond + s * (v_cond - v_uncond)


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    return x + (t_next - t) * v


def t_bucket(t: torch.Tensor, n_buckets: int = 4) -> torch.Tensor:
    """Index of t's bucket among `n_buckets` equal bins of [0, 1] (for loss-per-t logging)."""
    return (t * n_buckets).long().clamp(0, n_buckets - 1)
