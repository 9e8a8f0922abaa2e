"""LoRA file metadata (the safetensors header, str -> str): the documented keys, the `dev2pro.*` training facts that
trainers record, and the header `save_lora` writes.

Every LoRA we save carries the format (`dev2pro.lora_format`) and kohya-style `ss_network_dim` /
`ss_network_alpha` (the most common rank and alpha: ComfyUI, Forge and civitai show these), plus
`ss_network_module` for kohya files. Values that are not strings are JSON-encoded.

Pitfall: diffusers' `lora_adapter_metadata` is dropped on save: diffusers refuses a file with both it and `.alpha`
keys, and the alphas it describes are in the tensors once the file is written by us.
"""

from __future__ import annotations

import json
from collections import Counter

from dev2pro.lora.inject import LoraWeights

# Metadata written into every LoRA we save (safetensors header, strings). Trainers fill these through
# `training_metadata(...)`; `save_lora` adds the format and kohya-style `ss_network_dim` / `ss_network_alpha`.
METADATA_KEYS: dict[str, str] = {
    "dev2pro.base_model": "name of the base checkpoint the LoRA was trained on (file name or hub id)",
    "dev2pro.base_model_hash": "content hash of the base checkpoint (sha256 of the tensor data, hex)",
    "dev2pro.rank": "LoRA rank (most common, if per-layer ranks differ)",
    "dev2pro.alpha": "LoRA alpha (scale = alpha / rank)",
    "dev2pro.targets": "target preset or comma-separated module regexes",
    "dev2pro.training_guidance": "guidance input value used during training (1.0 on a dev2pro base)",
    "dev2pro.steps": "optimizer steps trained",
    "dev2pro.resolution": "training resolution (target pixel area side, e.g. 1024)",
    "dev2pro.dataset_size": "number of training images",
    "dev2pro.tool_version": "dev2pro version that wrote the file",
    "dev2pro.lora_format": "kohya | diffusers (written by save_lora)",
    "ss_network_dim": "kohya-style rank (written by save_lora)",
    "ss_network_alpha": "kohya-style alpha (written by save_lora)",
    "ss_network_module": "networks.lora_flux (written by save_lora for kohya files)",
}


def training_metadata(*, base_model: str = "", base_model_hash: str = "", rank: int | None = None,
                      alpha: float | None = None, targets=None, training_guidance: float | None = None,
                      steps: int | None = None, resolution=None, dataset_size: int | None = None,
                      tool_version: str | None = None, extra: dict | None = None) -> dict[str, str]:
    """The documented `dev2pro.*` metadata as strings (None fields are left out; `extra` is added as given)."""
    if tool_version is None:
        from dev2pro import __version__ as tool_version
    if targets is not None and not isinstance(targets, str):
        targets = ",".join(targets)
    fields = dict(base_model=base_model, base_model_hash=base_model_hash, rank=rank, alpha=alpha, targets=targets,
                  training_guidance=training_guidance, steps=steps, resolution=resolution,
                  dataset_size=dataset_size, tool_version=tool_version)
    out = {f"dev2pro.{k}": _meta_str(v) for k, v in fields.items() if v not in (None, "")}
    out.update({str(k): _meta_str(v) for k, v in (extra or {}).items()})
    return out


def _meta_str(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def file_metadata(lora: LoraWeights, format: str, metadata: dict | None = None) -> dict[str, str]:
    """The header `save_lora` writes for `lora` in `format`: `metadata` (default `lora.metadata`) as strings, plus the
    format and the kohya-style rank/alpha keys (see module docstring)."""
    meta = {str(k): _meta_str(v) for k, v in (lora.metadata if metadata is None else metadata).items()}
    meta.pop("lora_adapter_metadata", None)  # diffusers refuses files with both this and .alpha keys
    ranks = Counter(lora.ranks().values())
    alphas = Counter(lora.alphas().values())
    meta.update({"format": "pt", "dev2pro.lora_format": format})
    if ranks:
        meta["ss_network_dim"] = str(ranks.most_common(1)[0][0])
        meta["ss_network_alpha"] = format_number(alphas.most_common(1)[0][0])
    if format == "kohya":
        meta.setdefault("ss_network_module", "networks.lora_flux")
    return meta


def format_number(x: float) -> str:
    """`4.0` -> `4`, `0.5` -> `0.5` (ranks and alphas as people write them)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ---------------------------------------------------------------------------------------------------------------------
# What Civitai, ComfyUI LoRA managers and Forge read: kohya `ss_*` training keys, `modelspec.*` (Stability's model
# spec 1.0.0, as kohya writes it for Flux), and the `sshs_*` content hashes of sd-webui-additional-networks.

FLUX_DEV_ARCHITECTURE = "flux-1-dev/lora"  # kohya sai_model_spec: ARCH_FLUX_1_DEV + "/lora"
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"


def kohya_metadata(*, output_name: str, steps: int, max_steps: int, started_at: float, finished_at: float,
                   resolution: int | None = None, trigger: str = "", training_guidance: float | None = None,
                   base_model: str = "", learning_rate: float | None = None, optimizer: str = "",
                   lr_scheduler: str = "", seed: int | None = None, batch_size: int | None = None,
                   data: dict | None = None, extra: dict | None = None) -> dict[str, str]:
    """The kohya `ss_*` and `modelspec.*` keys of a Flux LoRA (see the module's section comment). `data` may hold
    `tag_frequency`, `dataset_dirs`, `num_train_images`, `num_reg_images`, `caption_dropout`, `keep_tokens`,
    `shuffle_caption`, `flip` (what the dataset scan knows); missing ones are left out. Times are `time.time()`
    values (kohya writes them as such; modelspec.date is the finish time in ISO 8601)."""
    import datetime

    data = data or {}
    ss = {
        "ss_output_name": output_name, "ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux",
        "ss_steps": steps, "ss_max_train_steps": max_steps, "ss_training_started_at": started_at,
        "ss_training_finished_at": finished_at, "ss_sd_model_name": base_model, "ss_learning_rate": learning_rate,
        "ss_optimizer": optimizer, "ss_lr_scheduler": lr_scheduler, "ss_seed": seed,
        "ss_batch_size_per_device": batch_size, "ss_guidance_scale": training_guidance,
        "ss_resolution": f"({resolution}, {resolution})" if resolution else None,
        "ss_tag_frequency": data.get("tag_frequency"), "ss_dataset_dirs": data.get("dataset_dirs"),
        "ss_num_train_images": data.get("num_train_images"), "ss_num_reg_images": data.get("num_reg_images"),
        "ss_caption_dropout_rate": data.get("caption_dropout"), "ss_keep_tokens": data.get("keep_tokens"),
        "ss_shuffle_caption": data.get("shuffle_caption"), "ss_flip_aug": data.get("flip"),
    }
    spec = {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": FLUX_DEV_ARCHITECTURE,
        "modelspec.implementation": FLUX_IMPLEMENTATION, "modelspec.title": output_name,
        "modelspec.date": datetime.datetime.fromtimestamp(finished_at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{resolution}x{resolution}" if resolution else None,
        "modelspec.trigger_phrase": trigger or None,
        "modelspec.description": (f"FLUX.1 LoRA trained with dev2pro at guidance input {training_guidance}"
                                  if training_guidance is not None else None),
    }
    out = {k: _meta_str(v) for k, v in {**ss, **spec}.items() if v not in (None, "")}
    out.update({str(k): _meta_str(v) for k, v in (extra or {}).items()})
    return out


def sshs_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` / `sshs_legacy_hash` as kohya sd-scripts computes them (train_util
    `precalculate_safetensors_hashes`): serialise the tensors with only the `ss_*` metadata; the model hash is the
    sha256 of everything after the header (the tensor bytes, so it equals that part of the file we write), the legacy
    hash the first 8 hex digits of the sha256 of 64 KiB at offset 1 MiB (empty for files under 1 MiB)."""
    import hashlib

    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(blob[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}
