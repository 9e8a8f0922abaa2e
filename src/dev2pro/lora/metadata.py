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
