"""One path for a whole model (`model.path`), and the pre-flight check of every component before any work starts.

`fill_from_path` turns `model.path` into the parts a recipe needs, each overridable by its own key:

- an HF snapshot folder (FLUX.1-dev / schnell layout): `transformer/` -> base, `text_encoder_2/` -> T5,
  `text_encoder/` -> CLIP, `vae/` (or BFL's `ae.safetensors`) -> autoencoder, `tokenizer/` + `tokenizer_2/` ->
  tokenizers. A part the folder lacks and no key gives is an error naming the key to set.
- a full ComfyUI checkpoint file (`model.diffusion_model.`, `vae.`, `text_encoders.clip_l/t5xxl.transformer.`):
  each part the file holds.
- a hub id (`black-forest-labs/FLUX.1-dev`): every part is that id (loaders use its subfolders; the transformer is
  fetched with `huggingface_hub.snapshot_download`, see `dev2pro.flux.sources.resolve_ref`).
- a path that does not exist: the parts it would give are that path, so a config with placeholder paths still
  loads (and its resolved form round-trips); `preflight` fails on `model.path` if any part is still taken from it
  (when every part is given by its own key the placeholder is simply unused).

`preflight` reads headers and config.json files only (seconds, no weights): the base's architecture, the width of
T5 against the base's `context_in_dim` (4096 for FLUX.1), CLIP's against `vec_in_dim` (768), the autoencoder's latent
channels against `in_channels` / 4, and the tokenizers single encoder files need. So a wrong path or a mismatched
encoder fails before an hour of caching, not after. Hub ids are not checked here (that would download them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dev2pro.errors import CheckpointError, ConfigError
from dev2pro.flux import providers
from dev2pro.flux.encoders import looks_like_hub_id

PARTS = ("base", "t5", "clip", "autoencoder", "tokenizers")
SNAPSHOT = {"base": ("transformer",), "t5": ("text_encoder_2",), "clip": ("text_encoder",),
            "autoencoder": ("vae", "ae.safetensors"), "tokenizers": ("tokenizer", "tokenizer_2")}
WHAT = {"base": "the transformer", "t5": "T5", "clip": "CLIP-L", "autoencoder": "the autoencoder",
        "tokenizers": "the tokenizers"}
COMFY_VAE_KEY = "vae.encoder.conv_in.weight"


@dataclass(frozen=True)
class Parts:
    base: str | None = None
    t5: str | None = None
    clip: str | None = None
    autoencoder: str | None = None
    tokenizers: str | None = None


def fill_from_path(path: str | None, **given: str | None) -> Parts:
    """The parts of `model.path` (see the module docstring) with every part given explicitly kept as it is."""
    given = {k: given.get(k) for k in PARTS}
    if not path:
        return Parts(**given)
    p = Path(path).expanduser()
    if p.is_dir():
        found = {k: str(p) for k, subs in SNAPSHOT.items() if any((p / s).exists() for s in subs)}
        for k in ("base", "t5", "clip", "autoencoder"):
            if given[k] is None and k not in found:
                raise ConfigError(f"model.path = {path} has no {' or '.join(s + '/' for s in SNAPSHOT[k])} "
                                  f"({WHAT[k]}): set model.{k} to {WHAT[k]}'s file or folder")
    elif p.is_file():
        found = _checkpoint_parts(p)
    elif looks_like_hub_id(str(path)):
        found = dict.fromkeys(PARTS, str(path))
    else:  # not there (yet): the parts it would give are the path itself; `preflight` fails if one is used
        found = dict.fromkeys(PARTS[:-1], str(path))
    return Parts(**{k: given[k] if given[k] is not None else found.get(k) for k in PARTS})


def _checkpoint_parts(p: Path) -> dict[str, str]:
    from dev2pro.flux.encoder_files import encoder_kinds
    from dev2pro.flux.safetensors_io import read_header

    keys = read_header(p).tensors
    found = {k: str(p) for k in encoder_kinds(p)}
    if any(k.startswith("model.diffusion_model.") for k in keys):
        found["base"] = str(p)
    if COMFY_VAE_KEY in keys:
        found["autoencoder"] = str(p)
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Pre-flight


def _config_json(folder: Path, subs: tuple[str, ...], key: str, ref: str) -> dict:
    for sub in ("", *subs):
        f = folder / sub / "config.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{key} = {ref}: unreadable {f} ({e})") from None
    raise ConfigError(f"{key} = {ref}: no config.json here or in {'/, '.join(subs)}/ ({WHAT[key.split('.')[1]]})")


def _local(ref: str, key: str) -> Path | None:
    """Path of a local reference; None for a hub id; ConfigError when it is neither."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if looks_like_hub_id(ref):
        return None
    raise ConfigError(f"{key} = {ref}: no such file or folder")


def text_width(kind: str, ref: str, key: str) -> int | None:
    """T5's d_model / CLIP's hidden size of an encoder reference, from headers or config.json (None for hub ids)."""
    if ref in providers.PROVIDERS:
        enc = providers.text_encoder(ref)
        return enc.context_dim if kind == "t5" else enc.pooled_dim
    p = _local(ref, key)
    if p is None:
        return None
    if p.is_file():
        from dev2pro.flux.encoder_files import clip_config, open_encoder_file, t5_config

        try:
            enc = open_encoder_file(p, kind)
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from None
        try:
            return t5_config(enc)[0].d_model if kind == "t5" else clip_config(enc)[0].hidden_size
        finally:
            enc.close()
    cfg = _config_json(p, SNAPSHOT[kind], key, ref)
    cfg = cfg.get("text_config", cfg)
    return cfg.get("d_model") if kind == "t5" else cfg.get("hidden_size")


def latent_channels(ref: str, key: str = "model.autoencoder") -> int | None:
    """Latent channels of an autoencoder reference (16 for Flux), from headers or config.json."""
    if ref in providers.PROVIDERS:
        return providers.autoencoder(ref).latent_channels
    p = _local(ref, key)
    if p is None:
        return None
    if p.is_dir() and (p / "ae.safetensors").is_file() and not (p / "vae").is_dir():
        p = p / "ae.safetensors"
    if p.is_file():
        from dev2pro.flux.ae_keymap import AE_FILE_PREFIXES
        from dev2pro.flux.safetensors_io import read_header

        try:
            tensors = read_header(p).tensors
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from None
        for prefix in ("", *AE_FILE_PREFIXES):
            info = tensors.get(prefix + "encoder.conv_out.weight")
            if info is not None:
                return info.shape[0] // 2  # mean and log-variance
        raise ConfigError(f"{key} = {ref}: not an autoencoder file (no encoder.conv_out.weight)")
    return _config_json(p, ("vae",), key, ref).get("latent_channels")


def base_spec(ref: str, key: str = "model.base"):
    """The `FluxSpec` of a base reference from its header (None for a hub id)."""
    from dev2pro.flux.checkpoint import parse_preset_ref
    from dev2pro.flux.describe import read_spec
    from dev2pro.flux.sources import resolve_ref

    if ref.startswith("preset:"):
        return parse_preset_ref(ref)[0]
    path = resolve_ref(ref, download=False)
    if not path.exists():
        if looks_like_hub_id(ref):
            return None
        raise ConfigError(f"{key} = {ref}: no such file or folder")
    try:
        return read_spec(path)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None


def preflight(parts: Parts, model_path: str | None = None) -> dict[str, int | None]:
    """Check every part of `parts` that is set (existence, architecture, widths against the base, tokenizers of single
    encoder files) from headers only; ConfigError naming the key on the first problem. Returns what was read."""
    used = model_path and any(getattr(parts, k) == str(model_path) for k in PARTS)
    if used and not Path(model_path).expanduser().exists() and not looks_like_hub_id(str(model_path)):
        raise ConfigError(f"model.path = {model_path}: no such folder or file (give a FLUX.1 folder as downloaded "
                          "from the hub, a full ComfyUI checkpoint, or a hub id)")
    spec = base_spec(parts.base) if parts.base else None
    seen = {"t5": text_width("t5", parts.t5, "model.t5") if parts.t5 else None,
            "clip": text_width("clip", parts.clip, "model.clip") if parts.clip else None,
            "latent": latent_channels(parts.autoencoder) if parts.autoencoder else None}
    if spec is not None:
        want = {"t5": (spec.context_in_dim, "context_in_dim (the T5 width; 4096 = T5-XXL for FLUX.1)"),
                "clip": (spec.vec_in_dim, "vec_in_dim (the CLIP width; 768 = CLIP-L for FLUX.1)"),
                "latent": (spec.in_channels // 4, "in_channels / 4 (16 latent channels for FLUX.1)")}
        keys = {"t5": "model.t5", "clip": "model.clip", "latent": "model.autoencoder"}
        for k, (need, what) in want.items():
            if seen[k] is not None and seen[k] != need:
                ref = getattr(parts, keys[k].split(".")[1])
                raise ConfigError(f"{keys[k]} = {ref} gives width {seen[k]}, but model.base = {parts.base} takes "
                                  f"{need} as {what}: use the component the base was trained with")
    from dev2pro.flux.tokenizers import load_tokenizer

    for kind in ("t5", "clip"):
        ref = getattr(parts, kind)
        if ref and ref not in providers.PROVIDERS and Path(ref).expanduser().is_file():
            load_tokenizer(kind, [("model.tokenizers", parts.tokenizers), ("model.path", model_path)], ref)
    return {"context_in_dim": seen["t5"], "vec_in_dim": seen["clip"], "latent_channels": seen["latent"]}
