"""The flow-matching step shared by the recipes: pack a batch, draw noise and times for the global batch, build x_t
and the velocity target (`dev2pro.flux.flow`'s convention, t = 1 is noise), predict, per-sample loss, backward over
the accumulated micro-batches (`flow_micro_steps`), and the per-t-bucket losses that are logged.

Reproducibility: noise and times come from the run's one CPU `torch.Generator` (seeded with `train.seed`, identical on
every rank, saved in checkpoints), drawn for the global batch and sliced per rank (`distributed.global_draw`).

Pitfall: DDP/FSDP wrappers hide `model.config`; call `forward_flux` with the guidance flag taken from the unwrapped
model (`dev2pro.flux.models.has_guidance_embed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dev2pro.flux import flow
from dev2pro.train.config import TrainConfig
from dev2pro.train.distributed import accumulation_context, global_draw


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


def batch_tensors(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (b, c, h, w), txt (b, L, D), pooled (b, P)) of a batch collated by `dev2pro.data.cache.collate`."""
    try:
        return batch["latents"], batch["txt"], batch["pooled"]
    except KeyError as e:
        raise KeyError(f"a collated batch needs 'latents', 'txt' and 'pooled'; it has {sorted(batch)}") from e


@torch.no_grad()
def guided_target(model, fb: FlowBatch, scale: float, uncond: tuple[torch.Tensor, torch.Tensor],
                  has_guidance: bool) -> torch.Tensor:
    """The guidance-preserving target (`train.guidance_loss = scale`, ai-toolkit's "guidance loss"):
    `v_u + scale (v - v_u)` with `v = eps - x0` and `v_u` the current model's (base + LoRA, no gradient) velocity for
    the empty prompt at the same x_t, t and guidance input `scale`. The model is then trained at guidance input
    `scale` toward it, so the guidance input keeps meaning "CFG at this scale" instead of drifting to the plain
    conditional velocity. Costs one extra forward pass (no backward) per micro-batch.
    `uncond` = (txt (L, D), pooled (P,)) of the empty prompt."""
    from dev2pro.flux.models import text_ids

    u_txt, u_pooled = uncond
    b = fb.x_t.shape[0]
    u_txt = u_txt.to(fb.txt.device, fb.txt.dtype).expand(b, *u_txt.shape)
    u_pooled = u_pooled.to(fb.pooled.device, fb.pooled.dtype).expand(b, *u_pooled.shape)
    v_u = forward_flux(model, has_guidance, fb.x_t, fb.t, u_txt, u_pooled, fb.img_ids,
                       text_ids(u_txt.shape[1], device=fb.x_t.device), scale)
    return flow.cfg_combine(v_u.float(), fb.target, scale)


def flow_micro_steps(accelerator, model, batches: Iterator[dict], train: TrainConfig, generator: torch.Generator, *,
                     has_guidance: bool, guidance, condition=None,
                     uncond: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of the flow-matching objective over `train.grad_accum` micro-batches: draw noise and
    times, predict, per-sample loss, backward. `condition(fb) -> (txt, pooled)` swaps the text conditioning (caption
    dropout in train-base). With `train.guidance_loss = s > 0` the target is `guided_target` (needs `uncond`, the
    empty prompt's embeddings) and the guidance input is `s`. Returns the per-sample losses and times gathered over
    processes (for logging)."""
    per_all, t_all = [], []
    for micro in range(train.grad_accum):
        latents, txt, pooled = batch_tensors(next(batches))
        fb = flow_batch(latents, txt, pooled, train, generator, accelerator, accelerator.device)
        c_txt, c_pooled = condition(fb) if condition is not None else (fb.txt, fb.pooled)
        with accumulation_context(accelerator, model, micro == train.grad_accum - 1), accelerator.autocast():
            target, g = fb.target, guidance
            if train.guidance_loss > 0:
                if uncond is None:
                    raise ValueError("train.guidance_loss needs the empty prompt's embeddings (uncond)")
                target, g = guided_target(model, fb, train.guidance_loss, uncond, has_guidance), train.guidance_loss
            pred = forward_flux(model, has_guidance, fb.x_t, fb.t, c_txt, c_pooled, fb.img_ids, fb.txt_ids, g)
            per = flow.flow_loss(pred, target, flow.loss_weight(fb.t, train.loss_weighting))
            accelerator.backward(per.mean() / train.grad_accum)
        per_all.append(per.detach())
        t_all.append(fb.t)
    return accelerator.gather(torch.cat(per_all)), accelerator.gather(torch.cat(t_all))
