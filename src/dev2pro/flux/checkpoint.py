"""Flux transformer checkpoints: detect, inspect, load, save and convert, streaming tensor by tensor.

Formats read (`detect_format`):

- `bfl`: BFL single file (BFL, ComfyUI; keys may carry `model.diffusion_model.`, other keys of a full ComfyUI
  checkpoint such as the VAE are then ignored);
- `diffusers`: a folder with `config.json` + `diffusion_pytorch_model*.safetensors` (single or sharded with an index),
  a pipeline folder with a `transformer/` subfolder, or one diffusers-keyed safetensors file;
- `fp8`: BFL keys with block weights in float8_e4m3fn (the published fp8 reposts);
- `comfy-scaled-fp8`: ComfyUI's scaled fp8 (`scaled_fp8` marker tensor, per-layer fp32 scalar `scale_weight`);
- `dev2pro-channel-fp8`: ours, per-output-row fp32 `scale_weight` and a `dev2pro_fp8_channel` marker (docs/formats.md);
- `lora`: a LoRA file (described by `dev2pro.lora.describe.describe_lora`, not loadable as a transformer).

Safetensors is read with our own small reader (8-byte little-endian header length, JSON header, raw bytes): it
validates the header against the file size (truncated files fail with one line before any tensor is read), reads each
tensor with one `readinto` into its final buffer (no mmap, so memory use is what we allocate), and never touches
pickle: `.ckpt/.pt/.pth/.bin` files or pickle/zip magic bytes are refused with a hint to convert to safetensors.
Writing is streamed too: the header is computed from the conversion plan first, then each tensor group is produced,
written at its offset and freed, so peak memory is about one tensor group (`convert_checkpoint`), not one model.
Writes are atomic (temporary file in the same folder, fsync, rename).

Loading builds the model on `meta` and assigns tensors as they arrive (`assign=True` semantics); shapes are checked
against the architecture read from the header (`read_spec`) before any tensor is read. fp8 files keep their weights in
fp8 (`fp8.Fp8Linear`) unless `fp8="dequantize"`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dev2pro.errors import CheckpointError
from dev2pro.flux import fp8 as fp8lib
from dev2pro.flux import keymap
from dev2pro.flux.models import PRESETS, FluxSpec, build_transformer, random_transformer

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8_e4m3fn": torch.float8_e4m3fn}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI: its dtype is the fp8 type
CHANNEL_FP8_MARKER = "dev2pro_fp8_channel"  # ours
MARKERS = (SCALED_FP8_MARKER, CHANNEL_FP8_MARKER)
FLUX_KEY = {"bfl": "double_blocks.0.img_attn.norm.key_norm.scale",
            "diffusers": "transformer_blocks.0.attn.norm_k.weight"}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
MAX_SHARD_BYTES = 10 * 1024**3  # diffusers' save_pretrained default
_MAX_HEADER = 100 * 1024**2


# ---------------------------------------------------------------------------------------------------------------------
# safetensors reading


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int


def _refuse_pickle(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; dev2pro never loads pickle files (unpickling can run arbitrary code): "
                           "convert it to safetensors with a tool you trust")


def _pickle_magic(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_header(path) -> Header:
    """Parse and validate a safetensors header (no tensor data is read). Every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse_pickle(path, f"'{path.suffix}' is a pickle format")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            if _pickle_magic(head):
                raise _refuse_pickle(path, "this is a pickle/torch.save file")
            if n <= _MAX_HEADER:
                raise CheckpointError(f"{path}: truncated safetensors file (header needs {n} bytes, file has {size})")
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        if _pickle_magic(head):
            raise _refuse_pickle(path, "this is a pickle/torch.save file") from None
        raise CheckpointError(f"{path}: not a safetensors file or corrupt header ({type(e).__name__})") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors, end_max = {}, 0
    for key, v in header.items():
        try:
            dtype = ST_DTYPES[v["dtype"]]
            shape = tuple(int(s) for s in v["shape"])
            b, e = (int(x) for x in v["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: unsupported or corrupt header entry for '{key}' ({e})") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for '{key}'") from None
        info = TensorInfo(dtype, shape, base + b, base + e)
        if e - b != info.numel * dtype.itemsize or b < 0:
            raise CheckpointError(f"{path}: corrupt header: '{key}' {list(shape)} {v['dtype']} has {e - b} bytes")
        tensors[key] = info
        end_max = max(end_max, info.end)
    if end_max > size:
        raise CheckpointError(f"{path}: truncated safetensors file (data ends at byte {end_max}, file has {size}); "
                              "download or copy it again")
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, size)


class SafetensorsFile:
    """Read tensors one at a time from a validated safetensors file. Use `open_safetensors(path)`."""

    def __init__(self, path):
        self.header = read_header(path)
        self.path = self.header.path
        self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def info(self, key: str) -> TensorInfo:
        return self.header.tensors[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, read into a fresh CPU buffer (one allocation, no copy)."""
        info = self.header.tensors[key]
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        if buf.numel():
            if self._f is None:
                self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            self._f.seek(info.start)
            got = self._f.readinto(memoryview(buf.numpy()))
            if got != buf.numel():
                raise CheckpointError(f"{self.path}: truncated while reading '{key}'")
        return buf.view(info.dtype).reshape(info.shape)


def open_safetensors(path) -> SafetensorsFile:
    """Open a safetensors file for tensor-by-tensor reading; any problem is a one-line CheckpointError."""
    return SafetensorsFile(path)


# ---------------------------------------------------------------------------------------------------------------------
# Sources: a file, a diffusers folder or an in-memory state dict, seen as one key space (bfl or diffusers)


def _is_lora_key(key: str) -> bool:
    return any(s in key for s in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_unet_", ".alpha"))


class _Source:
    """Logical tensors of a transformer checkpoint, with prefixes stripped, markers and `scale_input` set aside."""

    path: Path | None
    format: str
    space: str
    config: dict | None = None
    metadata: dict[str, str]
    ignored: list[str]

    def __init__(self):
        self.infos: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.markers: dict[str, torch.dtype] = {}
        self.ignored = []
        self.metadata = {}

    # subclasses implement _raw(key) -> tensor
    def _raw(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self):
        pass

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "state dict"

    def scale_key(self, key: str) -> str | None:
        if not key.endswith(".weight"):
            return None
        s = key[: -len("weight")] + "scale_weight"
        return s if s in self.infos else None

    def weight_keys(self) -> list[str]:
        """Keys of real tensors (not fp8 scales)."""
        return [k for k in self.infos if not k.endswith(".scale_weight")]

    def is_fp8(self, key: str) -> bool:
        return self.infos[key][0] in (torch.float8_e4m3fn, torch.float8_e5m2)

    def scaling(self) -> str | None:
        """fp8 scaling of the source: None (not fp8), 'none', 'tensor' or 'channel'."""
        fp8_keys = [k for k in self.weight_keys() if self.is_fp8(k) and len(self.infos[k][1]) == 2]
        if not fp8_keys:
            return None
        scales = [self.infos[k] for k in self.infos if k.endswith(".scale_weight")]
        if not scales:
            return "none"
        return "channel" if any(len(s[1]) == 1 and s[1][0] > 1 for s in scales) else "tensor"

    def read(self, key: str, dequantize: bool = True) -> torch.Tensor:
        """Tensor `key`; fp8 weights with a scale are dequantized to fp32 unless `dequantize=False`."""
        t = self._raw(key)
        sk = self.scale_key(key)
        if dequantize and self.is_fp8(key):
            return fp8lib.dequantize(t, self._raw(sk) if sk else None, torch.float32)
        return t

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[1] for k, v in self.infos.items()}


class _FileSource(_Source):
    def __init__(self, files: list[SafetensorsFile], path: Path, fmt: str, config: dict | None = None):
        super().__init__()
        self.path, self.format, self.config, self.files = path, fmt, config, files
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        raw_keys = [(f, k) for f in files for k in f.keys()]
        self.metadata = dict(files[0].metadata) if files else {}
        prefixed = any(k.startswith(keymap.BFL_PREFIXES[0]) for _, k in raw_keys)
        for f, k in raw_keys:
            if prefixed and not k.startswith(keymap.BFL_PREFIXES[0]):
                self.ignored.append(k)
                continue
            key = keymap.strip_prefix(k).removeprefix("transformer.")
            info = f.info(k)
            if key in MARKERS:
                self.markers[key] = info.dtype
            elif key.endswith(".scale_input"):
                self.ignored.append(k)
            else:
                self.infos[key] = (info.dtype, info.shape)
                self._where[key] = (f, k)
        self.space = _key_space(self.infos, self.name)

    def _raw(self, key: str) -> torch.Tensor:
        f, k = self._where[key]
        return f.get(k)

    def close(self):
        for f in self.files:
            f.close()

    def nbytes(self) -> int:
        return sum(f.header.size for f in self.files)


class _DictSource(_Source):
    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        self.path, self.format, self._sd = None, "state-dict", {}
        for k, v in state_dict.items():
            key = keymap.strip_prefix(k).removeprefix("transformer.")
            if key in MARKERS:
                self.markers[key] = v.dtype
            else:
                self._sd[key] = v
                self.infos[key] = (v.dtype, tuple(v.shape))
        self.space = _key_space(self.infos, "state dict")

    def _raw(self, key: str) -> torch.Tensor:
        return self._sd[key].detach().cpu()


def _key_space(infos: dict, name: str) -> str:
    for space, key in FLUX_KEY.items():
        if key in infos:
            return space
    keys = list(infos)
    if any(_is_lora_key(k) for k in keys[:50]):
        return "lora"
    sample = ", ".join(keys[:3]) if keys else "no tensors"
    raise CheckpointError(f"{name}: not a Flux transformer checkpoint (no '{FLUX_KEY['bfl']}'; found {len(keys)} "
                          f"tensors like {sample})")


def _diffusers_dir(path: Path) -> Path | None:
    if (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model*")):
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return None


def _open_source(path) -> _FileSource:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        d = _diffusers_dir(path)
        if d is None:
            raise CheckpointError(f"{path}: not a diffusers transformer folder (needs config.json and "
                                  f"{DIFFUSERS_WEIGHTS}, or a transformer/ subfolder)")
        try:
            config = json.loads((d / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{d / 'config.json'}: unreadable ({e})") from None
        if (d / DIFFUSERS_INDEX).is_file():
            try:
                index = json.loads((d / DIFFUSERS_INDEX).read_text())
                names = sorted(set(index["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{d / DIFFUSERS_INDEX}: corrupt index ({e})") from None
        elif (d / DIFFUSERS_WEIGHTS).is_file():
            names = [DIFFUSERS_WEIGHTS]
        else:
            bins = sorted(p.name for p in d.glob("diffusion_pytorch_model*.bin"))
            if bins:
                raise _refuse_pickle(d / bins[0], "diffusers folder with pickle weights (.bin)")
            raise CheckpointError(f"{d}: no {DIFFUSERS_WEIGHTS} (or sharded index) in this diffusers folder")
        files = [open_safetensors(d / n) for n in names]
        src = _FileSource(files, path, "diffusers", config)
        if src.space != "diffusers":
            raise CheckpointError(f"{d}: weights are not diffusers Flux transformer keys")
        return src
    f = open_safetensors(path)
    src = _FileSource([f], path, "?")
    config = None
    if src.space == "diffusers" and (path.parent / "config.json").is_file():
        try:
            config = json.loads((path.parent / "config.json").read_text())
        except (OSError, ValueError):
            config = None
    src.config = config
    src.format = _file_format(src)
    return src


def _file_format(src: _Source) -> str:
    if src.space == "lora":
        return "lora"
    if src.space == "diffusers":
        return "diffusers"
    if CHANNEL_FP8_MARKER in src.markers:
        return "dev2pro-channel-fp8"
    if SCALED_FP8_MARKER in src.markers:
        return "comfy-scaled-fp8"
    scaling = src.scaling()
    if scaling is None:
        return "bfl"
    return {"none": "fp8", "tensor": "comfy-scaled-fp8", "channel": "dev2pro-channel-fp8"}[scaling]


def detect_format(path) -> str:
    """One of `bfl`, `diffusers`, `fp8`, `comfy-scaled-fp8`, `dev2pro-channel-fp8`, `lora`; CheckpointError if the
    path is none of these (not found, pickle, truncated, not Flux)."""
    src = _open_source(path)
    src.close()
    return src.format


# ---------------------------------------------------------------------------------------------------------------------
# Architecture from the header


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


def _bfl_shapes(src: _Source) -> dict[str, tuple[int, ...]]:
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


def _spec_from_bfl_shapes(shapes: dict, name: str) -> FluxSpec:
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


def _check_shapes(src: _Source, spec: FluxSpec) -> None:
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


def _spec_of(src: _Source) -> FluxSpec:
    if src.space == "lora":
        raise CheckpointError(f"{src.name}: is a LoRA file, not a transformer checkpoint (apply it with --lora)")
    if src.config is not None:
        try:
            spec = FluxSpec.from_diffusers_config(src.config)
            spec.validate()
        except Exception as e:  # UserError or bad types in config.json
            raise CheckpointError(f"{src.name}: config.json does not describe a Flux transformer ({e})") from None
    else:
        spec = _spec_from_bfl_shapes(_bfl_shapes(src), src.name)
    _check_shapes(src, spec)
    return spec


def read_spec(path) -> FluxSpec:
    """The architecture of a checkpoint from its header (and config.json): nothing is allocated."""
    src = _open_source(path)
    try:
        return _spec_of(src)
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
    src = _open_source(path)
    try:
        spec = _spec_of(src)
        dtypes: dict[str, int] = {}
        for k, (dt, _) in src.infos.items():
            if not k.endswith(".scale_weight"):
                name = str(dt).removeprefix("torch.")
                dtypes[name] = dtypes.get(name, 0) + 1
        nparams = sum(_numel(s) for k, (_, s) in src.infos.items() if not k.endswith(".scale_weight"))
        return CheckpointInfo(str(path), src.format, spec, preset_name(spec), dtypes, nparams, src.scaling(),
                              src.nbytes(), src.metadata, len(src.ignored))
    finally:
        src.close()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _parse_preset_ref(ref: str) -> tuple[FluxSpec, int]:
    body = ref.removeprefix("preset:")
    name, _, seed = body.partition("@")
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset '{name}' in '{ref}' (known: {', '.join(PRESETS)})")
    try:
        return PRESETS[name], int(seed) if seed else 0
    except ValueError:
        raise CheckpointError(f"bad seed '{seed}' in '{ref}' (use preset:NAME@INT)") from None


def resolve_ref(ref) -> Path:
    """`toy:NAME` (any registered provider, `dev2pro.flux.providers`) -> its model file; a path stays a path."""
    from dev2pro.flux import providers

    found = providers.model_file(ref)
    return found if found is not None else Path(ref)


def _set_tensor(model: nn.Module, key: str, t: torch.Tensor, name: str) -> None:
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
        spec, seed = _parse_preset_ref(ref)
        return random_transformer(spec, seed, std=0.02, dtype=dtype or torch.float32).to(device)
    src = _open_source(resolve_ref(ref))
    try:
        spec = _spec_of(src)
        return _load_from_source(src, spec, dtype, device, fp8)
    finally:
        src.close()


def _load_from_source(src: _Source, spec: FluxSpec, dtype, device, fp8: str):
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
            scaling = "none" if sk is None else ("channel" if _numel(src.infos[sk][1]) > 1 else "tensor")
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
            _set_tensor(model, key, t.to(device), src.name)
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
    scale = src._raw(scale_key)
    if scale.numel() > 1:  # per-row scale: take this piece's rows
        scale = keymap.run_group(keymap.Group((scale_key,), group.outputs, group.op, group.sizes),
                                 {scale_key: scale})[key.rpartition(".")[0] + ".scale_weight"]
    return fp8lib.dequantize(t, scale, compute or torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------------
# Writing


class _StreamWriter:
    """A safetensors file written header first, then tensors at their offsets, then fsynced and renamed."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp-{os.getpid()}")
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.slots, pos = {}, 0
        for key, dtype, shape in entries:
            n = _numel(shape) * dtype.itemsize
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.slots[key] = (dtype, tuple(shape), pos)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base, self.total = 8 + len(raw), pos
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.written: set[str] = set()

    def write(self, key: str, t: torch.Tensor) -> None:
        dtype, shape, pos = self.slots[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{key}: got {t.dtype} {list(t.shape)}, header says {dtype} {list(shape)}")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.seek(self.base + pos)
        self.f.write(memoryview(data))
        self.written.add(key)

    def finish(self) -> None:
        missing = set(self.slots) - self.written
        if missing:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(missing)[:3]}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


CATEGORIES = (
    ("final_layer.", "final layer"), (".qkv.", "attn qkv"), (".proj.", "attn proj"), ("_mlp.", "mlp"),
    ("_mod.", "modulation"),
    ("modulation.", "modulation"), (".linear1.", "single linear1 (qkv+mlp in)"),
    (".linear2.", "single linear2 (attn+mlp out)"), ("norm.", "qk norms"),
)


def tensor_category(key: str) -> str:
    """Tensor type for the summary: attn qkv, attn proj, mlp, modulation, single linear1/2, qk norms, embedders,
    final layer, biases. `key` is BFL or diffusers."""
    module, _, param = key.rpartition(".")
    if not keymap.is_bfl_key(key):
        try:
            module = keymap.diffusers_module_to_bfl(module)[0]
        except KeyError:
            return "other"
    if param == "bias":
        return "biases"
    for needle, cat in CATEGORIES:
        if needle in module + ".":
            return cat
    return "embedders"


@dataclass
class _ErrStat:
    err2: float = 0.0
    ref2: float = 0.0
    tensors: int = 0
    params: int = 0
    dtypes: set = field(default_factory=set)

    @property
    def rel_rms(self) -> float:
        return (self.err2 / self.ref2) ** 0.5 if self.ref2 > 0 else 0.0


@dataclass
class ConvertSummary:
    """What `convert_checkpoint` did: sizes, per-type relative RMS error of the stored weights, timings."""

    src: str
    dst: str
    src_format: str
    dst_format: str
    spec: FluxSpec
    src_bytes: int
    dst_bytes: int
    num_tensors: int
    seconds: float
    errors: dict[str, _ErrStat]
    output_rel_err: float | None = None
    output_note: str = ""

    def lines(self) -> list[str]:
        name = preset_name(self.spec) or f"hidden {self.spec.hidden_size}"
        out = [
            f"converted {self.src} ({self.src_format}) -> {self.dst} ({self.dst_format}), {name}, "
            f"{self.num_tensors} tensors in {self.seconds:.1f} s",
            f"size: {_gb(self.src_bytes)} -> {_gb(self.dst_bytes)} ({self.dst_bytes / max(self.src_bytes, 1):.0%})",
            "relative RMS error of stored weights vs source, per tensor type:",
        ]
        for cat, s in sorted(self.errors.items(), key=lambda kv: -kv[1].params):
            dts = ",".join(sorted(str(d).removeprefix("torch.") for d in s.dtypes))
            out.append(f"  {cat:32s} {s.rel_rms:10.3e}   {s.tensors:5d} tensors {s.params / 1e6:10.2f} M params  {dts}")
        if self.output_rel_err is not None:
            out.append(f"model output relative RMS error vs source (fixed input): {self.output_rel_err:.3e}"
                       + (f" ({self.output_note})" if self.output_note else ""))
        elif self.output_note:
            out.append(f"model output check: {self.output_note}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _target_dtype(key, shape, src_dtype, dtype, scaling) -> tuple[torch.dtype, bool]:
    """(stored dtype, quantize?) for one output tensor."""
    is_fp8 = src_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    target = dtype if dtype is not None else (torch.float8_e4m3fn if is_fp8 else src_dtype)
    if target == torch.float8_e4m3fn:
        if fp8lib.is_quantized_key(key, shape):
            return torch.float8_e4m3fn, True
        high = src_dtype if not is_fp8 else torch.bfloat16  # embedders, biases, norms, final layer stay high precision
        return high, False
    return target, False


def _export(src: _Source, dst: Path, *, format: str, dtype, scaling: str | None, metadata, max_shard_bytes: int,
            progress: bool, spec: FluxSpec) -> tuple[dict[str, _ErrStat], int]:
    if format not in ("bfl", "diffusers"):
        raise CheckpointError(f"unknown output format '{format}' (use bfl or diffusers)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype '{dtype}' (use {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    src_scaling = src.scaling()
    will_fp8 = dtype == torch.float8_e4m3fn or (dtype is None and src_scaling is not None)
    if scaling is None:
        scaling = (src_scaling or "none") if will_fp8 else "none"
    if scaling not in fp8lib.SCALINGS:
        raise CheckpointError(f"unknown fp8 scaling '{scaling}' (use {', '.join(fp8lib.SCALINGS)})")
    if scaling != "none" and not will_fp8:
        raise CheckpointError(f"--scaling {scaling} needs --dtype fp8_e4m3fn (scales only exist for fp8 weights)")
    if scaling != "none" and format != "bfl":
        raise CheckpointError("scaled fp8 is written as a BFL single file only (ComfyUI's layout): use --format bfl")
    keys = src.weight_keys()
    if src.space == format:
        plan = [keymap.Group((k,), (k,), "rename") for k in keys]
    elif format == "diffusers":
        plan = keymap.plan_bfl_to_diffusers(keys, spec.hidden_size)
    else:
        plan = keymap.plan_diffusers_to_bfl(keys, spec.hidden_size)
    shapes = {k: src.infos[k][1] for k in keys}
    entries, decisions = [], {}
    for g in plan:
        for key, shape in keymap.output_shape(g, shapes).items():
            st, quant = _target_dtype(key, shape, src.infos[g.inputs[0]][0], dtype, scaling)
            decisions[key] = (st, quant)
            entries.append((key, st, shape))
            if quant and scaling != "none":
                entries.append((key[: -len("weight")] + "scale_weight", torch.float32,
                                () if scaling == "tensor" else (shape[0],)))
    if any(q for _, q in decisions.values()) and scaling != "none":
        entries.insert(0, (SCALED_FP8_MARKER if scaling == "tensor" else CHANNEL_FP8_MARKER, torch.float8_e4m3fn, (0,)))
    meta = dict(src.metadata) if src.path is not None else {}
    meta.update(metadata or {})
    meta["format"] = "pt"
    stats: dict[str, _ErrStat] = {}
    writers = _open_writers(dst, format, entries, meta, spec, max_shard_bytes)
    where = {k: w for w in writers for k in w.slots}
    try:
        from tqdm.auto import tqdm

        for key in where:
            if key in MARKERS:
                where[key].write(key, torch.empty(0, dtype=torch.float8_e4m3fn))
        for g in tqdm(plan, desc=f"writing {dst.name}", unit="group", disable=not progress, leave=False):
            tensors = {k: src.read(k) for k in g.inputs}
            for key, t in keymap.run_group(g, tensors).items():
                st, quant = decisions[key]
                if quant:
                    w8, scale = fp8lib.quantize(t, scaling)
                    approx = fp8lib.dequantize(w8, scale)
                    where[key].write(key, w8)
                    if scale is not None:
                        sk = key[: -len("weight")] + "scale_weight"
                        where[sk].write(sk, scale)
                else:
                    w8 = t if t.dtype == st else t.to(st)
                    approx = w8
                    where[key].write(key, w8)
                if t.is_floating_point():
                    s = stats.setdefault(tensor_category(key), _ErrStat())
                    if approx is not t:  # stored exactly otherwise: no error to measure
                        ref = t.float()
                        s.err2 += float(torch.linalg.vector_norm(approx.float() - ref)) ** 2
                        s.ref2 += float(torch.linalg.vector_norm(ref)) ** 2
                    s.tensors += 1
                    s.params += t.numel()
                    s.dtypes.add(st)
                del t, w8, approx
            del tensors
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return stats, _commit(dst, format, writers, spec, entries)


def _shards(entries, max_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for e in entries:
        n = _numel(e[2]) * e[1].itemsize
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    return shards


def _open_writers(dst: Path, format: str, entries, meta, spec, max_shard_bytes) -> list[_StreamWriter]:
    if format == "bfl":
        dst.parent.mkdir(parents=True, exist_ok=True)
        return [_StreamWriter(dst, entries, meta)]
    tmpdir = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir(parents=True)
    shards = _shards(entries, max_shard_bytes)
    if len(shards) == 1:
        names = [DIFFUSERS_WEIGHTS]
    else:
        names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return [_StreamWriter(tmpdir / n, s, meta) for n, s in zip(names, shards)]


def _commit(dst: Path, format: str, writers: list[_StreamWriter], spec: FluxSpec, entries) -> int:
    if format == "bfl":
        writers[0].commit()
        return dst.stat().st_size
    for w in writers:
        w.commit()
    tmpdir = writers[0].path.parent
    import diffusers

    cfg = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": diffusers.__version__,
           **spec.diffusers_config()}
    cfg["axes_dims_rope"] = list(cfg["axes_dims_rope"])
    (tmpdir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if len(writers) > 1:
        index = {"metadata": {"total_size": sum(w.total for w in writers)},
                 "weight_map": {k: w.path.name for w in writers for k in w.slots}}
        (tmpdir / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(tmpdir, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return sum(p.stat().st_size for p in dst.iterdir() if p.is_file())


def _check_dst(dst: Path, format: str, src_path: Path | None) -> None:
    if src_path is not None and dst.resolve() == Path(src_path).resolve():
        raise CheckpointError(f"{dst}: output is the input; choose another output path")
    if format == "bfl" and dst.is_dir():
        raise CheckpointError(f"{dst}: is a folder; a BFL checkpoint is one .safetensors file")
    if format == "bfl" and dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: BFL output must end in .safetensors")
    if format == "diffusers" and dst.exists() and (
            dst.is_file() or (any(dst.iterdir()) and _diffusers_dir(dst) != dst)):
        raise CheckpointError(f"{dst}: exists and is not a diffusers transformer folder; choose a new path")


def save_transformer(model_or_state_dict, path, *, format: str = "bfl", dtype=None, scaling: str | None = None,
                     metadata: dict[str, str] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                     spec: FluxSpec | None = None, progress: bool = False) -> Path:
    """Save a transformer (model or state dict, diffusers or BFL keys; fp8 modules included) atomically as a BFL
    single file (`format="bfl"`) or a diffusers folder (`"diffusers"`, sharded above `max_shard_bytes`).

    `dtype`: None keeps each tensor's dtype; `torch.bfloat16`/`"bf16"`, ..., `"fp8_e4m3fn"` converts (fp8 applies to
    block linears only, see `fp8`). `scaling`: fp8 scaling none/tensor/channel (None: the model's own, else none).
    """
    path = Path(path)
    if isinstance(model_or_state_dict, nn.Module):
        sd = model_or_state_dict.state_dict()
        if spec is None and hasattr(model_or_state_dict, "config"):
            spec = FluxSpec.from_diffusers_config(dict(model_or_state_dict.config))
    else:
        sd = model_or_state_dict
    src = _DictSource(sd)
    if spec is None:
        spec = _spec_from_bfl_shapes(_bfl_shapes(src), "state dict")
    _check_shapes(src, spec)
    _check_dst(path, format, None)
    _export(src, path, format=format, dtype=dtype, scaling=scaling, metadata=metadata,
            max_shard_bytes=max_shard_bytes, progress=progress, spec=spec)
    return path


def convert_checkpoint(src, dst, *, format: str = "bfl", dtype=None, scaling: str | None = None,
                       metadata: dict[str, str] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                       progress: bool = True) -> ConvertSummary:
    """Convert a checkpoint file/folder to BFL or diffusers, optionally to another dtype or fp8 scaling, reading and
    writing one tensor group at a time (peak extra memory ~ one fused linear in fp32). Returns a summary with sizes
    and the relative RMS error per tensor type; the model-output check is `model_output_error`."""
    t0 = time.perf_counter()
    dst = Path(dst)
    source = _open_source(resolve_ref(src))
    try:
        spec = _spec_of(source)
        _check_dst(dst, format, source.path)
        stats, nbytes = _export(source, dst, format=format, dtype=dtype, scaling=scaling, metadata=metadata,
                                max_shard_bytes=max_shard_bytes, progress=progress, spec=spec)
        dst_format = detect_format(dst)
        return ConvertSummary(str(src), str(dst), source.format, dst_format, spec, source.nbytes(), nbytes,
                              sum(s.tensors for s in stats.values()), time.perf_counter() - t0, stats)
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------------------------------
# Output check and hashing


def fixed_inputs(spec: FluxSpec, seed: int = 0, latent: int = 8, txt_len: int = 8, dtype=torch.float32):
    """A fixed, seeded input for comparing two models: packed latents of a `latent x latent` latent, `txt_len` text
    tokens, t = 0.6, guidance 3.5 (ignored without a guidance embedding)."""
    from dev2pro.flux.models import image_ids, text_ids

    g = torch.Generator().manual_seed(seed)
    n = (latent // 2) ** 2
    return dict(
        x=torch.randn(1, n, spec.in_channels, generator=g).to(dtype),
        t=torch.full((1,), 0.6),
        txt=torch.randn(1, txt_len, spec.context_in_dim, generator=g).to(dtype),
        pooled=torch.randn(1, spec.vec_in_dim, generator=g).to(dtype),
        img_ids=image_ids(latent, latent), txt_ids=text_ids(txt_len), guidance=3.5,
    )


@torch.no_grad()
def model_output(model, inputs: dict) -> torch.Tensor:
    """The model's velocity on `fixed_inputs`, with the inputs cast to the model's (input embedder's) dtype."""
    from dev2pro.flux.models import predict

    dt = model.x_embedder.weight.dtype
    return predict(model, inputs["x"].to(dt), inputs["t"], inputs["txt"].to(dt), inputs["pooled"].to(dt),
                   inputs["img_ids"], inputs["txt_ids"], inputs["guidance"])


def model_output_error(ref_a, ref_b, *, seed: int = 0, dtype=torch.float32) -> float:
    """Relative RMS difference of two checkpoints' outputs on `fixed_inputs` (fp8 weights dequantized to `dtype`
    on the fly; one model in memory at a time)."""
    a = load_transformer(ref_a, dtype=dtype)
    spec = FluxSpec.from_diffusers_config(dict(a.config))
    inputs = fixed_inputs(spec, seed, dtype=dtype)
    out_a = model_output(a, inputs).float()
    del a
    b = load_transformer(ref_b, dtype=dtype)
    out_b = model_output(b, inputs).float()
    return fp8lib.relative_rms(out_b, out_a)


_HASHES: dict[tuple, str] = {}


# Hashes of large files survive the process in a small JSON file (path, size, mtime -> sha256), so a training run
# does not re-read a 24 GB base just to record its hash. Small files (tests, LoRAs) are never written there.
HASH_CACHE_FILE = Path.home() / ".cache" / "dev2pro" / "sha256.json"
HASH_CACHE_MIN_BYTES = 64 * 1024 * 1024


def _disk_hash_cache(update: tuple[str, str] | None = None) -> dict[str, str]:
    try:
        cache = json.loads(HASH_CACHE_FILE.read_text()) if HASH_CACHE_FILE.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    if update is not None:
        cache[update[0]] = update[1]
        try:  # best effort: a read-only home only costs the next run a re-hash
            HASH_CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
            tmp = HASH_CACHE_FILE.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=0))
            os.replace(tmp, HASH_CACHE_FILE)
        except OSError:
            pass
    return cache


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    disk_key = f"{key[0]}|{key[1]}|{key[2]}"
    big = st.st_size >= HASH_CACHE_MIN_BYTES
    if key not in _HASHES and big:
        cached = _disk_hash_cache().get(disk_key)
        if cached:
            _HASHES[key] = cached
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(16 * 1024 * 1024), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
        if big:
            _disk_hash_cache((disk_key, _HASHES[key]))
    return _HASHES[key]


def model_hash(path) -> str:
    """A content hash for LoRA metadata: `sha256:<hex>` of the file bytes (streamed, 16 MB chunks; cached per
    process by path, size and mtime). For a diffusers folder: sha256 over the sorted lines `<name> <sha256>` of its
    config.json, index and safetensors files. A 24 GB file takes about a minute to hash on a fast disk."""
    p = resolve_ref(path)
    if p.is_file():
        return "sha256:" + _file_sha256(p)
    d = _diffusers_dir(p) if p.is_dir() else None
    if d is None:
        raise CheckpointError(f"{p}: not a checkpoint file or diffusers folder")
    names = sorted(x.name for x in d.iterdir() if x.is_file() and (x.suffix in (".safetensors", ".json")))
    lines = "".join(f"{n} {_file_sha256(d / n)}\n" for n in names)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def iter_state_dict(ref, *, space: str = "diffusers") -> Iterable[tuple[str, torch.Tensor]]:
    """Stream `(key, tensor)` of a checkpoint in `space` ('diffusers' or 'bfl'), fp8 weights dequantized to fp32,
    one group in memory at a time (for LoRA extraction, merging, statistics)."""
    src = _open_source(resolve_ref(ref))
    try:
        spec = _spec_of(src)
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
