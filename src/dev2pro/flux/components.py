"""The components around the transformer: the autoencoder and the text encoders, behind two small interfaces.

Every recipe, cache and command talks to these interfaces (duck-typed; any object with these members works):

    Autoencoder
        identity: str           stable fingerprint of class + weights + scaling (part of latent cache keys)
        latent_channels: int    16 for Flux
        downsample: int         8 for Flux (pixels per latent cell)
        encode(images) -> latents   images (b, 3, H, W) float in [-1, 1]; latents (b, C, H/d, W/d) float32,
                                    normalised (Flux: z = 0.3611 * (mean - 0.1159), the distribution *mean*)
        decode(latents) -> images   inverse scaling first, images float32 in [-1, 1]

    TextEncoder
        identity: str; context_dim: int (T5 width, 4096); pooled_dim: int (CLIP-L, 768); max_length: int
        encode(prompts: list[str]) -> (txt (b, max_length, context_dim) float32, pooled (b, pooled_dim) float32)

Real implementations: `FluxAutoencoder` (diffusers `AutoencoderKL`, from BFL's `ae.safetensors` or a diffusers
folder / pipeline `vae/` subfolder / hub id) and `FluxTextEncoders` (T5 + CLIP-L through transformers'
`from_pretrained`, local folders, pipeline layouts or hub ids). `"toy"` resolves to the toy world's components.
The resolvers `load_autoencoder` and `load_text_encoder` are what recipes and commands call.

References: BFL flux/modules/autoencoder.py (scale 0.3611, shift 0.1159, `AutoEncoder.encode` samples; we use the
mean, as every trainer caches it) and flux/modules/conditioner.py (`HFEmbedder`: padding to max_length, no attention
mask, T5 `last_hidden_state`, CLIP `pooler_output`); diffusers' FluxPipeline `_get_t5_prompt_embeds` /
`_get_clip_prompt_embeds` do the same and serve as the test oracle. The BFL/ldm VAE key names are mapped by the
declarative table `AE_PREFIXES` + `AE_LEAVES`; diffusers' `convert_ldm_vae_checkpoint` is the oracle in tests.

Pitfalls: the ldm attention q/k/v/proj_out are 1x1 convs (C, C, 1, 1) where diffusers has Linear (C, C); the decoder's
`up.N` runs in reverse order of diffusers' `up_blocks.N`; group-norm group count is not stored in the weights (32 for
Flux); the CLIP pooled vector is taken at the first EOS token, so tokenizer and config must agree on its id.
Freeing: trainers call `free(encoder)` after caching; it moves the weights to the `meta` device (memory returns even
if some reference survives) and empties the CUDA cache.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import providers

FLUX_AE_SCALE = 0.3611
FLUX_AE_SHIFT = 0.1159

# diffusers' AutoencoderKL configuration of the FLUX.1 autoencoder (black-forest-labs/FLUX.1-dev vae/config.json),
# kept here as data so BFL files load without any download.
FLUX_AE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=FLUX_AE_SCALE,
    shift_factor=FLUX_AE_SHIFT,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
CLIP_MAX_LENGTH = 77
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@runtime_checkable
class Autoencoder(Protocol):
    identity: str
    latent_channels: int
    downsample: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    identity: str
    context_dim: int
    pooled_dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------------------------------
# BFL / ldm autoencoder keys <-> diffusers AutoencoderKL keys (declarative table)
#
# Module prefixes; `{i}`, `{j}` are copied, `{up}` is the decoder level, reversed between the two layouts
# (ldm `decoder.up.0` is the highest resolution, diffusers `decoder.up_blocks.0` the lowest).
AE_PREFIXES: list[tuple[str, str]] = [
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.attn_1", "encoder.mid_block.attentions.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("encoder.norm_out", "encoder.conv_norm_out"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.attn_1", "decoder.mid_block.attentions.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
    ("decoder.up.{up}.block.{j}", "decoder.up_blocks.{up}.resnets.{j}"),
    ("decoder.up.{up}.upsample.conv", "decoder.up_blocks.{up}.upsamplers.0.conv"),
    ("decoder.norm_out", "decoder.conv_norm_out"),
    ("decoder.conv_out", "decoder.conv_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
]
# Leaf module renames inside resnets and the mid attention (norm1/conv1/norm2/conv2 keep their names).
AE_LEAVES: list[tuple[str, str]] = [
    ("nin_shortcut", "conv_shortcut"),
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
]
# Special case: these diffusers attention leaves are Linear; in ldm files they are 1x1 convs.
AE_CONV1X1_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
# Prefixes that single-file checkpoints put in front of the VAE keys (SD-style and ComfyUI full checkpoints).
AE_FILE_PREFIXES = ("first_stage_model.", "vae.")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("i", "j", "up"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(f"^{pattern}\\.(?P<rest>.+)$")


_AE_FWD = [(_template_regex(src), dst) for src, dst in AE_PREFIXES]
_AE_BWD = [(_template_regex(dst), src) for src, dst in AE_PREFIXES]


def _map_ae_key(key: str, rules, leaves: list[tuple[str, str]], num_up: int) -> str | None:
    for regex, target in rules:
        m = regex.match(key)
        if not m:
            continue
        groups = {k: v for k, v in m.groupdict().items() if k != "rest" and v is not None}
        if "up" in groups:
            groups["up"] = str(num_up - 1 - int(groups["up"]))
        rest = m.group("rest")
        for old, new in leaves:
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        return target.format(**groups) + "." + rest
    return None


def bfl_to_diffusers_ae(sd: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    """Map a BFL/ldm autoencoder state dict (prefix already stripped) to diffusers `AutoencoderKL` keys."""
    out, unknown = {}, []
    for key, value in sd.items():
        new = _map_ae_key(key, _AE_FWD, AE_LEAVES, num_up)
        if new is None:
            unknown.append(key)
            continue
        leaf = new.rsplit(".", 1)[0]
        if leaf.endswith(AE_CONV1X1_LEAVES) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    if unknown:
        raise CheckpointError(f"unexpected autoencoder keys {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    return out


def diffusers_to_bfl_ae(sd: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    """Inverse of `bfl_to_diffusers_ae` (writes the BFL `ae.safetensors` layout, 1x1 convs included)."""
    inverse_leaves = [(new, old) for old, new in AE_LEAVES]
    out = {}
    for key, value in sd.items():
        new = _map_ae_key(key, _AE_BWD, inverse_leaves, num_up)
        if new is None:
            raise CheckpointError(f"unexpected diffusers autoencoder key '{key}'")
        if key.rsplit(".", 1)[0].endswith(AE_CONV1X1_LEAVES) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def ae_config_from_bfl(sd: dict[str, torch.Tensor], **overrides) -> dict:
    """Infer the diffusers config of a BFL/ldm autoencoder state dict from its tensor shapes. What the weights do not
    store (group-norm groups, scaling) defaults to Flux's values; pass `overrides` to change them."""
    if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise CheckpointError("not an autoencoder: 'encoder.conv_in.weight' or 'decoder.conv_out.weight' missing")
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in sd:
        levels += 1
    layers = 0
    while f"encoder.down.0.block.{layers}.conv1.weight" in sd:
        layers += 1
    cfg = dict(FLUX_AE_CONFIG)
    cfg.update(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        layers_per_block=layers,
        latent_channels=sd["encoder.conv_out.weight"].shape[0] // 2,  # mean and logvar
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
    )
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers


def weights_fingerprint(*modules: torch.nn.Module, samples: int = 64) -> str:
    """A stable hash of the weights (names, shapes, dtypes and a strided sample of each tensor's values), independent
    of the file format the weights came from. Cheap even for T5-XXL: a few values per tensor leave the device."""
    h = hashlib.sha256()
    for module in modules:
        for name, p in module.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            if p.device.type == "meta" or p.numel() == 0:
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def free(obj) -> None:
    """Release an encoder's memory: its weights move to `meta` (usable references die with them), then the Python and
    CUDA caches are emptied. Use after caching: `free(text_encoder); del text_encoder`."""
    if obj is None:
        return
    if hasattr(obj, "release"):
        obj.release()
    elif isinstance(obj, torch.nn.Module):
        obj.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle checkpoints are not loaded (unsafe); convert it to .safetensors first")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _check_not_pickle(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise CheckpointError(f"{path}: cannot read as safetensors ({str(e).splitlines()[0]})") from None


def _looks_like_hub_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", ref)) and not ref.endswith((".safetensors",) + PICKLE_SUFFIXES)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Autoencoder


class FluxAutoencoder:
    """The FLUX.1 autoencoder (diffusers `AutoencoderKL`) with Flux's latent normalisation."""

    def __init__(self, vae, scale: float | None = None, shift: float | None = None, source: str = ""):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scale = float(scale if scale is not None else cfg.scaling_factor)
        self.shift = float(shift if shift is not None else (cfg.shift_factor or 0.0))
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.source = source
        self.identity = f"FluxAutoencoder:{weights_fingerprint(vae)}:scale={self.scale}:shift={self.shift}"

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype)
        mean = self.vae.encode(x).latent_dist.mean.float()
        return self.scale * (mean - self.shift)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() / self.scale + self.shift
        out = self.vae.decode(z.to(self.device, self.dtype)).sample
        return out.float().clamp(-1.0, 1.0)

    def to(self, device=None, dtype=None) -> FluxAutoencoder:
        self.vae.to(device=device, dtype=dtype)
        return self

    def release(self) -> None:
        self.vae.to("meta")

    # -- loaders --------------------------------------------------------------------------------------------------

    @classmethod
    def from_bfl_file(cls, path, device="cpu", dtype=torch.float32, **config_overrides) -> FluxAutoencoder:
        """BFL `ae.safetensors` (also ldm/ComfyUI VAE files, with or without `first_stage_model.`/`vae.` prefix)."""
        from diffusers import AutoencoderKL

        path = Path(path)
        sd = _read_safetensors(path)
        for prefix in AE_FILE_PREFIXES:
            if any(k.startswith(prefix + "encoder.") for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                break
        try:
            cfg = ae_config_from_bfl(sd, **config_overrides)
            dsd = bfl_to_diffusers_ae(sd, num_up=len(cfg["up_block_types"]))
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        with torch.device("meta"):
            vae = AutoencoderKL(**cfg)
        missing, unexpected = vae.load_state_dict(dsd, strict=False, assign=True)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: autoencoder keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return cls(vae.to(device=device, dtype=dtype), scale=cfg["scaling_factor"], shift=cfg["shift_factor"],
                   source=str(path))

    @classmethod
    def from_pretrained(cls, ref: str, device="cpu", dtype=torch.float32, subfolder: str | None = None):
        """A diffusers `AutoencoderKL` folder, a pipeline folder (its `vae/`), or a hub id (either layout)."""
        from diffusers import AutoencoderKL

        attempts = [subfolder] if subfolder is not None else ["vae", None]
        if Path(ref).is_dir() and subfolder is None:
            attempts = [None] if (Path(ref) / "config.json").exists() else ["vae"]
        err = None
        for sub in attempts:
            try:
                kwargs = {"subfolder": sub} if sub else {}
                vae = AutoencoderKL.from_pretrained(ref, torch_dtype=dtype, **kwargs)
                return cls(vae.to(device), source=ref + (f"/{sub}" if sub else ""))
            except (OSError, ValueError) as e:
                err = e
        where = "" if Path(ref).exists() else " (no such local path; tried as a hub id)"
        raise UserError(f"cannot load the autoencoder from '{ref}'{where}: {_one_line(err)}")


def load_autoencoder(ref: str, device="cpu", dtype=torch.float32) -> Autoencoder:
    """Resolve an autoencoder reference: `toy`, a BFL `.safetensors` file, a diffusers or pipeline folder (a folder
    holding BFL's `ae.safetensors` also works), or a hub id."""
    ref = str(ref)
    named = providers.autoencoder(ref)  # "toy" and other registered stand-ins
    if named is not None:
        return named
    path = Path(ref).expanduser()
    if path.is_file():
        return FluxAutoencoder.from_bfl_file(path, device=device, dtype=dtype)
    if path.is_dir():
        if (path / "config.json").exists() or (path / "vae" / "config.json").exists():
            return FluxAutoencoder.from_pretrained(str(path), device=device, dtype=dtype)
        if (path / "ae.safetensors").exists():
            return FluxAutoencoder.from_bfl_file(path / "ae.safetensors", device=device, dtype=dtype)
        raise UserError(f"{path}: no autoencoder here (expected config.json, vae/config.json or ae.safetensors)")
    if _looks_like_hub_id(ref):
        return FluxAutoencoder.from_pretrained(ref, device=device, dtype=dtype)
    raise UserError(f"autoencoder '{ref}' not found (give a .safetensors file, a diffusers folder, a hub id or 'toy')")


# ---------------------------------------------------------------------------------------------------------------------
# Text encoders


def _resolve_hf(ref: str, subfolder: str, kind: str) -> tuple[str, list[str | None]]:
    """(ref, subfolders to try) for a model+tokenizer pair that may live in a pipeline layout."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), [None]
        if (path / subfolder / "config.json").exists():
            return str(path), [subfolder]
        raise UserError(f"{path}: no {kind} model here (expected config.json or {subfolder}/config.json)")
    if path.is_file():
        raise UserError(f"{path}: give the {kind} as a folder (config.json + weights + tokenizer) or a hub id")
    if _looks_like_hub_id(ref):
        return ref, [None, subfolder]
    raise UserError(f"{kind} '{ref}' not found (give a local folder, a pipeline folder, a hub id or 'toy')")


def _load_pair(ref: str, model_cls, model_sub: str, tok_sub: str, kind: str, dtype):
    from transformers import AutoTokenizer

    root, subs = _resolve_hf(ref, model_sub, kind)
    err = None
    for sub in subs:
        kw = {"subfolder": sub} if sub else {}
        try:
            model = model_cls.from_pretrained(root, dtype=dtype, **kw)
        except (OSError, ValueError) as e:
            err = e
            continue
        tok_err = None
        for tsub in [None] if sub is None else [tok_sub, sub]:  # pipeline: tokenizer_2/ beside text_encoder_2/
            tkw = {"subfolder": tsub} if tsub else {}
            try:
                return model, AutoTokenizer.from_pretrained(root, **tkw)
            except (OSError, ValueError) as e:
                tok_err = e
        raise UserError(f"cannot load the {kind} tokenizer from '{ref}': {_one_line(tok_err)}")
    where = "" if Path(ref).exists() else " (no such local path; tried as a hub id)"
    raise UserError(f"cannot load the {kind} model from '{ref}'{where}: {_one_line(err)}")


def _tokenizer_fingerprint(tok) -> str:
    probe = "a photo of a cat, 1024x1024, Ünïcode!"
    return hashlib.sha256(json.dumps([type(tok).__name__, len(tok), tok(probe)["input_ids"]]).encode()).hexdigest()[:8]


class FluxTextEncoders:
    """T5 (sequence, `context_dim`) + CLIP-L (pooled, `pooled_dim`), as FLUX.1 conditions on them."""

    def __init__(self, t5, t5_tokenizer, clip, clip_tokenizer, max_length: int = T5_MAX_LENGTH["dev"]):
        self.t5 = t5.eval().requires_grad_(False)
        self.clip = clip.eval().requires_grad_(False)
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.max_length = int(max_length)
        self.context_dim = int(t5.config.d_model)
        self.pooled_dim = int(clip.config.hidden_size)
        self.identity = (f"FluxTextEncoders:t5={weights_fingerprint(t5)}/{_tokenizer_fingerprint(t5_tokenizer)}"
                         f":clip={weights_fingerprint(clip)}/{_tokenizer_fingerprint(clip_tokenizer)}"
                         f":len={self.max_length}")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                   return_tensors="pt").input_ids
        txt = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False)[0]
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                       return_tensors="pt").input_ids
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        return txt.float(), pooled.float()

    def to(self, device=None, dtype=None) -> FluxTextEncoders:
        self.t5.to(device=device, dtype=dtype)
        self.clip.to(device=device, dtype=dtype)
        return self

    def release(self) -> None:
        self.t5.to("meta")
        self.clip.to("meta")

    @classmethod
    def from_pretrained(cls, t5_ref: str, clip_ref: str, device="cpu", dtype=torch.float32,
                        max_length: int = T5_MAX_LENGTH["dev"]) -> FluxTextEncoders:
        from transformers import CLIPTextModel, T5EncoderModel

        t5, t5_tok = _load_pair(t5_ref, T5EncoderModel, "text_encoder_2", "tokenizer_2", "T5", dtype)
        clip, clip_tok = _load_pair(clip_ref, CLIPTextModel, "text_encoder", "tokenizer", "CLIP", dtype)
        return cls(t5.to(device), t5_tok, clip.to(device), clip_tok, max_length=max_length)


def load_text_encoder(t5_ref: str, clip_ref: str | None = None, device="cpu", dtype=torch.float32,
                      max_length: int = T5_MAX_LENGTH["dev"]) -> TextEncoder:
    """Resolve the text encoders: `toy`, or T5 and CLIP references (local folders, pipeline folders with
    `text_encoder_2/`+`tokenizer_2/` and `text_encoder/`+`tokenizer/`, or hub ids). `clip_ref` defaults to
    `t5_ref` (one pipeline folder holds both)."""
    t5_ref = str(t5_ref)
    clip_ref = t5_ref if clip_ref is None else str(clip_ref)
    if t5_ref in providers.PROVIDERS or clip_ref in providers.PROVIDERS:
        if t5_ref != clip_ref:
            raise UserError(f"the {t5_ref if t5_ref in providers.PROVIDERS else clip_ref} text encoder replaces both "
                            f"T5 and CLIP: got t5='{t5_ref}', clip='{clip_ref}'")
        return providers.text_encoder(t5_ref)
    return FluxTextEncoders.from_pretrained(t5_ref, clip_ref, device=device, dtype=dtype, max_length=max_length)
