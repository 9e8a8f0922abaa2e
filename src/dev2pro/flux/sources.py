"""A transformer checkpoint seen as one key space of logical tensors, and which format it is (`detect_format`).

Formats read:

- `bfl`: BFL single file (BFL, ComfyUI; keys may carry `model.diffusion_model.`, other keys of a full ComfyUI
  checkpoint such as the VAE are then ignored);
- `diffusers`: a folder with `config.json` + `diffusion_pytorch_model*.safetensors` (single or sharded with an index),
  a pipeline folder with a `transformer/` subfolder, or one diffusers-keyed safetensors file;
- `fp8`: BFL keys with block weights in float8_e4m3fn (the published fp8 reposts);
- `comfy-scaled-fp8`: ComfyUI's scaled fp8 (`scaled_fp8` marker tensor, per-layer fp32 scalar `scale_weight`);
- `dev2pro-channel-fp8`: ours, per-output-row fp32 `scale_weight` and a `dev2pro_fp8_channel` marker (docs/formats.md);
- `dcp-shards`: a sharded training checkpoint folder (`dev2pro.flux.sharded_source`);
- `lora`: a LoRA file (described by `dev2pro.lora.describe.describe_lora`, not loadable as a transformer).

A `Source` (`open_source(path)` for files and folders, `DictSource` for an in-memory state dict) strips prefixes, sets
the fp8 markers and ComfyUI's `scale_input` aside, and reads one tensor at a time (fp8 weights dequantized with their
scale unless asked not to). Loading, saving, converting and LoRA merging all read through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dev2pro.errors import CheckpointError
from dev2pro.flux import fp8 as fp8lib
from dev2pro.flux import keymap
from dev2pro.flux.safetensors_io import SafetensorsFile, open_safetensors, refuse_pickle
from dev2pro.flux.value_check import check_tensor

SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI: its dtype is the fp8 type
CHANNEL_FP8_MARKER = "dev2pro_fp8_channel"  # ours
MARKERS = (SCALED_FP8_MARKER, CHANNEL_FP8_MARKER)
FLUX_KEY = {"bfl": "double_blocks.0.img_attn.norm.key_norm.scale",
            "diffusers": "transformer_blocks.0.attn.norm_k.weight"}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"


def _is_lora_key(key: str) -> bool:
    return any(s in key for s in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_unet_", ".alpha"))


class Source:
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
        """Tensor `key`; fp8 weights with a scale are dequantized to fp32 unless `dequantize=False`. Tensors read from
        a file pass `value_check.check_tensor` (NaN, Inf, absurd values name the file and the tensor)."""
        t = self._checked(key)
        sk = self.scale_key(key)
        if dequantize and self.is_fp8(key):
            return fp8lib.dequantize(t, self._checked(sk) if sk else None, torch.float32)
        return t

    def _checked(self, key: str) -> torch.Tensor:
        t = self._raw(key)
        return t if self.path is None else check_tensor(t, self.name, key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[1] for k, v in self.infos.items()}


class FileSource(Source):
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


class DictSource(Source):
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


def diffusers_dir(path: Path) -> Path | None:
    if (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model*")):
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return None


def open_source(path) -> FileSource:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        from dev2pro.flux.sharded_source import ShardedSource, is_sharded_checkpoint

        if is_sharded_checkpoint(path):  # a training checkpoint-<step> folder (DCP shards)
            return ShardedSource(path)
        d = diffusers_dir(path)
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
                raise refuse_pickle(d / bins[0], "diffusers folder with pickle weights (.bin)")
            raise CheckpointError(f"{d}: no {DIFFUSERS_WEIGHTS} (or sharded index) in this diffusers folder")
        files = [open_safetensors(d / n) for n in names]
        src = FileSource(files, path, "diffusers", config)
        if src.space != "diffusers":
            raise CheckpointError(f"{d}: weights are not diffusers Flux transformer keys")
        return src
    f = open_safetensors(path)
    src = FileSource([f], path, "?")
    config = None
    if src.space == "diffusers" and (path.parent / "config.json").is_file():
        try:
            config = json.loads((path.parent / "config.json").read_text())
        except (OSError, ValueError):
            config = None
    src.config = config
    src.format = _file_format(src)
    return src


def _file_format(src: Source) -> str:
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
    src = open_source(path)
    src.close()
    return src.format


def resolve_ref(ref, download: bool = True) -> Path:
    """`toy:NAME` (any registered provider, `dev2pro.flux.providers`) -> its model file; a hub id that is no local path
    (`black-forest-labs/FLUX.1-dev`) -> its `transformer/` fetched with `huggingface_hub.snapshot_download` (HF cache;
    not with `download=False`); a path stays a path."""
    from dev2pro.flux import providers
    from dev2pro.flux.encoders import looks_like_hub_id

    found = providers.model_file(ref)
    if found is not None:
        return found
    path = Path(ref)
    if download and not path.exists() and isinstance(ref, str) and looks_like_hub_id(ref):
        return hub_snapshot(ref)
    return path


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub repository's transformer (downloaded into the HF cache if needed)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["transformer/*", "model_index.json"]))
    except Exception as e:  # hub errors: offline, gated, not found
        raise CheckpointError(f"{repo_id}: no such local file or folder, and the hub gave no transformer/ for it "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
