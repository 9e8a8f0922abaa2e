"""A human summary of a LoRA file, for `dev2pro inspect` and `dev2pro lora inspect`: format, module count, ranks and
alphas (canonical and as stored), which kinds of layers and which blocks it covers, the metadata.

Pitfall: ranks are reported twice on purpose: a fused kohya entry (qkv, linear1) read as a block-diagonal layout
has rank 3r in the file but r per canonical layer.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from dev2pro.lora.files import load_lora
from dev2pro.lora.metadata import format_number

_CATEGORIES = (
    ("attention", re.compile(r"attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)$")),
    ("mlp", re.compile(r"(ff|ff_context)\.net\.\d|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$")),
    ("modulation", re.compile(r"(norm1|norm1_context|norm|norm_out)\.linear$")),
    ("embedders", re.compile(r"^(x_embedder|context_embedder|time_text_embed\.)")),
    ("output", re.compile(r"^proj_out$")),
)


def layer_category(path: str) -> str:
    for name, pat in _CATEGORIES:
        if pat.search(path):
            return name
    return "other"


def _summary_counts(values) -> str:
    c = Counter(values)
    if len(c) == 1:
        v = next(iter(c))
        return f"{format_number(v)} (all {c[v]} layers)"
    return ", ".join(f"{format_number(v)} x{n}" for v, n in sorted(c.items()))


def _block_ranges(paths, prefix: str) -> str:
    idx = sorted({int(m.group(1)) for p in paths if (m := re.match(rf"^{prefix}\.(\d+)\.", p))})
    if not idx:
        return ""
    ranges, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            ranges.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(ranges)


def describe_lora(path) -> str:
    """A multi-line human summary: format, module count, ranks, alphas, covered layer kinds and blocks, metadata."""
    lora = load_lora(path)
    tensors_dtypes = Counter()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        for k in keys[:64]:
            tensors_dtypes[str(f.get_slice(k).get_dtype())] += 1
        downs = [k for k in keys if k.endswith((".lora_down.weight", ".lora_A.weight", ".down.weight"))
                 and k not in lora.passthrough]
        file_ranks = [f.get_slice(k).get_shape()[0] for k in downs]
    n_keys = len(keys)
    n_file_modules = len(downs)
    size = Path(path).stat().st_size
    paths = list(lora.layers)
    cats = Counter(layer_category(p) for p in paths)
    scales = Counter(round(layer.scale, 6) for layer in lora.layers.values())
    lines = [
        f"file: {path} ({size / 2**20:.1f} MiB, {n_keys} tensors, {', '.join(sorted(tensors_dtypes))})",
        f"format: {lora.source_format}",
        f"modules: {len(paths)} (diffusers naming) from {n_file_modules} LoRA modules in the file, "
        f"{lora.num_params():,} LoRA parameters",
        f"rank: {_summary_counts(lora.ranks().values())}",
        f"rank of the file's entries: {_summary_counts(file_ranks)}",
        f"alpha: {_summary_counts(lora.alphas().values())}",
        f"scale (alpha/rank): {_summary_counts(scales.elements())}",
        "covers: " + ", ".join(f"{k} {v}" for k, v in sorted(cats.items())),
    ]
    double, single = _block_ranges(paths, "transformer_blocks"), _block_ranges(paths, "single_transformer_blocks")
    lines.append(f"blocks: double {double or '-'}; single {single or '-'}")
    if lora.passthrough:
        lines.append(f"text encoder: {len(lora.passthrough)} tensors (carried to kohya output, not applied)")
    meta = {k: v for k, v in lora.metadata.items() if k != "format"}
    if meta:
        lines.append("metadata:")
        for k in sorted(meta):
            v = meta[k].replace("\n", " ")
            lines.append(f"  {k} = {v if len(v) <= 100 else v[:97] + '...'}")
    return "\n".join(lines)
