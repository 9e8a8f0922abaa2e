"""LoRA operations on whole checkpoints, streamed layer by layer: merge LoRAs into a base, extract a LoRA from the
difference of two models, resize a LoRA's rank.

- `merge_into_checkpoint(base, out, [(lora, strength), ...])`: `W += sum strength * alpha / r * B @ A`, computed in
  fp32 while the base is copied tensor group by tensor group (`dev2pro.flux.convert`'s streaming exporter). An fp8 base
  is dequantized, merged and re-quantized with the chosen scaling (default: the base's own); other dtypes as given.
- `extract_lora(a, b, out, rank=R | energy=0.9)`: per Linear weight, the best rank-r approximation of `B - A`
  (Eckart-Young) by randomized SVD (`torch.svd_lowrank`, Halko et al. 2011, a few power iterations); `energy` picks
  the smallest rank whose singular values hold that fraction of `||B - A||_F^2` (capped at `max_rank`). The summary
  lists the captured energy per layer and overall, and the energy left in tensors a LoRA cannot hold (biases, norms).
  The factors split the singular values evenly: up = U sqrt(S), down = sqrt(S) V^T, alpha = rank (scale 1).
- `resize_lora(in, out, rank)`: truncated SVD of each layer's `B @ A` without forming it: with `B = Q_b R_b` and
  `A^T = Q_a R_a` (thin QR), `B A = Q_b (R_b R_a^T) Q_a^T`, so the SVD of the small r x r core gives the exact
  singular vectors. Alpha is folded into the factors (new alpha = new rank).

Layers are "units" in the key space of the output format: kohya output works on BFL modules (fused qkv and
linear1 are one matrix, so the file has rank r everywhere); diffusers output on diffusers modules.

Pitfalls: the output of a merge into an fp8 base is re-quantized: merging then extracting recovers the LoRA only up
to fp8 rounding. Randomized SVD is exact for matrices of rank <= q - oversampling; for full-rank differences it is
within a hair of the truncated SVD with 2+ power iterations (checked in tests against `torch.linalg.svd`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import convert, describe, keymap, sources
from dev2pro.lora.files import load_lora, save_lora
from dev2pro.lora.formats import FORMATS, bfl_lora_to_layers, layers_to_bfl
from dev2pro.lora.inject import TARGET_PRESETS, LoraLayer, LoraWeights

# ---------------------------------------------------------------------------------------------------------------------
# Pure math


def lowrank_factors(delta: torch.Tensor, rank: int | None = None, energy: float | None = None, max_rank: int = 256,
                    oversample: int = 8, niter: int = 2, exact: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """`delta` (out, in) ~ up @ down with up (out, r), down (r, in). Returns (up, down, captured energy, total).

    Give `rank` or `energy` (fraction of `||delta||_F^2` to keep; the smallest rank reaching it, at most `max_rank`).
    `exact=True` uses a full SVD (reference / small matrices)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    d = delta.float()
    total = float(d.pow(2).sum())
    full = min(d.shape)
    want = min(rank if rank is not None else max_rank, full)
    if exact or want + oversample >= full:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        v = vh.T
    else:
        u, s, v = torch.svd_lowrank(d, q=want + oversample, niter=niter)
    if energy is not None:
        cum = torch.cumsum(s.pow(2), 0) / max(total, 1e-30)
        r = int(torch.searchsorted(cum, torch.tensor(min(energy, 1.0) - 1e-7, dtype=cum.dtype)).item()) + 1
        r = max(1, min(r, want, s.numel()))
    else:
        r = max(1, min(want, s.numel()))
    s_r = s[:r]
    root = s_r.sqrt()
    up = u[:, :r] * root
    down = (v[:, :r] * root).T
    return up.contiguous(), down.contiguous(), float(s_r.pow(2).sum()), total


def resize_factors(down: torch.Tensor, up: torch.Tensor, scale: float, rank: int
                   ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Truncate `scale * up @ down` to `rank` through thin QRs (never forms the (out, in) product).
    Returns (new_down, new_up, kept energy, total energy); the new layer has alpha = its rank (scale 1)."""
    qb, rb = torch.linalg.qr(up.double())
    qa, ra = torch.linalg.qr(down.double().T)
    core = scale * (rb @ ra.T)
    u, s, vh = torch.linalg.svd(core)
    k = max(1, min(rank, s.numel()))
    root = s[:k].sqrt()
    new_up = (qb @ u[:, :k]) * root
    new_down = root[:, None] * (vh[:k] @ qa.T)
    return new_down.float(), new_up.float(), float(s[:k].pow(2).sum()), float(s.pow(2).sum())


# ---------------------------------------------------------------------------------------------------------------------
# Key spaces


def _space_for(format: str) -> str:
    return "bfl" if format == "kohya" else "diffusers"


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _is_linear_weight(key: str, shape, space: str) -> bool:
    if not key.endswith(".weight") or len(shape) != 2:
        return False
    module = _module_of(key)
    try:
        if space == "bfl":
            parts = keymap.bfl_module_to_diffusers(shape[1], module)
        else:
            keymap.diffusers_module_to_bfl(module)
            parts = [(module, None)]
    except KeyError:
        return False
    return not any(p.rsplit(".", 1)[-1].startswith("norm_") for p, _ in parts)


def _target_filter(targets):
    """Predicate on diffusers module paths (a BFL unit is selected when any of its pieces is)."""
    if targets in (None, "all"):
        return lambda path: True
    entries = [targets] if isinstance(targets, str) else list(targets)
    patterns = []
    for e in entries:
        for p in TARGET_PRESETS.get(e, (e,)):
            try:
                patterns.append(re.compile(p))
            except re.error as err:
                raise UserError(f"target '{e}' is not a preset ({', '.join(TARGET_PRESETS)}, all) nor a valid "
                                f"regex: {err}") from None
    return lambda path: any(p.fullmatch(path) for p in patterns)


def _unit_selected(module: str, space: str, hidden: int, select) -> bool:
    if space == "diffusers":
        return select(module)
    return any(select(p) for p, _ in keymap.bfl_module_to_diffusers(hidden, module))


def _unit_to_layers(module: str, space: str, down, up, alpha) -> dict[str, LoraLayer]:
    if space == "diffusers":
        return {module: LoraLayer(down, up, alpha)}
    return bfl_lora_to_layers(module, down, up, alpha)


class _KeyedReader:
    """Random access to a checkpoint's tensors in one key space, fp8 dequantized to fp32; fused groups are computed
    once and their other outputs kept until asked for (streams in the other file's order stay cheap)."""

    def __init__(self, ref, space: str):
        self.src = sources.open_source(sources.resolve_ref(ref))
        self.spec = describe.spec_of(self.src)
        keys = self.src.weight_keys()
        if self.src.space == space:
            self.plan = [keymap.Group((k,), (k,), "rename") for k in keys]
        elif space == "diffusers":
            self.plan = keymap.plan_bfl_to_diffusers(keys, self.spec.hidden_size)
        else:
            self.plan = keymap.plan_diffusers_to_bfl(keys, self.spec.hidden_size)
        self.group_of = {o: g for g in self.plan for o in g.outputs}
        self.shapes: dict[str, tuple[int, ...]] = {}
        in_shapes = {k: self.src.infos[k][1] for k in keys}
        for g in self.plan:
            self.shapes.update(keymap.output_shape(g, in_shapes))
        self._cache: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return [o for g in self.plan for o in g.outputs]

    def get(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            g = self.group_of[key]
            self._cache.update(keymap.run_group(g, {k: self.src.read(k) for k in g.inputs}))
        return self._cache.pop(key).float()

    def close(self):
        self.src.close()


# ---------------------------------------------------------------------------------------------------------------------
# Extract


@dataclass
class LayerEnergy:
    key: str
    rank: int
    captured: float  # sum of kept squared singular values
    total: float  # ||B - A||_F^2

    @property
    def fraction(self) -> float:
        return self.captured / self.total if self.total > 0 else 1.0


@dataclass
class ExtractSummary:
    out: str
    format: str
    layers: list[LayerEnergy] = field(default_factory=list)
    unchanged: int = 0
    other_energy: float = 0.0  # ||B - A||^2 in tensors a LoRA cannot hold (biases, norms, untargeted)
    other_tensors: int = 0
    seconds: float = 0.0
    num_params: int = 0

    @property
    def captured(self) -> float:
        return sum(x.captured for x in self.layers)

    @property
    def total(self) -> float:
        return sum(x.total for x in self.layers)

    @property
    def fraction(self) -> float:
        return self.captured / self.total if self.total > 0 else 1.0

    def lines(self, per_layer: bool = True) -> list[str]:
        ranks = sorted({x.rank for x in self.layers})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}" if ranks else "-"
        out = [f"extracted {len(self.layers)} layers -> {self.out} ({self.format}), rank {rank_text}, "
               f"{self.num_params:,} LoRA parameters, {self.seconds:.1f} s",
               f"captured energy of the difference (sum of kept sigma^2 / ||B - A||_F^2): overall {self.fraction:.4f}"]
        if self.unchanged:
            out.append(f"{self.unchanged} layers identical in both models (skipped)")
        if self.other_tensors:
            share = self.other_energy / max(self.other_energy + self.total, 1e-30)
            out.append(f"not representable as LoRA: {self.other_tensors} tensors (biases, norms, untargeted) holding "
                       f"{share:.2%} of the total squared difference")
        if per_layer and self.layers:
            out.append("per layer (rank, captured energy):")
            out += [f"  {x.key:60s} {x.rank:4d}  {x.fraction:.4f}" for x in self.layers]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def extract_lora(a_path, b_path, out_path, rank: int | None = None, energy: float | None = None, *,
                 format: str = "kohya", targets="all", max_rank: int = 256, niter: int = 2,
                 min_norm: float = 0.0, device=None, dtype: torch.dtype | None = None,
                 metadata: dict | None = None, progress: bool = True,
                 energy_threshold: float | None = None) -> ExtractSummary:
    """Write a LoRA approximating `B - A` (so that A + LoRA ~ B) and return the energy summary.

    `rank` or `energy` (0 < energy <= 1); `targets`: "all" (every Linear, default), a preset or regexes on diffusers
    module paths; layers whose difference norm is <= `min_norm` are skipped. `device` runs the SVDs there (e.g.
    "cuda"). Both models must have the same architecture. `energy_threshold` is an alias of `energy`."""
    energy = energy if energy_threshold is None else energy_threshold
    if (rank is None) == (energy is None):
        raise UserError("give --rank R or --energy F (not both)")
    if rank is not None and rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UserError(f"energy must be in (0, 1], got {energy}")
    if format not in FORMATS:
        raise UserError(f"unknown LoRA format '{format}' (choose {' or '.join(FORMATS)})")
    t0 = time.perf_counter()
    space = _space_for(format)
    select = _target_filter(targets)
    a = _KeyedReader(a_path, space)
    try:
        b = _KeyedReader(b_path, space)
        try:
            if a.spec != b.spec:
                raise CheckpointError(f"{a_path} and {b_path} have different architectures "
                                      f"(hidden {a.spec.hidden_size} x {a.spec.depth}+{a.spec.depth_single_blocks} "
                                      f"blocks vs hidden {b.spec.hidden_size} x {b.spec.depth}+"
                                      f"{b.spec.depth_single_blocks})")
            summary = ExtractSummary(str(out_path), format)
            layers: dict[str, LoraLayer] = {}
            from tqdm.auto import tqdm

            keys = b.keys()
            missing = [k for k in keys if k not in a.group_of]
            if missing:
                raise CheckpointError(f"{a_path} lacks tensors of {b_path}: {', '.join(missing[:3])}")
            for key in tqdm(keys, desc="extracting", unit="tensor", disable=not progress, leave=False):
                tb = b.get(key)
                ta = a.get(key)
                d = (tb - ta).to(device) if device else tb - ta
                del ta, tb
                module = _module_of(key)
                if _is_linear_weight(key, d.shape, space) and _unit_selected(module, space, a.spec.hidden_size,
                                                                              select):
                    norm = float(d.norm())
                    if norm <= min_norm:
                        summary.unchanged += 1
                        continue
                    up, down, kept, total = lowrank_factors(d, rank, energy, max_rank=max_rank, niter=niter)
                    if space == "bfl":  # pieces of a fused linear that did not change get exactly zero up rows
                        for _, rows in keymap.bfl_module_to_diffusers(a.spec.hidden_size, module):
                            if not d[rows].any():
                                up[rows] = 0.0
                    r = down.shape[0]
                    layers.update(_unit_to_layers(module, space, down.cpu(), up.cpu(), float(r)))
                    summary.layers.append(LayerEnergy(module, r, kept, total))
                elif d.is_floating_point():
                    e = float(d.float().pow(2).sum())
                    if e > 0:
                        summary.other_energy += e
                        summary.other_tensors += 1
        finally:
            b.close()
    finally:
        a.close()
    if not layers:
        raise UserError(f"{a_path} and {b_path} do not differ in any selected Linear weight; nothing to extract")
    meta = {"dev2pro.extracted_from": f"{Path(str(b_path)).name} - {Path(str(a_path)).name}",
            "dev2pro.extract_rank": str(rank) if rank is not None else f"energy {energy}",
            "dev2pro.extract_energy": f"{summary.fraction:.6f}"}
    meta.update(metadata or {})
    lora = LoraWeights(layers=layers, metadata=meta)
    save_lora(out_path, lora, format, dtype=dtype)
    summary.num_params = lora.num_params()
    summary.seconds = time.perf_counter() - t0
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Resize


@dataclass
class ResizeSummary:
    out: str
    layers: list[LayerEnergy]
    seconds: float

    @property
    def fraction(self) -> float:
        total = sum(x.total for x in self.layers)
        return sum(x.captured for x in self.layers) / total if total > 0 else 1.0

    def lines(self) -> list[str]:
        worst = min(self.layers, key=lambda x: x.fraction) if self.layers else None
        out = [f"resized {len(self.layers)} LoRA modules -> {self.out} in {self.seconds:.1f} s",
               f"kept energy (sum sigma^2 of B@A after / before): overall {self.fraction:.4f}"]
        if worst is not None:
            out.append(f"lowest: {worst.key} {worst.fraction:.4f}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def resize_lora(in_path, out_path, rank: int, *, format: str | None = None, dtype: torch.dtype | None = None
                ) -> ResizeSummary:
    """Reduce every layer of a LoRA to at most `rank` by truncated SVD of its delta (see module docstring).
    `format`: kohya | diffusers (default: the input's, kohya for ComfyUI/XLabs inputs). Layers already at or below
    `rank` are copied unchanged."""
    if rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    t0 = time.perf_counter()
    lora = load_lora(in_path)
    format = format or (lora.source_format if lora.source_format in FORMATS else "kohya")
    if format not in FORMATS:
        raise UserError(f"unknown LoRA format '{format}' (choose {' or '.join(FORMATS)})")
    space = _space_for(format)
    units = layers_to_bfl(lora) if space == "bfl" else {
        k: (v.down, v.up, float(v.alpha)) for k, v in lora.layers.items()}
    layers: dict[str, LoraLayer] = {}
    report = []
    for module, (down, up, alpha) in units.items():
        r = down.shape[0]
        if r <= rank:
            layers.update(_unit_to_layers(module, space, down, up, alpha))
            total = resize_factors(down, up, alpha / r, r)[3]
            report.append(LayerEnergy(module, r, total, total))
            continue
        new_down, new_up, kept, total = resize_factors(down, up, alpha / r, rank)
        layers.update(_unit_to_layers(module, space, new_down, new_up, float(new_down.shape[0])))
        report.append(LayerEnergy(module, new_down.shape[0], kept, total))
    meta = dict(lora.metadata)
    meta["dev2pro.resized_to"] = str(rank)
    out = LoraWeights(layers=layers, metadata=meta, passthrough=lora.passthrough)
    save_lora(out_path, out, format, dtype=dtype)
    return ResizeSummary(str(out_path), report, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------------
# Merge into a checkpoint


@dataclass
class MergeSummary:
    out: str
    loras: list[tuple[str, float, int]]  # (file, strength, layers)
    weights_changed: int
    seconds: float
    convert_lines: list[str]

    def lines(self) -> list[str]:
        out = [f"merged {len(self.loras)} LoRA(s) into {self.weights_changed} weights -> {self.out} "
               f"in {self.seconds:.1f} s"]
        out += [f"  {f} x {s:g}: {n} layers" for f, s, n in self.loras]
        return out + self.convert_lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _deltas_in_space(lora: LoraWeights, space: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """LoRA units keyed by the weight key of the checkpoint's key space: `<module>.weight -> (down, up, scale)`."""
    if space == "bfl":
        units = layers_to_bfl(lora)
    else:
        units = {k: (v.down, v.up, float(v.alpha)) for k, v in lora.layers.items()}
    return {f"{m}.weight": (d, u, a / d.shape[0]) for m, (d, u, a) in units.items()}


def merge_into_checkpoint(base_path, out_path, loras, *, format: str | None = None, dtype=None,
                          scaling: str | None = None, metadata: dict | None = None, progress: bool = True
                          ) -> MergeSummary:
    """Merge `loras` = [(lora_path_or_LoraWeights, strength), ...] into the checkpoint `base_path` and write
    `out_path`, streaming one tensor group at a time.

    `format`: bfl | diffusers output (default: the base's key space). `dtype`: None keeps the base's dtypes (an fp8
    base stays fp8, re-quantized after merging), or bf16/fp16/fp32/fp8_e4m3fn. `scaling`: fp8 scaling of the output
    (none/tensor/channel; default the base's)."""
    t0 = time.perf_counter()
    if not loras:
        raise UserError("give at least one LoRA to merge")
    src = sources.open_source(sources.resolve_ref(base_path))
    try:
        spec = describe.spec_of(src)
        fmt = format or ("diffusers" if src.space == "diffusers" else "bfl")
        out_path = Path(out_path)
        convert.check_dst(out_path, fmt, src.path)
        deltas: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        report = []
        for item, strength in loras:
            lora = item if isinstance(item, LoraWeights) else load_lora(item)
            name = "LoRA" if isinstance(item, LoraWeights) else str(item)
            units = _deltas_in_space(lora, src.space)
            unknown = [k for k in units if k not in src.infos]
            if unknown:
                raise UserError(f"{name}: {len(unknown)} of {len(units)} layers match no weight in {base_path}, e.g. "
                                f"{', '.join(u.removesuffix('.weight') for u in unknown[:4])}")
            for k, (d, u, scale) in units.items():
                shape = tuple(src.infos[k][1])
                if (u.shape[0], d.shape[1]) != shape:
                    raise UserError(f"{name}: layer '{k.removesuffix('.weight')}' has shape (out {u.shape[0]}, in "
                                    f"{d.shape[1]}) but {base_path} has {list(shape)} (hidden "
                                    f"{spec.hidden_size}); the LoRA was made for a different model")
                deltas.setdefault(k, []).append((d, u, scale * strength))
            report.append((name, float(strength), len(lora.layers)))
        read = src.read

        def read_merged(key: str, dequantize: bool = True) -> torch.Tensor:
            t = read(key, dequantize)
            if key not in deltas:
                return t
            w = t.float()
            for d, u, s in deltas[key]:
                w += s * (u.float() @ d.float())
            return w

        src.read = read_merged  # the streaming exporter reads through this (instance attribute, this source only)
        stats, _ = convert.export(src, out_path, format=fmt, dtype=dtype, scaling=scaling,
                                  metadata={**(metadata or {}),
                                            "dev2pro.merged_loras": ", ".join(f"{Path(n).name}:{s:g}"
                                                                              for n, s, _ in report)},
                                  max_shard_bytes=convert.MAX_SHARD_BYTES, progress=progress, spec=spec)
    finally:
        src.close()
    lines = ["relative RMS storage error (stored vs merged fp32 weights), per tensor type:"]
    for cat, s in sorted(stats.items(), key=lambda kv: -kv[1].params):
        lines.append(f"  {cat:32s} {s.rel_rms:10.3e}")
    return MergeSummary(str(out_path), report, len(deltas), time.perf_counter() - t0, lines)
