"""LoRA file formats: the key layouts of kohya, diffusers/peft, ComfyUI and XLabs Flux LoRAs, and the conversions
between a LoRA on a BFL module (fused or not) and the canonical per-diffusers-module `LoraWeights`.

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

Reading and writing files (detection, validation, atomic save) is `dev2pro.lora.files`; the header is
`dev2pro.lora.metadata`.
"""

from __future__ import annotations

import re

import torch

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import keymap
from dev2pro.lora.inject import LoraLayer, LoraWeights

FORMATS = ("kohya", "diffusers")


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
# Canonical layers -> the tensors of a file


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
