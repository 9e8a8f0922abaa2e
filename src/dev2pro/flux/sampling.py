"""Euler flow sampling for Flux transformers, BFL-style: a few small free functions and one `generate`.

    get_noise -> (prepare: pack, ids) -> sampling_schedule -> denoise (Euler, t = 1 -> 0) -> unpack -> ae.decode

Guidance modes (the whole point of dev2pro):

- embedded guidance (FLUX.1-dev): one pass, the guidance value goes into the model's `guidance_in` embedding;
- true CFG with a negative prompt (dev2pro / de-distilled bases, the "pro" teacher): two passes,
  `v = v_u + s (v_c - v_u)` (`flow.cfg_combine`); guidance-embedded de-distilled bases get guidance input 1.0,
  the value they were trained at;
- both (embedded guidance g and CFG s) when asked explicitly.

`default_guidance` encodes the rule: for a guidance-embedded model, `guidance=None` means 3.5 without CFG (dev's usual
value) and 1.0 with CFG. Models without a guidance embedding ignore it. `sample_mode` picks the mode from the base
when the CFG scale is left unset too: a guidance-distilled base (dev: a guidance embedding, no marker) is sampled
dev-style (embedded 3.5, one pass); a de-distilled base (marked `dev2pro.base_kind = dedistilled` in its file, as
`dev2pro dedistill` writes it, or named so in the config) and a base without a guidance embedding (a "pro" teacher)
with true CFG 3.5 (guidance input 1.0 where there is an embedding). FLUX.1-schnell has no guidance embedding and is
not for CFG: name it `distilled`.

References: BFL flux/sampling.py (`get_noise`, `prepare`, `get_schedule`, `denoise`, `unpack`); diffusers'
`FluxPipeline.__call__` (true_cfg_scale path) and `FlowMatchEulerDiscreteScheduler` are the test oracle: same
shifted schedule (`linspace(1, 1/N, N)` + 0, exponential shift with mu from the image token count), same update.

Determinism: noise is drawn per seed on the CPU in float32 (one generator per seed), so a seed gives the same image
whatever else is in the batch and on whatever device it runs. The Euler state stays float32; only the model call
runs in the model's compute dtype. LoRAs are merged into the model before sampling (`dev2pro.lora.apply.apply_loras`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from dev2pro.errors import UserError
from dev2pro.flux.flow import cfg_combine, euler_step, sampling_schedule
from dev2pro.flux.models import has_guidance_embed, image_ids, pack_latents, predict, text_ids, unpack_latents

DEV_GUIDANCE = 3.5  # FLUX.1-dev's usual embedded guidance
PRO_GUIDANCE_INPUT = 1.0  # guidance input of de-distilled bases (what dev2pro trains at)


def get_noise(num: int, channels: int, height: int, width: int, seed: int | Sequence[int] | None = None,
              generator: torch.Generator | None = None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Gaussian latent noise (num, channels, height, width) for latent size `height x width`.

    `seed` an int: one generator for the batch (as BFL). `seed` a list: one sample per seed, each from its own
    generator, so a sample depends on its seed only. Drawn on the CPU in float32, then moved."""
    shape = (channels, height, width)
    if isinstance(seed, Sequence):
        if len(seed) != num:
            raise ValueError(f"got {len(seed)} seeds for {num} samples")
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seed])
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        x = torch.randn((num, *shape), generator=generator, device="cpu")
    return x.to(device=device, dtype=dtype)


def default_guidance(model, guidance: float | None, cfg: float) -> float | None:
    """The guidance-embedding input: None for models without one; else `guidance`, or 3.5 without CFG / 1.0 with."""
    if not has_guidance_embed(model):
        return None
    if guidance is not None:
        return float(guidance)
    return DEV_GUIDANCE if cfg == 1.0 else PRO_GUIDANCE_INPUT


DEFAULT_CFG = 3.5  # true CFG scale of de-distilled bases when none is given
BASE_KIND_KEY = "dev2pro.base_kind"  # safetensors metadata: "distilled" (dev) or "dedistilled" (dev2pro)
BASE_KINDS = ("distilled", "dedistilled")


def base_kind_of(ref) -> str | None:
    """The `dev2pro.base_kind` a base file carries in its metadata (None when absent or not a single file)."""
    from dev2pro.errors import CheckpointError
    from dev2pro.flux.safetensors_io import read_header
    from dev2pro.flux.sources import resolve_ref

    path = resolve_ref(ref, download=False) if isinstance(ref, (str, Path)) else None
    if path is None or not path.is_file():
        return None
    try:
        kind = read_header(path).metadata.get(BASE_KIND_KEY)
    except CheckpointError:
        return None
    return kind if kind in BASE_KINDS else None


def sample_mode(model, guidance: float | None, cfg: float | None,
                kind: str | None = None) -> tuple[float | None, float]:
    """(guidance-embedding input or None, true CFG scale) for sampling `model`. `cfg=None` picks the scale from the
    base: 1 (one pass) for a distilled base, `DEFAULT_CFG` for a de-distilled one or one without a guidance embedding;
    `kind` ("distilled", "dedistilled" or None = from the model) overrides that guess. Then `default_guidance`."""
    if cfg is None:
        if kind is None:
            kind = "distilled" if has_guidance_embed(model) else "dedistilled"
        cfg = 1.0 if kind == "distilled" else DEFAULT_CFG
    return default_guidance(model, guidance, cfg), float(cfg)


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: `model.compute_dtype` if set (fp8 storage), else its first float param."""
    dt = getattr(model, "compute_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    for p in model.parameters():
        if p.is_floating_point() and p.element_size() > 1:
            return p.dtype
    return torch.bfloat16


@torch.no_grad()
def denoise(model, x: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor, img_ids: torch.Tensor,
            txt_ids: torch.Tensor, timesteps: Sequence[float] | torch.Tensor, guidance: float | None = None,
            cfg: float = 1.0, neg_txt: torch.Tensor | None = None, neg_pooled: torch.Tensor | None = None,
            neg_txt_ids: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
    """Euler integration of packed tokens `x` (b, n, d) along `timesteps` (from 1 to 0).

    `guidance` goes into the guidance embedding (pass None for models without one). With `cfg != 1`, a second pass on
    `neg_txt`/`neg_pooled` gives `v_u` and the velocity is `v_u + cfg (v_c - v_u)`. Returns float32 tokens."""
    if cfg != 1.0 and (neg_txt is None or neg_pooled is None):
        raise ValueError("cfg != 1 needs neg_txt and neg_pooled (the negative / empty prompt embeddings)")
    dt = compute_dtype(model)
    b = x.shape[0]
    x = x.float()
    txt, pooled = txt.to(dt), pooled.to(dt)
    if cfg != 1.0:
        neg_txt, neg_pooled = neg_txt.to(dt), neg_pooled.to(dt)
        neg_txt_ids = txt_ids if neg_txt_ids is None else neg_txt_ids
    ts = [float(t) for t in timesteps]
    for t, t_next in zip(ts[:-1], ts[1:]):
        tb = torch.full((b,), t, device=x.device, dtype=torch.float32)
        xin = x.to(dt)
        v = predict(model, xin, tb, txt, pooled, img_ids, txt_ids, guidance).float()
        if cfg != 1.0:
            v_u = predict(model, xin, tb, neg_txt, neg_pooled, img_ids, neg_txt_ids, guidance).float()
            v = cfg_combine(v_u, v, cfg)
        x = euler_step(x, v, t, t_next)
        if on_step is not None:
            on_step(1)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def embed_prompts(text, prompts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{prompt: (txt (seq, dim), pooled (dim,))} for the distinct prompts. Trainers compute this for their sample
    prompts (and the negative) before freeing the text encoders, then pass the dict to `generate` as `text`."""
    unique = list(dict.fromkeys(prompts))
    txt, pooled = text.encode(unique)
    return {p: (txt[i].cpu(), pooled[i].cpu()) for i, p in enumerate(unique)}


def _lookup(embeddings, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [p for p in prompts if p not in embeddings]
    if missing:
        raise ValueError(f"no precomputed embedding for prompt {missing[0]!r}")
    txt = torch.stack([embeddings[p][0] for p in prompts]).to(device)
    pooled = torch.stack([embeddings[p][1] for p in prompts]).to(device)
    return txt, pooled


def _check_compatible(model, ae, txt: torch.Tensor, pooled: torch.Tensor) -> None:
    cfg = model.config
    if ae is not None and cfg.in_channels != 4 * ae.latent_channels:
        raise UserError(f"the model takes {cfg.in_channels} input channels per token but the autoencoder gives "
                        f"{ae.latent_channels} latent channels (x4 when packed): use the matching --ae")
    if txt.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise UserError(f"the text encoders give context {txt.shape[-1]} / pooled {pooled.shape[-1]} but the model "
                        f"expects {cfg.joint_attention_dim} / {cfg.pooled_projection_dim}: use matching --t5/--clip")


# ---------------------------------------------------------------------------------------------------------------------
# Top level


def generate(model, ae, text, prompts: Sequence[str], *, negative: str = "", height: int = 1024, width: int = 1024,
             steps: int = 28, guidance: float | None = None, cfg: float = 1.0, seeds: Sequence[int] = (0,),
             shift: bool = True, batch_size: int = 1, progress: bool = True) -> torch.Tensor:
    """Images (len(prompts) * len(seeds), 3, H, W) in [-1, 1], ordered prompt-major (prompt 0 with every seed, ...).

    `text` is a TextEncoder or the dict returned by `embed_prompts` (must hold `negative` when `cfg != 1`).
    `ae=None` returns the latents instead of images. `guidance=None` follows `default_guidance`. The model's
    train/eval mode is restored afterwards."""
    from tqdm.auto import tqdm

    if ae is None:
        down, channels = 8, model.config.in_channels // 4
    else:
        down, channels = ae.downsample, ae.latent_channels
    if height % (2 * down) or width % (2 * down) or height <= 0 or width <= 0:
        raise UserError(f"image size {width}x{height} must be a positive multiple of {2 * down} (2 x the autoencoder "
                        f"downsampling) on each side")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    device = next(model.parameters()).device
    lh, lw = height // down, width // down
    jobs = [(p, int(s)) for p in prompts for s in seeds]
    use_cfg = cfg != 1.0
    g = default_guidance(model, guidance, cfg)

    if isinstance(text, dict):
        embeddings = text
    else:
        embeddings = embed_prompts(text, list(prompts) + ([negative] if use_cfg else []))
    probe_txt, probe_pooled = _lookup(embeddings, [jobs[0][0]], "cpu")
    _check_compatible(model, ae, probe_txt, probe_pooled)

    timesteps = sampling_schedule(steps, seq_len=(lh // 2) * (lw // 2), shift=shift)
    img_ids = image_ids(lh, lw, device=device)
    was_training = model.training
    model.eval()
    outputs = []
    bar = tqdm(total=steps * math.ceil(len(jobs) / batch_size), desc="sampling", unit="step", disable=not progress)
    try:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            txt, pooled = _lookup(embeddings, [p for p, _ in batch], device)
            neg_txt = neg_pooled = None
            if use_cfg:
                neg_txt, neg_pooled = _lookup(embeddings, [negative] * len(batch), device)
            noise = get_noise(len(batch), channels, lh, lw, seed=[s for _, s in batch], device=device)
            x = denoise(model, pack_latents(noise), txt, pooled, img_ids, text_ids(txt.shape[1], device=device),
                        timesteps, guidance=g, cfg=cfg, neg_txt=neg_txt, neg_pooled=neg_pooled, on_step=bar.update)
            z = unpack_latents(x, lh, lw)
            outputs.append(z.cpu() if ae is None else ae.decode(z).float().clamp(-1, 1).cpu())
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------------------------------
# Images


def to_pil(images: torch.Tensor) -> list:
    """(b, 3, H, W) in [-1, 1] -> list of RGB PIL images."""
    from PIL import Image

    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in arr]


def make_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 2):
    """A PIL grid of (b, 3, H, W) images in [-1, 1], `ncols` per row (default: ceil(sqrt(b))), white padding."""
    from PIL import Image

    tiles = to_pil(images)
    n = len(tiles)
    ncols = max(1, min(ncols or math.ceil(math.sqrt(n)), n))
    nrows = math.ceil(n / ncols)
    w, h = tiles[0].size
    grid = Image.new("RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        grid.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def save_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None):
    """Write `make_grid(images, ncols)` to `path` (PNG by suffix); returns the PIL image."""
    grid = make_grid(images, ncols)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid
