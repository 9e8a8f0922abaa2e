"""BFL <-> diffusers key mapping for the Flux transformer: one declarative table plus three named special cases.

BFL single files (as shipped by Black Forest Labs, ComfyUI and the fp8 reposts) name modules after
`flux/modules/layers.py`; diffusers' `FluxTransformer2DModel` names them differently and splits three fused linears.
`MODULE_RULES` lists every module once as `(bfl path, diffusers path(s), kind)`; `{i}` is a block index. Kinds:

- `rename`: same tensor, new name. Norm modules also rename the parameter (`scale` -> `weight`).
- `split`: a fused BFL linear is several diffusers linears stacked along dim 0 (output rows). Double-block `qkv` is
  `[h, h, h]` (q, k, v); single-block `linear1` is `[h, h, h, mlp_hidden]` (q, k, v, mlp input).
- `swap`: `final_layer.adaLN_modulation.1` stores (shift, scale); diffusers' `norm_out.linear` stores (scale, shift),
  so the two row halves are swapped (diffusers' converter calls this `swap_scale_shift`).

The same table serves three users:

- whole state dicts: `bfl_to_diffusers(sd, hidden)` / `diffusers_to_bfl(sd, hidden)`;
- streaming converters: `plan_bfl_to_diffusers(keys, hidden)` / `plan_diffusers_to_bfl(keys, hidden)` return `Group`s
  (which input tensors one output group needs); a converter reads one group, `run_group`s it, writes, frees it;
- single modules (LoRA files): `bfl_module_to_diffusers(spec_or_hidden, bfl_path)` gives the diffusers modules and
  which BFL rows each holds; `diffusers_module_to_bfl(path)` is the inverse.

Parameters other than `weight`/`bias` (fp8 `scale_weight`, `scale_input`) follow their module: per-row tensors are
split/swapped like a bias; scalars are shared by all pieces of a split (and must agree to be fused back).

Reference: `diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers` (BFL -> diffusers,
the test oracle; it hard-codes hidden 3072) and kohya sd-scripts' `flux_utils.py` tables.
Pitfall: BFL files sometimes carry a `model.diffusion_model.` prefix; strip it before planning (`strip_prefix`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# (bfl module path, diffusers module path(s), kind, split pieces). Pieces name sizes: "h" hidden, "mlp" 4 * hidden.
MODULE_RULES: tuple[tuple[str, tuple[str, ...], str, tuple[str, ...]], ...] = (
    ("img_in", ("x_embedder",), "rename", ()),
    ("txt_in", ("context_embedder",), "rename", ()),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), "rename", ()),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), "rename", ()),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), "rename", ()),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), "rename", ()),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), "rename", ()),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), "rename", ()),
    # double-stream blocks
    ("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",), "rename", ()),
    ("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",), "rename", ()),
    ("double_blocks.{i}.img_attn.qkv",
     ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k", "transformer_blocks.{i}.attn.to_v"),
     "split", ("h", "h", "h")),
    ("double_blocks.{i}.txt_attn.qkv",
     ("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
      "transformer_blocks.{i}.attn.add_v_proj"),
     "split", ("h", "h", "h")),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), "rename", ()),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), "rename", ()),
    ("double_blocks.{i}.img_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_q",), "norm", ()),
    ("double_blocks.{i}.img_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_k",), "norm", ()),
    ("double_blocks.{i}.txt_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_added_q",), "norm", ()),
    ("double_blocks.{i}.txt_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_added_k",), "norm", ()),
    ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",), "rename", ()),
    ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",), "rename", ()),
    ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",), "rename", ()),
    ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",), "rename", ()),
    # single-stream blocks
    ("single_blocks.{i}.linear1",
     ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
      "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"),
     "split", ("h", "h", "h", "mlp")),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",), "rename", ()),
    ("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",), "rename", ()),
    ("single_blocks.{i}.norm.query_norm", ("single_transformer_blocks.{i}.attn.norm_q",), "norm", ()),
    ("single_blocks.{i}.norm.key_norm", ("single_transformer_blocks.{i}.attn.norm_k",), "norm", ()),
    # final layer
    ("final_layer.linear", ("proj_out",), "rename", ()),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap", ()),
)

# Norm modules store their gain as `scale` in BFL and `weight` in diffusers.
NORM_PARAM = {"bfl": "scale", "diffusers": "weight"}


@dataclass(frozen=True)
class _Rule:
    bfl: str
    diffusers: tuple[str, ...]
    kind: str
    pieces: tuple[str, ...]
    bfl_re: re.Pattern
    diffusers_re: tuple[re.Pattern, ...]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_RULES = tuple(_Rule(b, d, k, p, _pattern(b), tuple(_pattern(x) for x in d)) for b, d, k, p in MODULE_RULES)


def _hidden(spec_or_hidden) -> int:
    return spec_or_hidden if isinstance(spec_or_hidden, int) else spec_or_hidden.hidden_size


def _sizes(pieces: tuple[str, ...], hidden: int) -> tuple[int, ...]:
    return tuple({"h": hidden, "mlp": 4 * hidden}[p] for p in pieces)


def strip_prefix(key: str) -> str:
    """`model.diffusion_model.double_blocks...` -> `double_blocks...` (ComfyUI checkpoints)."""
    for p in BFL_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _find_bfl(module: str) -> tuple[_Rule, str | None] | None:
    for r in _RULES:
        m = r.bfl_re.match(module)
        if m:
            return r, m.groupdict().get("i")
    return None


def _find_diffusers(module: str) -> tuple[_Rule, int, str | None] | None:
    for r in _RULES:
        for j, pat in enumerate(r.diffusers_re):
            m = pat.match(module)
            if m:
                return r, j, m.groupdict().get("i")
    return None


def _fill(template: str, i: str | None) -> str:
    return template.replace("{i}", i) if i is not None else template


# ---------------------------------------------------------------------------------------------------------------------
# Single modules (LoRA files)

Rows = slice | list[int]


def bfl_module_to_diffusers(spec_or_hidden, bfl_module_path: str) -> list[tuple[str, Rows]]:
    """The diffusers modules a BFL module becomes, each with the BFL output rows it holds.

    `spec_or_hidden` is a `FluxSpec` or the hidden size. Returns `[(diffusers_module_path, rows), ...]` such that
    `diffusers_weight == bfl_weight[rows]` (also for biases and LoRA `up`/`lora_B` matrices, which share the output
    rows). `rows` is `slice(None)` for a plain rename, a `slice` for one piece of a fused linear, and, for the final
    layer's shift/scale swap, a list of row indices (`[h, ..., 2h-1, 0, ..., h-1]`). Both kinds index dim 0 with
    `t[rows]`, for reading and for writing.

    Example: `bfl_module_to_diffusers(3072, "double_blocks.0.img_attn.qkv")` ->
    `[("transformer_blocks.0.attn.to_q", slice(0, 3072)), (".to_k", slice(3072, 6144)), (".to_v", ...)]`.
    Raises KeyError for a path that is not a Flux transformer module.
    """
    found = _find_bfl(strip_prefix(bfl_module_path))
    if found is None:
        raise KeyError(f"not a Flux transformer module (BFL naming): {bfl_module_path}")
    rule, i = found
    h = _hidden(spec_or_hidden)
    if rule.kind == "split":
        out, start = [], 0
        for path, size in zip(rule.diffusers, _sizes(rule.pieces, h)):
            out.append((_fill(path, i), slice(start, start + size)))
            start += size
        return out
    if rule.kind == "swap":
        return [(_fill(rule.diffusers[0], i), list(range(h, 2 * h)) + list(range(0, h)))]
    return [(_fill(rule.diffusers[0], i), slice(None))]


def diffusers_module_to_bfl(diffusers_module_path: str) -> tuple[str, int | None]:
    """Inverse of `bfl_module_to_diffusers` for one diffusers module: `(bfl_module_path, row_slice_index)`.

    `row_slice_index` is None when the diffusers module is the whole BFL module with the same row order (a plain
    rename); otherwise it is the position of this module in `bfl_module_to_diffusers(spec, bfl_module_path)`, whose
    `rows` say where its output rows live in the BFL tensor: 0/1/2 for q/k/v of a fused qkv, 3 for `proj_mlp` of
    `linear1`, and 0 for `norm_out.linear` (its rows are the BFL halves swapped). Raises KeyError for unknown paths.
    A `transformer.` prefix (diffusers pipelines, peft LoRA keys) is accepted.
    """
    path = diffusers_module_path.removeprefix("transformer.")
    found = _find_diffusers(path)
    if found is None:
        raise KeyError(f"not a Flux transformer module (diffusers naming): {diffusers_module_path}")
    rule, j, i = found
    index = None if rule.kind in ("rename", "norm") else j
    return _fill(rule.bfl, i), index


def split_sizes(spec_or_hidden, bfl_module_path: str) -> tuple[int, ...] | None:
    """Row sizes of a fused BFL linear (`qkv`: (h, h, h); `linear1`: (h, h, h, 4h)), None for the others."""
    found = _find_bfl(strip_prefix(bfl_module_path))
    if found is None:
        raise KeyError(f"not a Flux transformer module (BFL naming): {bfl_module_path}")
    rule, _ = found
    return _sizes(rule.pieces, _hidden(spec_or_hidden)) if rule.kind == "split" else None


# ---------------------------------------------------------------------------------------------------------------------
# State dicts, streamed by groups


@dataclass(frozen=True)
class Group:
    """One conversion step: `outputs` computed from `inputs` only.

    `op` is `rename` (one in, one out), `split` (one in, several out, row `sizes`), `fuse` (several in, one out,
    concatenated rows), `swap` (one in, one out, halves swapped).
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    op: str
    sizes: tuple[int, ...] = ()


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _param_name(rule: _Rule, param: str, to: str) -> str:
    if rule.kind == "norm" and param == NORM_PARAM["bfl" if to == "diffusers" else "diffusers"]:
        return NORM_PARAM[to]
    return param


def plan_bfl_to_diffusers(keys, hidden: int) -> list[Group]:
    """Groups converting the BFL `keys` (prefix already stripped) to diffusers keys, in input order.

    Raises KeyError listing keys that are not Flux transformer tensors.
    """
    groups, unknown = [], []
    for key in keys:
        module, param = _split_param(key)
        found = _find_bfl(module)
        if found is None:
            unknown.append(key)
            continue
        rule, i = found
        outs = tuple(f"{_fill(d, i)}.{_param_name(rule, param, 'diffusers')}" for d in rule.diffusers)
        if rule.kind == "split":
            groups.append(Group((key,), outs, "split", _sizes(rule.pieces, hidden)))
        else:
            groups.append(Group((key,), outs, "swap" if rule.kind == "swap" else "rename"))
    if unknown:
        raise KeyError(_unknown_message(unknown))
    return groups


def plan_diffusers_to_bfl(keys, hidden: int) -> list[Group]:
    """Groups converting diffusers `keys` to BFL keys. A fused output appears once, when its first piece is met; all
    its pieces must be in `keys`. Raises KeyError listing unknown or incomplete keys."""
    keys = list(keys)
    present = set(keys)
    groups, unknown, done = [], [], set()
    for key in keys:
        module, param = _split_param(key)
        found = _find_diffusers(module)
        if found is None:
            unknown.append(key)
            continue
        rule, _, i = found
        out = f"{_fill(rule.bfl, i)}.{_param_name(rule, param, 'bfl')}"
        if out in done:
            continue
        done.add(out)
        if rule.kind == "split":
            ins = tuple(f"{_fill(d, i)}.{param}" for d in rule.diffusers)
            missing = [k for k in ins if k not in present]
            if missing:
                unknown.extend(f"{k} (missing, needed for {out})" for k in missing)
                continue
            groups.append(Group(ins, (out,), "fuse", _sizes(rule.pieces, hidden)))
        else:
            groups.append(Group((key,), (out,), "swap" if rule.kind == "swap" else "rename"))
    if unknown:
        raise KeyError(_unknown_message(unknown))
    return groups


def _unknown_message(keys: list[str]) -> str:
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"not Flux transformer tensors: {', '.join(keys[:5])}{more}"


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 0 or t.numel() == 1:
        return t
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def run_group(group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply one group to its input tensors (`tensors` holds at least `group.inputs`). Scalars (per-tensor fp8
    scales) are shared by every piece of a split and must be equal to be fused."""
    ins = [tensors[k] for k in group.inputs]
    if group.op == "rename":
        return {group.outputs[0]: ins[0]}
    if group.op == "swap":
        return {group.outputs[0]: _swap_halves(ins[0])}
    if group.op == "split":
        t = ins[0]
        if t.numel() == 1:
            return {k: t.clone() for k in group.outputs}
        if t.shape[0] != sum(group.sizes):
            raise ValueError(f"{group.inputs[0]}: {t.shape[0]} rows, expected {sum(group.sizes)} = {group.sizes}")
        return dict(zip(group.outputs, (p.clone() for p in torch.split(t, group.sizes, dim=0))))
    if group.op == "fuse":
        if all(t.numel() == 1 for t in ins):
            if not all(torch.equal(ins[0], t) for t in ins[1:]):
                raise ValueError(f"cannot fuse different per-tensor scales into {group.outputs[0]}")
            return {group.outputs[0]: ins[0]}
        return {group.outputs[0]: torch.cat(ins, dim=0)}
    raise ValueError(f"unknown op {group.op}")


def output_shape(group: Group, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of a group's outputs from its input shapes, without tensors (for writing a header first)."""
    ins = [tuple(shapes[k]) for k in group.inputs]
    if group.op in ("rename", "swap"):
        return {group.outputs[0]: ins[0]}
    if group.op == "split":
        if _numel(ins[0]) == 1:
            return {k: ins[0] for k in group.outputs}
        return {k: (n, *ins[0][1:]) for k, n in zip(group.outputs, group.sizes)}
    if all(_numel(s) == 1 for s in ins):
        return {group.outputs[0]: ins[0]}
    return {group.outputs[0]: (sum(s[0] for s in ins), *ins[0][1:])}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def bfl_to_diffusers(state_dict: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """Whole BFL state dict -> diffusers keys (prefixes stripped)."""
    sd = {strip_prefix(k): v for k, v in state_dict.items()}
    out = {}
    for g in plan_bfl_to_diffusers(sd, hidden):
        out.update(run_group(g, sd))
    return out


def diffusers_to_bfl(state_dict: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """Whole diffusers state dict -> BFL keys."""
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    out = {}
    for g in plan_diffusers_to_bfl(sd, hidden):
        out.update(run_group(g, sd))
    return out


def is_bfl_key(key: str) -> bool:
    module, _ = _split_param(strip_prefix(key))
    return _find_bfl(module) is not None


def is_diffusers_key(key: str) -> bool:
    module, _ = _split_param(key.removeprefix("transformer."))
    return _find_diffusers(module) is not None
