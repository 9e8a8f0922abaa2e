"""Guidance-health monitor: how a model's prediction responds to its guidance input, and how far it drifted from
where training started, on a fixed probe set. Usable by every trainer.

Why: a guidance-distilled model (FLUX.1-dev) encodes "how much to follow the prompt" in its guidance embedding. A LoRA
or fine-tune trained with the plain flow loss at g = 3.5 teaches it that the guided output equals unguided data, and
the embedding erodes: the prediction stops responding to g. These curves make that visible while training runs.

Metrics (relative L2 norms over the whole probe batch, so they are comparable across models and steps):

- `monitor/guidance_response` = ||v(g_high) - v(g_low)|| / ||v(g_low)|| (default g_high = 4, g_low = 1): 0 means the
  guidance input does nothing (models without a guidance embedding log nothing here);
- `monitor/drift_g<g>` = ||v_now(g) - v_start(g)|| / ||v_start(g)|| for g in `drift_guidances` (1.0 and 3.5): how far
  predictions moved from the starting model (for models without a guidance embedding: one `monitor/drift`).

The probe set is fixed at construction: the first `probe_size` cached items of one bucket (their latents and text
embeddings; with a shard stream, the first items of the largest shard), noise from `monitor.seed`, times cycling
through `t_values`. The starting model's outputs are computed once then and kept (no second model in memory).
Logged to TensorBoard (the run's writer) and `monitor.csv`.
Pitfall: under FSDP2 the probe forward is collective, so every rank calls `log_probe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dev2pro.flux import flow


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@dataclass
class GuidanceProbe:
    x_t: torch.Tensor
    t: torch.Tensor
    txt: torch.Tensor
    pooled: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    has_guidance: bool
    response: tuple[float, float]
    drift_guidances: tuple[float, ...]
    start: dict[str, torch.Tensor]

    @classmethod
    def build(cls, model, data, cfg, device) -> GuidanceProbe:
        """Fix the probe inputs from `data` (a `data_loading.TrainData`) and record the starting model's outputs."""
        from dev2pro.flux.models import has_guidance_embed, image_ids, pack_latents, text_ids

        ds = data.dataset
        if ds is None:  # a shard stream: a fixed batch of one bucket read at setup
            b = data.probe_batch
            ds = [{"latents": b["latents"][i], "txt": b["txt"][i], "pooled": b["pooled"][i]}
                  for i in range(b["latents"].shape[0])]
        first = ds[0]
        shape = tuple(first["latents"].shape)
        items = []
        for i in range(len(ds)):
            item = first if i == 0 else ds[i]
            if tuple(item["latents"].shape) == shape:
                items.append(item)
            if len(items) == cfg.probe_size:
                break
        g = torch.Generator().manual_seed(cfg.seed)
        x0 = pack_latents(torch.stack([it["latents"].float() for it in items]))
        noise = torch.randn(x0.shape, generator=g)
        t = torch.tensor([cfg.t_values[i % len(cfg.t_values)] for i in range(len(items))], dtype=torch.float32)
        probe = cls(
            x_t=flow.interpolate(x0, noise, t).to(device), t=t.to(device),
            txt=torch.stack([it["txt"].float() for it in items]).to(device),
            pooled=torch.stack([it["pooled"].float() for it in items]).to(device),
            img_ids=image_ids(shape[-2], shape[-1], device=device), txt_ids=text_ids(first["txt"].shape[0],
                                                                                     device=device),
            has_guidance=has_guidance_embed(model), response=(cfg.response_low, cfg.response_high),
            drift_guidances=tuple(cfg.drift_guidances), start={},
        )
        probe.start = probe.outputs(model)
        return probe

    def guidances(self) -> list[float | None]:
        if not self.has_guidance:
            return [None]
        return list(dict.fromkeys([*self.drift_guidances, *self.response]))

    @torch.no_grad()
    def outputs(self, model) -> dict[str, torch.Tensor]:
        """Predictions on the probe at every guidance value the metrics need (float32, CPU)."""
        from dev2pro.train.distributed import unwrap
        from dev2pro.train.flow_step import forward_flux

        net = unwrap(model)
        was_training = net.training
        net.eval()
        try:
            out = {}
            for g in self.guidances():
                v = forward_flux(net, self.has_guidance, self.x_t, self.t, self.txt, self.pooled, self.img_ids,
                                 self.txt_ids, g)
                out[_key(g)] = v.float().cpu()
            return out
        finally:
            net.train(was_training)

    def metrics(self, model) -> dict[str, float]:
        now = self.outputs(model)
        m = {}
        if self.has_guidance:
            lo, hi = self.response
            m["monitor/guidance_response"] = rel_norm(now[_key(hi)], now[_key(lo)])
            for g in self.drift_guidances:
                m[f"monitor/drift_g{g:g}"] = rel_norm(now[_key(g)], self.start[_key(g)])
        else:
            m["monitor/drift"] = rel_norm(now[_key(None)], self.start[_key(None)])
        return m


def _key(g: float | None) -> str:
    return "none" if g is None else f"{g:g}"


def log_probe(probe: GuidanceProbe, accelerator, model, step: int, run_log, monitor_log) -> dict[str, float]:
    """Compute the metrics (every rank: the forward may be collective) and log them on the main process to the run's
    TensorBoard writer and to `monitor.csv`."""
    with accelerator.autocast():
        m = probe.metrics(model)
    if accelerator.is_main_process:
        if run_log is not None and run_log.writer is not None:
            for k, v in m.items():
                run_log.writer.add_scalar(k, v, step)
        if monitor_log is not None:
            monitor_log.log(step, {k.split("/", 1)[1]: v for k, v in m.items()})
    return m
