"""Flux transformers in and out of memory: `load_transformer`, `save_transformer`, `iter_state_dict`.

A checkpoint reference is a BFL/ComfyUI/fp8 file, a diffusers (or pipeline) folder (`dev2pro.flux.sources` reads
them all), `preset:NAME[@SEED]` (random init) or `toy:NAME` (`dev2pro.flux.providers`).

Loading builds the model on `meta` and assigns tensors as they arrive (`assign=True` semantics); shapes are checked
against the architecture read from the header (`dev2pro.flux.describe.read_spec`) before any tensor is read. fp8 files
keep their weights in fp8 (`fp8.Fp8Linear`) unless `fp8="dequantize"`. Pitfall: fp8 tensors outside the block
linears (embedders, final layer, biases, norms) are upcast to the compute dtype, so `model.dtype` (diffusers: the
first floating parameter) is the compute dtype, not fp8.

Saving goes through the streaming exporter of `dev2pro.flux.convert` (one tensor group in memory, atomic writes).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from dev2pro.errors import CheckpointError
from dev2pro.flux import fp8 as fp8lib
from dev2pro.flux import keymap
from dev2pro.flux.convert import DTYPES, MAX_SHARD_BYTES, check_dst, export
from dev2pro.flux.describe import bfl_shapes, check_shapes, read_spec, spec_from_bfl_shapes, spec_of
from dev2pro.flux.models import PRESETS, FluxSpec, build_transformer, iter_random_weights, random_transformer
from dev2pro.flux.safetensors_io import numel
from dev2pro.flux.sources import DictSource, Source, open_source, resolve_ref


def parse_preset_ref(ref: str) -> tuple[FluxSpec, int]:
    body = ref.removeprefix("preset:")
    name, _, seed = body.partition("@")
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset '{name}' in '{ref}' (known: {', '.join(PRESETS)})")
    try:
        return PRESETS[name], int(seed) if seed else 0
    except ValueError:
        raise CheckpointError(f"bad seed '{seed}' in '{ref}' (use preset:NAME@INT)") from None


def set_tensor(model: nn.Module, key: str, t: torch.Tensor, name: str) -> None:
    """Put tensor `t` at `key` of a model built on meta (shape-checked); `name` (the file) goes into errors."""
    module_path, _, pname = key.rpartition(".")
    try:
        module = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        raise CheckpointError(f"{name}: unexpected tensor {key}") from None
    if pname in module._parameters:
        old = module._parameters[pname]
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise CheckpointError(f"{name}: {key} has shape {list(t.shape)}, the model expects {list(old.shape)}")
        module._parameters[pname] = nn.Parameter(t, requires_grad=t.is_floating_point() and t.itemsize > 1)
    elif pname in module._buffers:
        module._buffers[pname] = t
    else:
        raise CheckpointError(f"{name}: unexpected tensor {key}")


def load_transformer(ref, *, dtype: torch.dtype | str | None = None, device="cpu", fp8: str = "keep"):
    """A `FluxTransformer2DModel` from a checkpoint reference, loaded tensor by tensor.

    `ref`: a BFL/fp8 file, a diffusers folder (or pipeline folder), `preset:NAME[@SEED]` (random init, std 0.02)
    or `toy:NAME`. `dtype`: dtype of the (non-fp8) parameters; None keeps the file's dtypes (bf16 for fp8 files).
    `fp8="keep"` keeps fp8 weights in fp8 (`fp8.Fp8Linear`, computing in the input's dtype); `"dequantize"` gives a
    plain model. Strict: missing/unexpected keys and wrong shapes raise CheckpointError.
    """
    if fp8 not in ("keep", "dequantize"):
        raise ValueError(f"fp8 must be 'keep' or 'dequantize', got {fp8!r}")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if isinstance(ref, str) and ref.startswith("preset:"):
        spec, seed = parse_preset_ref(ref)
        return random_transformer(spec, seed, std=0.02, dtype=dtype or torch.float32).to(device)
    src = open_source(resolve_ref(ref))
    try:
        spec = spec_of(src)
        return _load_from_source(src, spec, dtype, device, fp8)
    finally:
        src.close()


def _load_from_source(src: Source, spec: FluxSpec, dtype, device, fp8: str):
    model = build_transformer(spec, device="meta")
    keep = fp8 == "keep"
    keys = list(src.infos) if keep else src.weight_keys()
    if src.space == "bfl":
        plan = keymap.plan_bfl_to_diffusers(keys, spec.hidden_size)
    else:
        plan = [keymap.Group((k,), (k,), "rename") for k in keys]
    fp8_in = {k for k in src.infos if src.is_fp8(k)}
    compute = dtype or (torch.bfloat16 if fp8_in else None)
    # Block linears whose weight arrives in fp8 become Fp8Linear (on meta; tensors are assigned below). fp8 tensors
    # elsewhere (embedders, final layer, biases, norms of files that cast everything) are upcast to the compute dtype,
    # as our own files keep them: this also keeps `model.dtype` (diffusers: first floating parameter) = compute dtype.
    fp8_modules = set()
    if keep:
        for g in plan:
            if g.inputs[0] in fp8_in and g.inputs[0].endswith(".weight") and len(src.infos[g.inputs[0]][1]) == 2:
                for out in g.outputs:
                    mpath = out.rpartition(".")[0]
                    if type(model.get_submodule(mpath)) is nn.Linear and fp8lib.is_quantized_module(mpath):
                        fp8_modules.add(mpath)
        for mpath in fp8_modules:
            lin = model.get_submodule(mpath)
            sk = src.scale_key(_source_key_of(plan, mpath + ".weight"))
            scaling = "none" if sk is None else ("channel" if numel(src.infos[sk][1]) > 1 else "tensor")
            parent, _, name = mpath.rpartition(".")
            new = fp8lib.Fp8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, scaling=scaling)
            setattr(model.get_submodule(parent) if parent else model, name, new)
    for g in plan:
        tensors = {k: src.read(k, dequantize=not keep) for k in g.inputs}
        for key, t in keymap.run_group(g, tensors).items():
            mpath, _, pname = key.rpartition(".")
            if mpath in fp8_modules and pname in ("weight", "scale_weight"):
                t = t if pname == "weight" else t.float().reshape(() if t.numel() == 1 else (-1,))
            elif key.endswith(".scale_weight"):
                continue  # scale of a module kept plain: consumed when its weight was dequantized below
            elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                sk = src.scale_key(_source_key_of(plan, key)) if keep else None
                t = _dequant_piece(src, g, key, t, sk, compute)
            elif compute is not None and t.is_floating_point():
                t = t.to(compute)
            set_tensor(model, key, t.to(device), src.name)
        del tensors
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{src.name}: missing tensors {', '.join(left[:3])}" + (
            f" (+{len(left) - 3} more)" if len(left) > 3 else ""))
    return model.eval()


def _source_key_of(plan: list[keymap.Group], out_key: str) -> str:
    for g in plan:
        if out_key in g.outputs:
            return g.inputs[0]
    return out_key


def _dequant_piece(src, group, key, t, scale_key, compute):
    """An fp8 tensor kept plain in memory (bias, norm, or a linear we do not swap): dequantize with its scale."""
    if scale_key is None:
        return t.to(compute or torch.bfloat16)
    scale = src.read(scale_key)
    if scale.numel() > 1:  # per-row scale: take this piece's rows
        scale = keymap.run_group(keymap.Group((scale_key,), group.outputs, group.op, group.sizes),
                                 {scale_key: scale})[key.rpartition(".")[0] + ".scale_weight"]
    return fp8lib.dequantize(t, scale, compute or torch.bfloat16)


def save_transformer(model_or_state_dict, path, *, format: str = "bfl", dtype=None, scaling: str | None = None,
                     metadata: dict[str, str] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                     spec: FluxSpec | None = None, progress: bool = False) -> Path:
    """Save a transformer (model, state dict or `Source`; diffusers or BFL keys; fp8 modules included) atomically as
    a BFL single file (`format="bfl"`) or a diffusers folder (`"diffusers"`, sharded above `max_shard_bytes`).

    `dtype`: None keeps each tensor's dtype; `torch.bfloat16`/`"bf16"`, ..., `"fp8_e4m3fn"` converts (fp8 applies to
    block linears only, see `fp8`). `scaling`: fp8 scaling none/tensor/channel (None: the model's own, else none).
    """
    path = Path(path)
    if isinstance(model_or_state_dict, Source):  # e.g. a sharded training checkpoint, streamed
        src = model_or_state_dict
        spec = spec or spec_of(src)
    elif isinstance(model_or_state_dict, nn.Module):
        src = DictSource(model_or_state_dict.state_dict())
        if spec is None and hasattr(model_or_state_dict, "config"):
            spec = FluxSpec.from_diffusers_config(dict(model_or_state_dict.config))
    else:
        src = DictSource(model_or_state_dict)
    if spec is None:
        spec = spec_from_bfl_shapes(bfl_shapes(src), "state dict")
    check_shapes(src, spec)
    check_dst(path, format, None)
    export(src, path, format=format, dtype=dtype, scaling=scaling, metadata=metadata,
            max_shard_bytes=max_shard_bytes, progress=progress, spec=spec)
    return path


def weight_stream(ref) -> tuple[FluxSpec, Iterable[tuple[str, torch.Tensor]]]:
    """The architecture of `ref` (read from the header: nothing is allocated) and its weights as `(diffusers key,
    tensor)` one group at a time (a seeded preset drawn tensor by tensor, as `random_transformer` would): for loading
    a sharded model without ever holding the whole model in one process."""
    if isinstance(ref, str) and ref.startswith("preset:"):
        spec, seed = parse_preset_ref(ref)
        return spec, iter_random_weights(spec, seed, std=0.02)
    return read_spec(resolve_ref(ref)), iter_state_dict(ref)


def iter_state_dict(ref, *, space: str = "diffusers") -> Iterable[tuple[str, torch.Tensor]]:
    """Stream `(key, tensor)` of a checkpoint in `space` ('diffusers' or 'bfl'), fp8 weights dequantized to fp32,
    one group in memory at a time (for LoRA extraction, merging, statistics)."""
    src = open_source(resolve_ref(ref))
    try:
        spec = spec_of(src)
        keys = src.weight_keys()
        if src.space == space:
            plan = [keymap.Group((k,), (k,), "rename") for k in keys]
        elif space == "diffusers":
            plan = keymap.plan_bfl_to_diffusers(keys, spec.hidden_size)
        else:
            plan = keymap.plan_diffusers_to_bfl(keys, spec.hidden_size)
        for g in plan:
            yield from keymap.run_group(g, {k: src.read(k) for k in g.inputs}).items()
    finally:
        src.close()
