"""The FLUX.1 autoencoder (diffusers `AutoencoderKL`) with Flux's latent normalisation, and `load_autoencoder`, the
resolver recipes and commands call (`toy`, a BFL `ae.safetensors` or ldm/ComfyUI VAE file, a diffusers or pipeline
folder, a hub id). It implements `dev2pro.flux.encoders.Autoencoder`.

Reference: BFL flux/modules/autoencoder.py (scale 0.3611, shift 0.1159; `AutoEncoder.encode` samples, we use the
mean, as every trainer caches it). BFL files are read with the key table of `dev2pro.flux.ae_keymap`; the diffusers
config is inferred from their shapes (`ae_config_from_bfl`). Pitfall: the group-norm group count is not stored in
the weights (32 for Flux).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import providers
from dev2pro.flux.ae_keymap import AE_FILE_PREFIXES, bfl_to_diffusers_ae
from dev2pro.flux.encoders import PICKLE_SUFFIXES, Autoencoder, looks_like_hub_id, one_line, weights_fingerprint
from dev2pro.flux.value_check import check_module, check_tensor

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


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle checkpoints are not loaded (unsafe); convert it to .safetensors first")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _check_not_pickle(path)
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise CheckpointError(f"{path}: cannot read as safetensors ({str(e).splitlines()[0]})") from None
    for key, t in sd.items():
        check_tensor(t, path, key)
    return sd


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
                check_module(vae, ref + (f"/{sub}" if sub else ""))
                return cls(vae.to(device), source=ref + (f"/{sub}" if sub else ""))
            except (OSError, ValueError) as e:
                err = e
        where = "" if Path(ref).exists() else " (no such local path; tried as a hub id)"
        raise UserError(f"cannot load the autoencoder from '{ref}'{where}: {one_line(err)}")


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
    if looks_like_hub_id(ref):
        return FluxAutoencoder.from_pretrained(ref, device=device, dtype=dtype)
    raise UserError(f"autoencoder '{ref}' not found (give a .safetensors file, a diffusers folder, a hub id or 'toy')")

