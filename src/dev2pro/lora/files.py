"""LoRA files: read kohya, diffusers/peft, ComfyUI and XLabs Flux LoRAs into `LoraWeights`; write kohya or diffusers.

Formats (all safetensors; `delta W = alpha / rank * up @ down`):

- kohya (sd-scripts `networks/lora_flux.py`; what ComfyUI and Forge load): `lora_unet_<BFL module path, '.' -> '_'>`
  with `.lora_down.weight` (r, in), `.lora_up.weight` (out, r), `.alpha` (scalar). BFL fuses q/k/v
  (`double_blocks_N_img_attn_qkv`) and, in single blocks, q/k/v plus the MLP input (`single_blocks_N_linear1`).
  A fused LoRA is stored in one of two layouts:
    * shared: one down (r, in) for all pieces, up rows stacked (what kohya trains by default);
    * block-diagonal ("split qkv"): down = cat(A_q, A_k, A_v) (3r, in), up = block-diagonal (out, 3r), alpha scaled
      by 3 so that alpha / rank is unchanged (kohya `split_qkv`, and what we write for separately trained q/k/v).
  On reading, a fused up whose non-zero columns form disjoint blocks per piece is split back into separate LoRAs
  (exact round trip); otherwise each piece gets the shared down. A piece whose up rows are all zero while the others
  are not is absent (e.g. `proj_mlp` when only attention was trained).
- diffusers / peft (also ai-toolkit, SimpleTuner): `transformer.<diffusers module path>.lora_A.weight` /
  `.lora_B.weight`, optional `.alpha`; without alpha keys alpha = rank (peft's convention), unless diffusers'
  `lora_adapter_metadata` header says otherwise. We write `.alpha` keys only when some alpha differs from its rank:
  diffusers' `FluxPipeline.load_lora_weights` and ComfyUI read them.
- kohya-style keys on diffusers modules (OneTrainer): `lora_transformer_<diffusers module path, '.' -> '_'>` with
  lora_down/lora_up/alpha; read only.
- ComfyUI: `diffusion_model.<BFL module path>` (optionally `model.` in front) with lora_down/lora_up or
  lora_A/lora_B, optional `.alpha`.
- XLabs (XLabs-AI/x-flux `DoubleStreamBlockLoraProcessor` / `SingleStreamBlockLoraProcessor`):
  `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (1 = image stream, 2 = text stream) and
  `single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight` (qkv = first 3h rows of linear1, proj = linear2).
  No alpha stored: scale 1 (alpha = rank).

The BFL <-> diffusers module correspondence (fused pieces, the final layer's shift/scale swap) comes from
`dev2pro.flux.keymap`; this module only adds LoRA-specific handling of the fused layouts.
Reference: diffusers `loaders/lora_conversion_utils.py` (`_convert_kohya_flux_lora_to_diffusers`,
`_convert_xlabs_flux_lora_to_diffusers`): our tests use it as an oracle.
Pitfall: diffusers' kohya converter hard-codes Flux-dev sizes (3072 / 12288) for linear1; ours reads the sizes from
the tensors (the down's input width is the hidden size of every fused layer).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import torch

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import keymap
from dev2pro.lora.inject import LoraLayer, LoraWeights

FORMATS = ("kohya", "diffusers")

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


# ---------------------------------------------------------------------------------------------------------------------
# Fused layouts (pure functions on tensors)


def split_fused(down: torch.Tensor, up: torch.Tensor, alpha: float, names: list[str], sizes: list[int]
                ) -> dict[str, LoraLayer]:
    """Split one LoRA on a fused linear (up rows = pieces of `sizes`) into one LoRA per piece `names`.

    Block-diagonal up (each piece's non-zero columns inside its own contiguous column block, blocks covering all
    columns in order) -> separate LoRAs with rank = block width and alpha scaled so alpha / rank is kept; anything
    else -> every piece shares `down`. Pieces with all-zero up rows are dropped unless every piece is zero."""
    rank = down.shape[0]
    if up.shape[0] != sum(sizes):
        raise CheckpointError(f"fused LoRA up has {up.shape[0]} rows, expected {sum(sizes)} = {sizes}")
    ups = torch.split(up, list(sizes), dim=0)
    nonzero = [i for i, u in enumerate(ups) if bool((u != 0).any())]
    blocks = _column_blocks(ups, nonzero, rank)
    if blocks is not None:
        return {names[i]: LoraLayer(down[lo:hi].clone(), ups[i][:, lo:hi].clone(), alpha * (hi - lo) / rank)
                for i, (lo, hi) in zip(nonzero, blocks)}
    keep = nonzero or list(range(len(names)))
    return {names[i]: LoraLayer(down.clone(), ups[i].clone(), alpha) for i in keep}


def _column_blocks(ups, nonzero: list[int], rank: int) -> list[tuple[int, int]] | None:
    if len(nonzero) < 2:
        return None
    supports = [torch.nonzero((ups[i] != 0).any(dim=0)).flatten().tolist() for i in nonzero]
    n = len(nonzero)
    if rank % n == 0:  # equal blocks (kohya split_qkv, diffusers' `is_sparse` rule)
        w = rank // n
        if all(all(j * w <= c < (j + 1) * w for c in s) for j, s in enumerate(supports)):
            return [(j * w, (j + 1) * w) for j in range(n)]
    blocks, start = [], 0  # unequal ranks: contiguous ranges from the supports themselves
    for s in supports:
        lo, hi = min(s), max(s) + 1
        if lo != start:
            return None
        blocks.append((lo, hi))
        start = hi
    return blocks if start == rank else None


def fuse_pieces(pieces: dict[int, LoraLayer], sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Inverse of `split_fused`: LoRAs on pieces (index -> LoraLayer; missing pieces are zero) -> (down, up, alpha)
    of one LoRA on the fused linear. Shared layout when all pieces have the same down and alpha, block-diagonal
    otherwise (alpha = alpha_0 * R / r_0; a piece with a different alpha / rank has its up rescaled to match)."""
    order = sorted(pieces)
    first = pieces[order[0]]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    shared = all(torch.equal(pieces[i].down, first.down) and pieces[i].alpha == first.alpha for i in order)
    if shared:
        up = first.up.new_zeros(sum(sizes), first.rank)
        for i in order:
            up[offsets[i]:offsets[i] + sizes[i]] = pieces[i].up
        return first.down.clone(), up, float(first.alpha)
    total = sum(pieces[i].rank for i in order)
    ratio = first.alpha / first.rank
    down = torch.cat([pieces[i].down for i in order], dim=0)
    up = first.up.new_zeros(sum(sizes), total)
    col = 0
    for i in order:
        p = pieces[i]
        factor = (p.alpha / p.rank) / ratio
        up[offsets[i]:offsets[i] + sizes[i], col:col + p.rank] = p.up if factor == 1.0 else p.up * factor
        col += p.rank
    return down, up, first.alpha * total / first.rank


# ---------------------------------------------------------------------------------------------------------------------
# BFL module paths <-> canonical (diffusers) layers


def _kohya_name_table() -> list[tuple[re.Pattern, str]]:
    """kohya names are BFL module paths with '.' -> '_'; recover the dots from keymap's module templates."""
    table = []
    for bfl, _, kind, _ in keymap.MODULE_RULES:
        if kind == "norm":
            continue
        pat = re.escape(bfl.replace(".", "_")).replace(re.escape("{i}"), r"(?P<i>\d+)")
        table.append((re.compile("^" + pat + "$"), bfl))
    return table


_KOHYA_TABLE = _kohya_name_table()


def _kohya_diffusers_table() -> list[tuple[re.Pattern, str]]:
    """`lora_transformer_<diffusers module path, '.' -> '_'>` (OneTrainer-style kohya keys on diffusers modules)."""
    table = []
    for _, diffusers, kind, _ in keymap.MODULE_RULES:
        if kind == "norm":
            continue
        for d in diffusers:
            pat = re.escape(d.replace(".", "_")).replace(re.escape("{i}"), r"(?P<i>\d+)")
            table.append((re.compile("^" + pat + "$"), d))
    return table


_KOHYA_DIFFUSERS_TABLE = _kohya_diffusers_table()


def kohya_name_to_diffusers(name: str) -> str | None:
    """`single_transformer_blocks_0_attn_to_q` -> `single_transformer_blocks.0.attn.to_q` (None if unknown)."""
    for pat, path in _KOHYA_DIFFUSERS_TABLE:
        m = pat.match(name)
        if m:
            i = m.groupdict().get("i")
            return path.replace("{i}", i) if i is not None else path
    return None


def kohya_name_to_bfl(name: str) -> str | None:
    """`double_blocks_0_img_attn_qkv` -> `double_blocks.0.img_attn.qkv` (None when not a Flux module)."""
    for pat, bfl in _KOHYA_TABLE:
        m = pat.match(name)
        if m:
            i = m.groupdict().get("i")
            return bfl.replace("{i}", i) if i is not None else bfl
    return None


def bfl_lora_to_layers(bfl_path: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
                       pieces: int | None = None) -> dict[str, LoraLayer]:
    """One LoRA on a BFL module -> canonical layers (split fused pieces, undo the final-layer swap).

    `pieces` limits a fused module to its first pieces (XLabs' single-block qkv covers q, k, v of linear1 only)."""
    hidden = down.shape[1]
    parts = keymap.bfl_module_to_diffusers(hidden, bfl_path)
    if pieces is not None:
        parts = parts[:pieces]
    if len(parts) == 1:
        path, rows = parts[0]
        if isinstance(rows, list) and up.shape[0] != len(rows):
            raise CheckpointError(f"LoRA on {bfl_path}: up has {up.shape[0]} rows, expected {len(rows)}")
        return {path: LoraLayer(down.clone(), up[rows].clone(), alpha)}
    names = [p for p, _ in parts]
    sizes = [r.stop - r.start for _, r in parts]
    return split_fused(down, up, alpha, names, sizes)


def layers_to_bfl(lora: LoraWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Canonical layers -> {BFL module path: (down, up, alpha)}, fusing split pieces back (model order kept)."""
    grouped: dict[str, dict[int | None, tuple[str, LoraLayer]]] = {}
    for path, layer in lora.layers.items():
        try:
            bfl, index = keymap.diffusers_module_to_bfl(path)
        except KeyError:
            raise UserError(f"LoRA layer '{path}' is not a Flux transformer module; cannot write it in kohya format "
                            "(use --to diffusers)") from None
        grouped.setdefault(bfl, {})[index] = (path, layer)
    out = {}
    for bfl, entries in grouped.items():
        any_layer = next(iter(entries.values()))[1]
        parts = keymap.bfl_module_to_diffusers(any_layer.in_features, bfl)
        if len(parts) == 1:
            path, layer = next(iter(entries.values()))
            rows = parts[0][1]
            if isinstance(rows, list):  # final layer: diffusers rows = bfl[rows]
                up = torch.empty_like(layer.up)
                up[rows] = layer.up
            else:
                up = layer.up
            out[bfl] = (layer.down, up, float(layer.alpha))
            continue
        sizes = [r.stop - r.start for _, r in parts]
        for i, (path, layer) in entries.items():
            if layer.out_features != sizes[i]:
                raise UserError(f"LoRA layer '{path}' has {layer.out_features} output rows, expected {sizes[i]}")
        out[bfl] = fuse_pieces({i: layer for i, (_, layer) in entries.items()}, sizes)
    return out


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
            tensors = {k: f.get_tensor(k) for k in f.keys()}
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


def to_state_dict(lora: LoraWeights, format: str = "kohya", dtype: torch.dtype | None = None
                  ) -> dict[str, torch.Tensor]:
    """The tensors of a `format` file (see module docstring). `dtype` (default fp32) applies to down/up; alphas are
    fp32 scalars."""
    if format not in FORMATS:
        raise UserError(f"unknown LoRA format '{format}' (choose {' or '.join(FORMATS)})")
    lora.validate()
    dtype = dtype or torch.float32
    sd: dict[str, torch.Tensor] = {}
    if format == "kohya":
        for bfl, (down, up, alpha) in layers_to_bfl(lora).items():
            name = "lora_unet_" + bfl.replace(".", "_")
            sd[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
            sd[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    else:
        write_alpha = any(float(layer.alpha) != layer.rank for layer in lora.layers.values())
        for path, layer in lora.layers.items():
            sd[f"transformer.{path}.lora_A.weight"] = layer.down.to(dtype).contiguous()
            sd[f"transformer.{path}.lora_B.weight"] = layer.up.to(dtype).contiguous()
            if write_alpha:
                sd[f"transformer.{path}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    for k, v in lora.passthrough.items():
        if format == "kohya" and k.startswith("lora_te"):
            sd[k] = v
    return sd


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
    `ss_network_dim`/`ss_network_alpha` (most common rank/alpha) and, for kohya, `ss_network_module` are added.
    Text-encoder tensors carried from a kohya file are written back in kohya format and dropped in diffusers format."""
    path = Path(path)
    sd = to_state_dict(lora, format, dtype)
    meta = {str(k): _meta_str(v) for k, v in (lora.metadata if metadata is None else metadata).items()}
    meta.pop("lora_adapter_metadata", None)  # diffusers refuses files with both this and .alpha keys
    ranks = Counter(lora.ranks().values())
    alphas = Counter(lora.alphas().values())
    meta.update({"format": "pt", "dev2pro.lora_format": format})
    if ranks:
        meta["ss_network_dim"] = str(ranks.most_common(1)[0][0])
        meta["ss_network_alpha"] = _num(alphas.most_common(1)[0][0])
    if format == "kohya":
        meta.setdefault("ss_network_module", "networks.lora_flux")
    _atomic_save(sd, path, meta)
    return path


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ---------------------------------------------------------------------------------------------------------------------
# Description (for `dev2pro inspect` and `dev2pro lora inspect`)

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
        return f"{_num(v)} (all {c[v]} layers)"
    return ", ".join(f"{_num(v)} x{n}" for v, n in sorted(c.items()))


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
