"""The architecture of a transformer checkpoint, read from its headers, and the strict shape check against it.

BFL files do not store their hyperparameters: `read_spec` infers a `FluxSpec` from tensor shapes (hidden size from
`img_in`, head dim from the q norm, block counts from the key indices, RoPE axes from the preset with that head dim);
diffusers folders carry it in `config.json`. `spec_of` then checks every key and shape of the source against the
architecture (`expected_shapes`, from a `meta` model) before any tensor is read, so a wrong or truncated checkpoint
fails with one line naming the keys. `describe_checkpoint` is what `dev2pro inspect` shows; nothing is allocated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dev2pro.errors import CheckpointError
from dev2pro.flux import keymap
from dev2pro.flux.models import PRESETS, FluxSpec, build_transformer
from dev2pro.flux.safetensors_io import numel
from dev2pro.flux.sources import Source, open_source


@functools.lru_cache(maxsize=32)
def expected_shapes(spec: FluxSpec, space: str = "bfl") -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of `spec` in `space` ('bfl' or 'diffusers'), from a meta model (no memory)."""
    model = build_transformer(spec, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if space == "diffusers":
        return shapes
    out = {}
    for g in keymap.plan_diffusers_to_bfl(shapes, spec.hidden_size):
        out.update(keymap.output_shape(g, shapes))
    return out


def _axes_dim(head_dim: int, name: str) -> tuple[int, int, int]:
    if head_dim == 128:
        return (16, 56, 56)
    for spec in PRESETS.values():
        if spec.head_dim == head_dim:
            return spec.axes_dim
    raise CheckpointError(f"{name}: head dim {head_dim} matches no preset; BFL files do not store the RoPE axes "
                          "(axes_dim): use a diffusers folder whose config.json has axes_dims_rope")


def bfl_shapes(src: Source) -> dict[str, tuple[int, ...]]:
    shapes = {k: v for k, v in src.shapes().items() if not k.endswith(".scale_weight")}
    if src.space == "bfl":
        return shapes
    hidden = shapes.get("x_embedder.weight", (0,))[0]
    out = {}
    try:
        for g in keymap.plan_diffusers_to_bfl(shapes, hidden):
            out.update(keymap.output_shape(g, shapes))
    except KeyError as e:
        raise CheckpointError(f"{src.name}: {e.args[0]}") from None
    return out


def spec_from_bfl_shapes(shapes: dict, name: str) -> FluxSpec:
    need = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"{name}: incomplete Flux checkpoint, missing {', '.join(missing)}")

    def count(prefix: str) -> int:
        ids = {int(k.split(".")[1]) for k in shapes if k.startswith(prefix) and k.split(".")[1].isdigit()}
        return max(ids) + 1 if ids else 0

    hidden, in_ch = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if hidden % head_dim:
        raise CheckpointError(f"{name}: hidden size {hidden} is not a multiple of the head dim {head_dim}")
    return FluxSpec(
        in_channels=in_ch, vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1], hidden_size=hidden, num_heads=hidden // head_dim,
        depth=count("double_blocks."), depth_single_blocks=count("single_blocks."),
        axes_dim=tuple(_axes_dim(head_dim, name)), guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def check_shapes(src: Source, spec: FluxSpec) -> None:
    """Missing/unexpected keys and wrong shapes, in the source's key space, as one line."""
    want = expected_shapes(spec, src.space)
    have = src.shapes()
    problems = []
    for k, s in have.items():
        if k.endswith(".scale_weight"):
            w = k[: -len("scale_weight")] + "weight"
            if w not in want or (len(s) > 1 or (len(s) == 1 and s[0] not in (1, want[w][0]))):
                problems.append(f"unexpected fp8 scale {k} {list(s)}")
        elif k not in want:
            problems.append(f"unexpected {k}")
        elif tuple(s) != want[k]:
            problems.append(f"{k} has shape {list(s)}, expected {list(want[k])}")
    problems += [f"missing {k}" for k in want if k not in have]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        arch = f"hidden {spec.hidden_size}, {spec.depth}+{spec.depth_single_blocks} blocks"
        raise CheckpointError(f"{src.name}: does not match the Flux architecture read from it ({arch}): "
                              f"{'; '.join(problems[:3])}{more}")


def spec_of(src: Source) -> FluxSpec:
    if src.space == "lora":
        raise CheckpointError(f"{src.name}: is a LoRA file, not a transformer checkpoint (apply it with --lora)")
    if src.config is not None:
        try:
            spec = FluxSpec.from_diffusers_config(src.config)
            spec.validate()
        except Exception as e:  # UserError or bad types in config.json
            raise CheckpointError(f"{src.name}: config.json does not describe a Flux transformer ({e})") from None
    else:
        spec = spec_from_bfl_shapes(bfl_shapes(src), src.name)
    check_shapes(src, spec)
    return spec


def read_spec(path) -> FluxSpec:
    """The architecture of a checkpoint from its header (and config.json): nothing is allocated."""
    src = open_source(path)
    try:
        return spec_of(src)
    finally:
        src.close()


def preset_name(spec: FluxSpec) -> str | None:
    """Name of the preset equal to `spec`, if any."""
    for name, p in PRESETS.items():
        if p == spec:
            return name
    return None


@dataclass(frozen=True)
class CheckpointInfo:
    """What `dev2pro inspect` shows; built from headers only."""

    path: str
    format: str
    spec: FluxSpec
    preset: str | None
    dtypes: dict[str, int]  # dtype name -> number of tensors
    num_params: int
    fp8_scaling: str | None
    nbytes: int
    metadata: dict[str, str]
    ignored: int


def describe_checkpoint(path) -> CheckpointInfo:
    src = open_source(path)
    try:
        spec = spec_of(src)
        dtypes: dict[str, int] = {}
        for k, (dt, _) in src.infos.items():
            if not k.endswith(".scale_weight"):
                name = str(dt).removeprefix("torch.")
                dtypes[name] = dtypes.get(name, 0) + 1
        nparams = sum(numel(s) for k, (_, s) in src.infos.items() if not k.endswith(".scale_weight"))
        return CheckpointInfo(str(path), src.format, spec, preset_name(spec), dtypes, nparams, src.scaling(),
                              src.nbytes(), src.metadata, len(src.ignored))
    finally:
        src.close()

