"""Writing a transformer checkpoint from a source, in another key space, dtype or fp8 scaling: `convert_checkpoint`,
and the exporter that `save_transformer` and LoRA merging share (`export`).

The conversion is planned before anything is read: the key table (`keymap`) gives the output groups and shapes, each
output tensor gets its stored dtype (`_target_dtype`: fp8 only for block linears, the rest stays high precision), the
safetensors header is written from that plan, then each tensor group is read, converted, quantized, written at its
offset and freed, so peak memory is about one fused linear in fp32, not one model. Outputs are a BFL single file or
a diffusers folder (sharded above `max_shard_bytes` like diffusers' `save_pretrained`, written in a temporary folder
and renamed into place). Scaled fp8 (ComfyUI's per-tensor or our per-channel scales) is written as a BFL file only.

The summary (`ConvertSummary`) reports the relative RMS error of the stored weights per tensor type; the model-output
check is `dev2pro.flux.output_check.model_output_error`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dev2pro.errors import CheckpointError
from dev2pro.flux import fp8 as fp8lib
from dev2pro.flux import keymap
from dev2pro.flux.describe import preset_name, spec_of
from dev2pro.flux.models import FluxSpec
from dev2pro.flux.safetensors_io import StreamWriter, numel
from dev2pro.flux.sources import (
    CHANNEL_FP8_MARKER,
    DIFFUSERS_INDEX,
    DIFFUSERS_WEIGHTS,
    MARKERS,
    SCALED_FP8_MARKER,
    Source,
    detect_format,
    diffusers_dir,
    open_source,
    resolve_ref,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8_e4m3fn": torch.float8_e4m3fn}
MAX_SHARD_BYTES = 10 * 1024**3  # diffusers' save_pretrained default


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


def export(src: Source, dst: Path, *, format: str, dtype, scaling: str | None, metadata, max_shard_bytes: int,
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
        n = numel(e[2]) * e[1].itemsize
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    return shards


def _open_writers(dst: Path, format: str, entries, meta, spec, max_shard_bytes) -> list[StreamWriter]:
    if format == "bfl":
        dst.parent.mkdir(parents=True, exist_ok=True)
        return [StreamWriter(dst, entries, meta)]
    tmpdir = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir(parents=True)
    shards = _shards(entries, max_shard_bytes)
    if len(shards) == 1:
        names = [DIFFUSERS_WEIGHTS]
    else:
        names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return [StreamWriter(tmpdir / n, s, meta) for n, s in zip(names, shards)]


def _commit(dst: Path, format: str, writers: list[StreamWriter], spec: FluxSpec, entries) -> int:
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


def check_dst(dst: Path, format: str, src_path: Path | None) -> None:
    if src_path is not None and dst.resolve() == Path(src_path).resolve():
        raise CheckpointError(f"{dst}: output is the input; choose another output path")
    if format == "bfl" and dst.is_dir():
        raise CheckpointError(f"{dst}: is a folder; a BFL checkpoint is one .safetensors file")
    if format == "bfl" and dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: BFL output must end in .safetensors")
    if format == "diffusers" and dst.exists() and (
            dst.is_file() or (any(dst.iterdir()) and diffusers_dir(dst) != dst)):
        raise CheckpointError(f"{dst}: exists and is not a diffusers transformer folder; choose a new path")


def convert_checkpoint(src, dst, *, format: str = "bfl", dtype=None, scaling: str | None = None,
                       metadata: dict[str, str] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                       progress: bool = True) -> ConvertSummary:
    """Convert a checkpoint file/folder to BFL or diffusers, optionally to another dtype or fp8 scaling, reading and
    writing one tensor group at a time (peak extra memory ~ one fused linear in fp32). Returns a summary with sizes
    and the relative RMS error per tensor type; the model-output check is `model_output_error`."""
    t0 = time.perf_counter()
    dst = Path(dst)
    source = open_source(resolve_ref(src))
    try:
        spec = spec_of(source)
        check_dst(dst, format, source.path)
        stats, nbytes = export(source, dst, format=format, dtype=dtype, scaling=scaling, metadata=metadata,
                                max_shard_bytes=max_shard_bytes, progress=progress, spec=spec)
        dst_format = detect_format(dst)
        return ConvertSummary(str(src), str(dst), source.format, dst_format, spec, source.nbytes(), nbytes,
                              sum(s.tensors for s in stats.values()), time.perf_counter() - t0, stats)
    finally:
        source.close()
