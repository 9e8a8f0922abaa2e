"""LoRA files: read any supported Flux LoRA (kohya, diffusers/peft, ComfyUI, XLabs; see `dev2pro.lora.formats` for
the key layouts) into canonical fp32 `LoraWeights`, and write kohya or diffusers files.

Reading detects the format from the key names, groups tensors by module (down/up/alpha), and fails loudly with the
values involved: a missing down or up, conv/LoCon/LoKr shapes, keys that are not Flux transformer modules, a module
given twice (e.g. a kohya file naming one layer by both its BFL and its diffusers path). Only safetensors is read:
pickled .pt/.ckpt/.bin files can run code when loaded. Text-encoder tensors are carried (`LoraWeights.passthrough`)
and written back to kohya files, never applied.

Pitfall: diffusers/peft files without `.alpha` keys take alpha from diffusers' `lora_adapter_metadata` header when
present (`lora_alpha`, `alpha_pattern`, `use_rslora`), else alpha = rank (`dev2pro.lora.metadata.file_metadata`
drops that header on save).

Writing is atomic (temp file in the same folder, fsync, rename): an interrupted save never leaves a truncated LoRA.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch

from dev2pro.errors import CheckpointError
from dev2pro.flux import keymap
from dev2pro.flux.value_check import check_tensor
from dev2pro.lora.formats import bfl_lora_to_layers, kohya_name_to_bfl, kohya_name_to_diffusers, to_state_dict
from dev2pro.lora.inject import LoraLayer, LoraWeights
from dev2pro.lora.metadata import file_metadata, sshs_hashes

# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    if path.suffix not in (".safetensors", ".sft"):
        raise CheckpointError(f"{path}: only .safetensors LoRA files are supported (pickled .pt/.ckpt/.bin files can "
                              "run code when loaded; convert them to safetensors first)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: check_tensor(f.get_tensor(k), path, k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, meta


_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder(_2)?\.|lora_te_)")


def detect_format(keys) -> str:
    """kohya | diffusers | comfyui | xlabs | unknown, from the key names."""
    keys = [k for k in keys if not _TEXT_ENCODER.match(k)]
    if not keys:
        return "unknown"
    if any(k.startswith(("lora_unet_", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(".processor." in k and ("qkv_lora" in k or "proj_lora" in k) for k in keys):
        return "xlabs"
    stripped = [_strip_comfy(k) for k in keys]
    if any(s != k for s, k in zip(stripped, keys)) or any(
            s.startswith(("double_blocks.", "single_blocks.")) for s in stripped):
        return "comfyui"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    return "unknown"


def _strip_comfy(key: str) -> str:
    for p in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(p):
            return key[len(p):]
    return key


_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".down.weight": "down", ".up.weight": "up", ".alpha": "alpha",
}


def _group_by_module(tensors: dict[str, torch.Tensor], strip) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in tensors.items():
        for suf, role in _SUFFIXES.items():
            if key.endswith(suf):
                modules.setdefault(strip(key[: -len(suf)]), {})[role] = t
                break
        else:
            bad.append(key)
    return modules, bad


def _entry(path: str, name: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    if "down" not in parts or "up" not in parts:
        raise CheckpointError(f"{path}: LoRA module '{name}' lacks its {'down' if 'down' not in parts else 'up'} "
                              "weight")
    down, up = parts["down"].to(torch.float32), parts["up"].to(torch.float32)
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise CheckpointError(f"{path}: LoRA module '{name}' has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                              "expected (rank, in) and (out, rank) (conv/LoCon/LoKr layers are not supported)")
    alpha = float(parts["alpha"].to(torch.float32).item()) if "alpha" in parts else None
    return down, up, alpha


def _unknown(path, keys: list[str], fmt: str):
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    raise CheckpointError(f"{path}: {len(keys)} keys are not Flux transformer LoRA keys for a {fmt} file, e.g. "
                          f"{', '.join(keys[:4])}{more}")


def load_lora(path) -> LoraWeights:
    """Read a Flux LoRA in any supported format as canonical fp32 `LoraWeights` (`.metadata` holds the header,
    `.source_format` the detected format, `.passthrough` text-encoder tensors we carry but do not use)."""
    tensors, meta = _read_safetensors(path)
    passthrough = {k: v for k, v in tensors.items() if _TEXT_ENCODER.match(k)}
    tensors = {k: v for k, v in tensors.items() if k not in passthrough}
    fmt = detect_format(tensors)
    if fmt == "unknown":
        raise CheckpointError(f"{path}: not a recognised Flux LoRA (no lora_unet_*, transformer.*.lora_A/B, "
                              f"diffusion_model.* or XLabs processor keys); first keys: {list(tensors)[:3]}")
    layers: dict[str, LoraLayer] = {}

    def put(new: dict[str, LoraLayer]):
        for k, v in new.items():
            if k in layers:
                raise CheckpointError(f"{path}: module '{k}' is given twice")
            layers[k] = v

    if fmt in ("kohya", "comfyui"):
        if fmt == "kohya":
            modules, bad = _group_by_module(tensors, lambda s: s)
            bfl_names, diffusers_names = {}, {}
            for name in modules:
                if name.startswith("lora_transformer_"):
                    path_ = kohya_name_to_diffusers(name.removeprefix("lora_transformer_"))
                    if path_ is None:
                        bad.append(name)
                    else:
                        diffusers_names[name] = path_
                    continue
                bfl = kohya_name_to_bfl(name.removeprefix("lora_unet_")) if name.startswith("lora_unet_") else None
                if bfl is None:
                    bad.append(name)
                else:
                    bfl_names[name] = bfl
            for name, dpath in diffusers_names.items():
                down, up, alpha = _entry(path, name, modules[name])
                put({dpath: LoraLayer(down, up, down.shape[0] if alpha is None else alpha)})
        else:
            modules, bad = _group_by_module(tensors, _strip_comfy)
            bfl_names = {}
            for name in modules:
                try:
                    keymap.bfl_module_to_diffusers(64, name)
                    bfl_names[name] = name
                except KeyError:
                    bad.append(name)
        if bad:
            _unknown(path, bad, fmt)
        for name, bfl in bfl_names.items():
            down, up, alpha = _entry(path, name, modules[name])
            try:
                put(bfl_lora_to_layers(bfl, down, up, down.shape[0] if alpha is None else alpha))
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {name}: {e}") from None
    elif fmt == "xlabs":
        modules, bad = _group_by_module(tensors, _strip_comfy)
        xl = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)$")
        for name, parts in modules.items():
            m = xl.match(name)
            if m is None or (m.group(1) == "double_blocks") != bool(m.group(4)):
                bad.append(name)
                continue
            kind, i, what, stream = m.groups()
            if kind == "double_blocks":
                bfl = f"double_blocks.{i}.{'img' if stream == '1' else 'txt'}_attn.{what}"
                pieces = None
            else:
                bfl = f"single_blocks.{i}.{'linear1' if what == 'qkv' else 'linear2'}"
                pieces = 3 if what == "qkv" else None
            down, up, alpha = _entry(path, name, parts)
            put(bfl_lora_to_layers(bfl, down, up, down.shape[0] if alpha is None else alpha, pieces))
        if bad:
            _unknown(path, bad, fmt)
    else:  # diffusers / peft
        def strip(name: str) -> str:
            for p in ("base_model.model.", "transformer.", "unet."):
                name = name.removeprefix(p)
            return name
        modules, bad = _group_by_module(tensors, strip)
        peft_alpha = _peft_metadata_alphas(meta)
        for name, parts in modules.items():
            try:
                keymap.diffusers_module_to_bfl(name)
            except KeyError:
                bad.append(name)
                continue
            down, up, alpha = _entry(path, name, parts)
            if alpha is None:
                alpha = peft_alpha(name, down.shape[0])
            put({name: LoraLayer(down, up, alpha)})
        if bad:
            _unknown(path, bad, fmt)
    return LoraWeights(layers=layers, metadata=meta, source_format=fmt, passthrough=passthrough)


def _peft_metadata_alphas(meta: dict[str, str]):
    """alpha lookup from diffusers' `lora_adapter_metadata` header (LoraConfig fields, prefixed `transformer.`)."""
    raw = meta.get("lora_adapter_metadata")
    cfg = {}
    if raw:
        try:
            cfg = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
        except (ValueError, AttributeError):
            cfg = {}

    def alpha(name: str, rank: int) -> float:
        a = cfg.get("lora_alpha")
        for pat, v in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pat.lstrip('^')})$", name):
                a = v
        if a is None:
            return float(rank)
        if cfg.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
            return float(a) * math.sqrt(rank)
        return float(a)

    return alpha


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with __import__("contextlib").suppress(OSError):
            os.unlink(tmp)
        raise


def save_lora(path, lora: LoraWeights, format: str = "kohya", metadata: dict | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write `lora` as a `format` ("kohya" | "diffusers") safetensors file, atomically (temp file + rename).

    `metadata` (str -> str; other values are JSON-encoded) defaults to `lora.metadata`; the format,
    `ss_network_dim`/`ss_network_alpha` (most common rank/alpha), for kohya `ss_network_module`, and kohya's
    `sshs_model_hash`/`sshs_legacy_hash` of the tensors written (`dev2pro.lora.metadata.sshs_hashes`) are added.
    Text-encoder tensors carried from a kohya file are written back in kohya format and dropped in diffusers format."""
    path = Path(path)
    sd = to_state_dict(lora, format, dtype)
    meta = file_metadata(lora, format, metadata)
    meta.update(sshs_hashes(sd, meta))
    _atomic_save(sd, path, meta)
    return path
