"""The 2x2 evaluation: LoRAs (trained on some base) applied to bases, scored over prompts and seeds.

What it runs (`dev2pro compare CONFIG.toml`):

- **cells**: every LoRA x every base (the "trained-on x applied-to" grid of the article's experiment), plus each base
  without a LoRA as a baseline; each base samples in its own mode: `embedded` (dev-like: the guidance value goes into
  the guidance embedding, one pass, no negative prompt) or `cfg` (de-distilled: true classifier-free guidance with a
  negative prompt, embedded guidance fixed at 1.0 when the model has the embedding);
- **guidance sweep**: the LoRA cells at each base's `sweep` values;
- **curves**: the metrics of each LoRA's intermediate checkpoints (`checkpoint-<step>`) on each base, step 0 being
  the base without a LoRA;
- **metrics** per cell, each with its mean and a 95% interval: style fidelity (the judge's probability of the
  held-out style), prompt adherence (the judge), their product per image ("styled and on prompt"), the Frechet
  distance between the judge's features of the generated images and of reference images of the style, and
  diversity (mean pairwise feature distance between seeds of one prompt).

Statistics (stated in the report): per-image metrics (style, adherence, score) use the Student-t interval over the
images of the cell (prompts x seeds); diversity uses the Student-t interval over prompts; the Frechet distance is a
set statistic, its interval is the delete-one jackknife over generated images (reference set fixed), centred on the
full-set value. Pitfalls: images of one prompt across seeds are not independent draws of the cell's population, so
the t-intervals are somewhat narrow when prompts are few; a percentile bootstrap of the Frechet distance would sit
above the full-set value (resampling duplicates images, which inflates the distance), hence the jackknife; Frechet
distances from few images are biased upwards, so compare cells with equal image counts only.

The heavy parts (loading bases, encoders, LoRAs, sampling, the judge) sit behind `Toolkit`; `FluxToolkit` wires the
project's own modules and tests pass small fakes. Outputs: `report.md`, `results.json`, `grid.png`, `bars.png`,
`sweep.png`, `curves.png` in `output.dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from dev2pro.errors import ConfigError, UserError

# ---------------------------------------------------------------------------------------------------------------------
# Statistics: small pure functions, checked against closed forms in tests.


def _t_pdf(x: np.ndarray, df: float) -> np.ndarray:
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))


def student_t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (Simpson's rule on the density; error < 1e-9)."""
    if x == 0:
        return 0.5
    n = 20000  # even
    xs = np.linspace(0.0, abs(x), n + 1)
    w = np.ones(n + 1)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    area = float((w * _t_pdf(xs, df)).sum() * abs(x) / (3 * n))
    return 0.5 + math.copysign(area, x)


def student_t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t (bisection on `student_t_cdf`). No scipy in this environment."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    q = max(p, 1 - p)
    hi = 2.0
    while student_t_cdf(hi, df) < q:
        hi *= 2.0
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < q else (lo, mid)
    return math.copysign(0.5 * (lo + hi), p - 0.5)


@dataclass(frozen=True)
class Estimate:
    """A metric's value with its interval: `mean` (or the full-sample statistic), `lo`/`hi`, sample size, method."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fmt(self, digits: int | None = None) -> str:
        """`mean [lo, hi]`, 3 decimals below 10, fewer for larger values (Frechet distances run to thousands)."""
        if not math.isfinite(self.mean):
            return "n/a"
        if digits is None:
            digits = 3 if abs(self.mean) < 10 else 2 if abs(self.mean) < 100 else 1
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


NAN_ESTIMATE = Estimate(math.nan, math.nan, math.nan, 0, "none")


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Estimate:
    """Mean and Student-t interval `mean +- t_{(1+level)/2, n-1} * s / sqrt(n)` (s: sample std, ddof=1).
    One value gives an interval of nan (unknown spread)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return NAN_ESTIMATE
    m = float(x.mean())
    if n == 1:
        return Estimate(m, math.nan, math.nan, 1, "t")
    half = student_t_ppf(0.5 + level / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Estimate(m, m - half, m + half, n, "t")


def jackknife_ci(n: int, statistic: Callable[[np.ndarray], float], level: float = 0.95) -> Estimate:
    """Delete-one jackknife: `mean` is the statistic on all items, the interval `mean +- t_{(1+level)/2, n-1} * se`
    with `se^2 = (n - 1) / n * sum_i (theta_(i) - theta_(.))^2`. For the sample mean it is exactly the t-interval.
    Used for the Frechet distance: centred on the full-set value, unlike a resampling bootstrap whose duplicated
    images inflate the distance."""
    if n == 0:
        return NAN_ESTIMATE
    full = float(statistic(np.arange(n)))
    if n < 3:
        return Estimate(full, math.nan, math.nan, n, "jackknife")
    idx = np.arange(n)
    loo = np.array([statistic(np.delete(idx, i)) for i in range(n)], dtype=np.float64)
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    half = student_t_ppf(0.5 + level / 2, n - 1) * se
    return Estimate(full, full - half, full + half, n, "jackknife")


def pairwise_diversity(features: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per group (prompt): mean Euclidean distance between the features of its images (seeds). Groups with fewer
    than two images give nan."""
    out = []
    for g in np.unique(groups):
        f = features[groups == g].astype(np.float64)
        if len(f) < 2:
            out.append(math.nan)
            continue
        d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
        iu = np.triu_indices(len(f), 1)
        out.append(float(d[iu].mean()))
    return np.array(out)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: what each one is, which direction is better. A declarative table the report and the verdict read.


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    interval: str  # how its interval is computed, for the report


METRICS: tuple[Metric, ...] = (
    Metric("style", "style fidelity", True, "t-interval over images"),
    Metric("adherence", "prompt adherence", True, "t-interval over images"),
    Metric("score", "styled and on prompt (style x adherence)", True, "t-interval over images"),
    Metric("fd", "Frechet distance to style references", False, "delete-one jackknife over generated images"),
    Metric("diversity", "diversity across seeds", True, "t-interval over prompts"),
)
METRIC = {m.key: m for m in METRICS}


# ---------------------------------------------------------------------------------------------------------------------
# Configuration (strict TOML, see configs/compare-example.toml)


@dataclass(frozen=True)
class BaseEntry:
    """A base model the LoRAs are applied to, with its sampling mode."""

    name: str
    ref: str  # a checkpoint file/folder, "toy:dev", "preset:tiny-dev", ... (dev2pro.flux.checkpoint.load_transformer)
    mode: Literal["embedded", "cfg"] = "embedded"
    guidance: float = 3.5  # embedded guidance (mode "embedded") or CFG scale (mode "cfg")
    sweep: tuple[float, ...] = ()  # extra guidance values for the sweep
    negative: str = ""  # negative prompt, mode "cfg" only

    def validate(self) -> None:
        if not self.name or not re.fullmatch(r"[\w.+-]+", self.name):
            raise ConfigError(f"bases: name {self.name!r} must be a non-empty word (letters, digits, _ . + -)")
        for g in (self.guidance, *self.sweep):
            if not g > 0:
                raise ConfigError(f"bases '{self.name}': guidance values must be > 0, got {g}")
        if self.negative and self.mode != "cfg":
            raise ConfigError(f"bases '{self.name}': a negative prompt needs mode = \"cfg\"")

    def values(self) -> tuple[float, ...]:
        """The guidance values this base is evaluated at: the main one first, then the sweep."""
        return tuple(dict.fromkeys((self.guidance, *self.sweep)))

    def describe(self, g: float | None = None) -> str:
        g = self.guidance if g is None else g
        return f"embedded g={g:g}" if self.mode == "embedded" else f"true CFG {g:g}"


@dataclass(frozen=True)
class LoraEntry:
    """A LoRA file, what it was trained on, and its intermediate checkpoints for the curves."""

    name: str
    path: str
    trained_on: str  # label for the table ("dev2pro (g=1.0)")
    strength: float = 1.0
    # Intermediate checkpoints: files, `checkpoint-<step>` folders, or one run folder holding `checkpoint-<step>`s.
    checkpoints: tuple[str, ...] = ()

    def validate(self) -> None:
        if not self.name or not re.fullmatch(r"[\w.+-]+", self.name):
            raise ConfigError(f"loras: name {self.name!r} must be a non-empty word (letters, digits, _ . + -)")


@dataclass(frozen=True)
class ModelsSection:
    """`[models]`: the encoders shared by every base (paths, pipeline folders or "toy"), where and in which dtype the
    bases run. fp8 base files stay fp8 (computing in `dtype`)."""

    autoencoder: str = "toy"
    t5: str = "toy"
    clip: str = "toy"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda if available, else cpu
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclass(frozen=True)
class SamplingSection:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 20
    height: int = 32
    width: int = 32
    batch_size: int = 16
    curve_seeds: tuple[int, ...] = ()  # seeds for the checkpoint curves (empty: the first of `seeds`)
    curve_prompts: int = 0  # prompts for the curves (0: all)
    grid_prompts: int = 4  # columns of the image grid: the first prompts ...
    grid_seeds: int = 2  # ... each with its first seeds
    grid_scale: int = 3  # upscale factor of small images in the grid (nearest)

    def validate(self) -> None:
        if not self.prompts:
            raise ConfigError("sampling.prompts: give at least one prompt")
        if not self.seeds:
            raise ConfigError("sampling.seeds: give at least one seed")
        if self.steps < 1 or self.batch_size < 1 or self.height < 1 or self.width < 1:
            raise ConfigError("sampling: steps, batch_size, height and width must be >= 1")

    def curve_seed_list(self) -> tuple[int, ...]:
        return self.curve_seeds or self.seeds[:1]

    def curve_prompt_list(self) -> tuple[str, ...]:
        return self.prompts[: self.curve_prompts] if self.curve_prompts > 0 else self.prompts


@dataclass(frozen=True)
class MetricsSection:
    # "toy" (dev2pro.toy.judge, the toy world's probe), "clip:FOLDER" (a local transformers CLIPModel folder, for real
    # images; see ClipJudge) or "none" (images only, no metrics)
    judge: str = "toy"
    reference: str = ""  # folder of reference images in the style, for the Frechet distance ("" = no FD)
    reference_limit: int = 0  # use at most this many reference images (0 = all)
    level: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        if self.judge not in ("toy", "none") and not (self.judge.startswith("clip:") and len(self.judge) > 5):
            raise ConfigError(f"metrics.judge: expected \"toy\", \"clip:FOLDER\" or \"none\", got {self.judge!r}")
        if not 0 < self.level < 1:
            raise ConfigError(f"metrics.level: expected a value in (0, 1), got {self.level}")


@dataclass(frozen=True)
class ClaimSection:
    """The cell a claim says is best (the article: trained on dev2pro, applied to dev); empty: no verdict."""

    lora: str = ""
    base: str = ""
    metric: str = "score"

    def validate(self) -> None:
        if self.metric not in METRIC:
            raise ConfigError(f"claim.metric: unknown metric {self.metric!r} (known: {', '.join(METRIC)})")


@dataclass(frozen=True)
class OutputSection:
    dir: str = "runs/compare"
    title: str = "LoRA comparison"


@dataclass(frozen=True)
class CompareConfig:
    bases: tuple[BaseEntry, ...]
    loras: tuple[LoraEntry, ...]
    sampling: SamplingSection
    models: ModelsSection = field(default_factory=ModelsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    claim: ClaimSection = field(default_factory=ClaimSection)
    output: OutputSection = field(default_factory=OutputSection)
    baseline: bool = True  # also evaluate every base without a LoRA
    curves: bool = True  # evaluate intermediate checkpoints

    def validate(self) -> None:
        if not self.bases:
            raise ConfigError("bases: give at least one [[bases]] entry")
        for kind, names in (("bases", [b.name for b in self.bases]), ("loras", [x.name for x in self.loras])):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ConfigError(f"{kind}: duplicate name {sorted(dup)[0]!r}")
        if self.claim.lora and self.claim.lora not in [x.name for x in self.loras]:
            raise ConfigError(f"claim.lora: {self.claim.lora!r} is not one of the loras' names")
        if self.claim.base and self.claim.base not in [b.name for b in self.bases]:
            raise ConfigError(f"claim.base: {self.claim.base!r} is not one of the bases' names")
        if bool(self.claim.lora) != bool(self.claim.base):
            raise ConfigError("claim: give both lora and base, or neither")

    def base(self, name: str) -> BaseEntry:
        return next(b for b in self.bases if b.name == name)

    def lora(self, name: str) -> LoraEntry:
        return next(x for x in self.loras if x.name == name)


def idle_cpu_threads() -> int:
    """torch CPU threads for small models: the cores the load average leaves idle, at least 1. Extra threads only help
    on idle cores; on busy ones they cost many times over (measured here: a 2.3M-parameter Flux training step 13x
    slower with 2 threads than with 1 on 2 cores at load 7)."""
    import os

    cores = os.cpu_count() or 1
    idle = int(cores - os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    return max(1, min(cores, idle))


def load_compare_config(path: str | Path, overrides: Sequence[str] = ()) -> CompareConfig:
    from dev2pro.config import load_config

    return load_config(CompareConfig, path, list(overrides))


# ---------------------------------------------------------------------------------------------------------------------
# Intermediate checkpoints

_STEP_RE = re.compile(r"checkpoint-(\d+)")
_STATE_FILES = ("trainable", "optimizer", "rng-", "extra")  # dev2pro.train.checkpointing.save_checkpoint's files


def _lora_file_in(folder: Path) -> Path:
    """The LoRA in a checkpoint folder: a LoRA file if there is one, else the folder itself when it is a train-lora
    checkpoint (`trainable.safetensors` + `config.toml`, read by `read_lora`)."""
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith(_STATE_FILES))
    if files:
        return files[0]
    if (folder / "trainable.safetensors").is_file() and (folder / "config.toml").is_file():
        return folder
    raise UserError(f"{folder}: no LoRA .safetensors file (or train-lora trainable.safetensors + config.toml) inside")


def read_lora(path: Path):
    """`LoraWeights` from a LoRA file (any format `lora_files.load_lora` reads) or a train-lora checkpoint folder
    (its trainable peft state, with `lora.alpha` from the checkpoint's config.toml)."""
    from dev2pro.lora.files import load_lora

    path = Path(path)
    if path.is_file():
        return load_lora(path)
    import tomllib

    from safetensors.torch import load_file

    from dev2pro.train.recipes.train_lora import lora_from_state

    cfg = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
    alpha = cfg.get("lora", {}).get("alpha")
    if alpha is None:
        raise UserError(f"{path / 'config.toml'}: no lora.alpha; is this a train-lora checkpoint?")
    return lora_from_state(load_file(str(path / "trainable.safetensors")), float(alpha))


def find_checkpoints(entries: Sequence[str], root: Path | None = None) -> list[tuple[int, Path]]:
    """(step, LoRA file) for each intermediate checkpoint, sorted by step. An entry is a LoRA file or folder named
    `...checkpoint-<step>...`, or a run folder whose `checkpoint-<step>` children are taken."""
    found: dict[int, Path] = {}
    for entry in entries:
        p = Path(entry)
        if root is not None and not p.is_absolute():
            p = root / p
        if not p.exists():
            raise UserError(f"LoRA checkpoint {p} does not exist")
        m = _STEP_RE.search(p.name)
        if p.is_dir() and m is None:
            children = [c for c in p.iterdir() if _STEP_RE.fullmatch(c.stem if c.is_file() else c.name)]
            if not children:
                raise UserError(f"{p}: no checkpoint-<step> files or folders inside")
            for c in children:
                step = int(_STEP_RE.search(c.name).group(1))
                found[step] = _lora_file_in(c) if c.is_dir() else c
            continue
        if m is None:
            raise UserError(f"LoRA checkpoint {p}: name it checkpoint-<step> so its training step is known")
        found[int(m.group(1))] = _lora_file_in(p) if p.is_dir() else p
    return sorted(found.items())


# ---------------------------------------------------------------------------------------------------------------------
# The work list


@dataclass(frozen=True)
class Job:
    """One set of images: a base, a LoRA (None: no LoRA) at a training step (None: the final file), a guidance value,
    and the prompts x seeds to sample."""

    base: str
    lora: str | None
    step: int | None
    guidance: float
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]

    @property
    def key(self) -> str:
        lora = self.lora or "none"
        step = "final" if self.step is None else f"step{self.step}"
        return f"{lora}@{step}|{self.base}|g{self.guidance:g}|n{len(self.prompts)}x{len(self.seeds)}"


def plan_jobs(cfg: CompareConfig, checkpoints: dict[str, list[tuple[int, Path]]]) -> list[Job]:
    """Every distinct job, grouped by base and then by LoRA/step so each base loads once and each LoRA merges once."""
    s = cfg.sampling
    loras: list[str | None] = ([None] if cfg.baseline else []) + [x.name for x in cfg.loras]
    jobs: dict[str, Job] = {}
    for b in cfg.bases:
        for lora in loras:
            for g in (b.values() if lora is not None else (b.guidance,)):  # the sweep covers the LoRA cells
                j = Job(b.name, lora, None, g, s.prompts, s.seeds)
                jobs.setdefault(j.key, j)
        if cfg.curves and any(checkpoints.values()):
            cp, cs = s.curve_prompt_list(), s.curve_seed_list()
            j = Job(b.name, None, None, b.guidance, cp, cs)  # step 0 of every curve
            jobs.setdefault(j.key, j)
            for x in cfg.loras:
                for step, _ in checkpoints.get(x.name, []):
                    j = Job(b.name, x.name, step, b.guidance, cp, cs)
                    jobs.setdefault(j.key, j)
    order = {b.name: i for i, b in enumerate(cfg.bases)}
    return sorted(jobs.values(), key=lambda j: (order[j.base], j.lora or "", -1 if j.step is None else j.step))


# ---------------------------------------------------------------------------------------------------------------------
# The heavy parts, behind an interface


class Judge(Protocol):
    def score(self, images, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Per image: {"style": P(style), "adherence": prompt adherence in [0, 1]}."""

    def features(self, images) -> np.ndarray:
        """(n, d) features for the Frechet distance and diversity."""

    def frechet(self, a: np.ndarray, b: np.ndarray) -> float:
        """Frechet distance between Gaussians fitted to feature sets `a` and `b`."""


class Toolkit(Protocol):
    def load_base(self, entry: BaseEntry): ...

    def generate(self, model, prompts: Sequence[str], seeds: Sequence[int], *, entry: BaseEntry, guidance: float,
                 sampling: SamplingSection):
        """Images (len(prompts) * len(seeds), 3, H, W) in [-1, 1], prompt-major (prompt 0 with every seed, ...)."""

    def apply_lora(self, model, path: Path, strength: float) -> contextlib.AbstractContextManager: ...

    def judge(self, metrics: MetricsSection) -> Judge | None: ...

    def release(self, model) -> None: ...


class FluxToolkit:
    """The project's own components: `checkpoint.load_transformer`, `components.load_autoencoder/load_text_encoder`,
    `sampling.generate`, `lora_files.load_lora`, `lora.merge_lora_into_model`, `toy.judge.Judge`."""

    def __init__(self, models: ModelsSection, judge: Judge | None = None):
        import torch

        self.models = models
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if models.device == "auto" else models.device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[models.dtype]
        self._encoders = None
        self._judge = judge

    def encoders(self):
        if self._encoders is None:
            from dev2pro.flux.components import load_autoencoder, load_text_encoder

            m = self.models
            ae = load_autoencoder(m.autoencoder, device=self.device, dtype=self.dtype)
            text = load_text_encoder(m.t5, m.clip, device=self.device, dtype=self.dtype)
            self._encoders = (ae, text)
        return self._encoders

    def load_base(self, entry: BaseEntry):
        from dev2pro.flux.checkpoint import load_transformer

        model = load_transformer(entry.ref, dtype=self.dtype, device=self.device)
        return model.eval().requires_grad_(False)

    def generate(self, model, prompts, seeds, *, entry: BaseEntry, guidance: float, sampling: SamplingSection):
        from dev2pro.flux.sampling import generate

        ae, text = self.encoders()
        cfg_mode = entry.mode == "cfg"
        # CFG bases get embedded guidance 1.0 (what de-distilled bases train at); generate ignores it without one.
        images = generate(
            model, ae, text, list(prompts), negative=entry.negative, height=sampling.height, width=sampling.width,
            steps=sampling.steps, guidance=1.0 if cfg_mode else guidance, cfg=guidance if cfg_mode else 1.0,
            seeds=list(seeds), batch_size=sampling.batch_size, progress=False,
        )
        return as_images(images)

    @contextlib.contextmanager
    def apply_lora(self, model, path: Path, strength: float) -> Iterator[None]:
        """fp32 bases: merge into the weights (fastest sampling; unmerging is exact to rounding). Other dtypes: an
        unmerged adapter, so bf16/fp8 base weights are never rounded by merge + unmerge."""
        import torch

        from dev2pro.lora import inject as L

        lora = read_lora(path)
        merged = next(model.parameters()).dtype == torch.float32
        if merged:
            L.merge_lora_into_model(model, lora, strength)
        else:
            L.apply_lora(model, lora, strength, adapter_name="compare")
        try:
            yield
        finally:
            if merged:
                L.unmerge_lora_from_model(model, lora, strength)
            else:
                L.remove_lora(model, adapter_name="compare")

    def judge(self, metrics: MetricsSection):
        if metrics.judge == "none":
            return None
        if self._judge is not None:
            return self._judge
        if metrics.judge.startswith("clip:"):
            return ClipJudge(metrics.judge[len("clip:"):], device=self.device)
        return ToyJudgeAdapter()

    def release(self, model) -> None:
        del model
        import gc

        gc.collect()


class ToyJudgeAdapter:
    """`dev2pro.toy.judge` behind the `Judge` interface (the shipped judge unless one is given)."""

    def __init__(self, judge=None):
        from dev2pro.toy.judge import Judge as ToyJudge

        self.judge = judge if judge is not None else ToyJudge.load()

    def score(self, images, prompts):
        out = self.judge.score(images, list(prompts))
        return {k: _np(out[k]) for k in ("style", "adherence")}

    def features(self, images):
        return _np(self.judge.features(images))

    def frechet(self, a, b):
        import torch

        from dev2pro.toy.judge import frechet_distance

        return float(frechet_distance(torch.from_numpy(a), torch.from_numpy(b)))


class ClipJudge:
    """CLIP as a judge for real images (`judge = "clip:FOLDER"`, a local transformers `CLIPModel` folder such as
    openai/clip-vit-large-patch14; safetensors weights only).

    - features: the L2-normalised image embeddings (the Frechet distance on them is "FD_CLIP", Kynkaanniemi et al.
      2023; diversity is their mean pairwise distance across seeds);
    - adherence: CLIP score, the cosine between image and prompt embeddings (Hessel et al. 2021, without their 2.5
      weight and clipping at 0): comparable between cells, not a probability;
    - style: the cosine between the image embedding and the normalised mean embedding of the reference style images
      (`metrics.reference`); nan without references.
    Preprocessing as CLIPImageProcessor: shortest side resized (bicubic) to the model's size, centre crop, CLIP's
    mean/std. Pitfall: CLIP cosines live in a narrow band (about 0.15-0.40 for image-text), so read differences, not
    levels, and the "score" product of two cosines only ranks cells."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, folder: str, device="cpu"):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        if not Path(folder).is_dir():
            raise UserError(f"metrics.judge: CLIP folder {folder} does not exist (a local transformers CLIPModel "
                            "folder, e.g. a download of openai/clip-vit-large-patch14)")
        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.device = device
        self.size = int(self.model.config.vision_config.image_size)
        self.reference: torch.Tensor | None = None

    @staticmethod
    def _unit(x):
        x = getattr(x, "pooler_output", x)  # transformers >= 5 returns an output object
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _pixels(self, images):
        import torch
        import torch.nn.functional as F

        x = (torch.as_tensor(images).float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        k = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * k)), max(self.size, round(w * k))), mode="bicubic",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top: top + self.size, left: left + self.size].clamp(0, 1)
        mean = torch.tensor(self.MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self.STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def _image_emb(self, images):
        import torch

        with torch.no_grad():
            return self._unit(self.model.get_image_features(pixel_values=self._pixels(images))).float().cpu()

    def features(self, images) -> np.ndarray:
        return self._image_emb(images).numpy().astype(np.float64)

    def set_reference(self, features: np.ndarray) -> None:
        import torch

        self.reference = self._unit(torch.from_numpy(features).float().mean(0, keepdim=True))[0]

    def score(self, images, prompts):
        import torch

        img = self._image_emb(images)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            txt = self._unit(self.model.get_text_features(**tok)).float().cpu()
        style = img @ self.reference if self.reference is not None else torch.full((len(img),), float("nan"))
        return {"adherence": (img * txt).sum(-1).numpy().astype(np.float64), "style": style.numpy().astype(np.float64)}

    def frechet(self, a, b):
        import torch

        from dev2pro.toy.judge import frechet_distance  # the generic formula (it lives with the toy judge)

        return float(frechet_distance(torch.from_numpy(a), torch.from_numpy(b)))


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def as_images(images):
    """A float tensor (n, 3, H, W) in [-1, 1] (the project's image convention) from a tensor in [-1, 1] or a list of
    PIL images."""
    import torch

    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu().clamp(-1, 1)
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def image_files(folder: str | Path, limit: int = 0) -> list[Path]:
    """The images of a folder, sorted by name, at most `limit` (0 = all)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"metrics.reference: {folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    files = files[:limit] if limit > 0 else files
    if not files:
        raise UserError(f"metrics.reference: no .png/.jpg/.webp images in {folder}")
    return files


def read_images(files: Sequence[Path], size: tuple[int, int] | None = None):
    """Image files as a (n, 3, H, W) float tensor in [-1, 1], resized to `size` (h, w)."""
    from PIL import Image

    ims = []
    for f in files:
        im = Image.open(f).convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        ims.append(im)
    return as_images(ims)


def reference_features(judge: Judge, folder: str | Path, limit: int, size: tuple[int, int], chunk: int = 32):
    """Judge features of the reference images, read `chunk` at a time (1024 px references would not fit at once)."""
    files = image_files(folder, limit)
    return np.concatenate([judge.features(read_images(files[i: i + chunk], size)) for i in range(0, len(files), chunk)])


# ---------------------------------------------------------------------------------------------------------------------
# Running the jobs


@dataclass
class JobResult:
    job: Job
    seconds: float
    prompt_index: np.ndarray  # (n,) index into job.prompts
    seed: np.ndarray  # (n,)
    style: np.ndarray | None = None
    adherence: np.ndarray | None = None
    features: np.ndarray | None = None
    images: Any = None  # kept only for the grid subset
    metrics: dict[str, Estimate] = field(default_factory=dict)


def _pairs(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, int]]:
    return [(i, s) for i in range(len(prompts)) for s in seeds]


def _grid_subset(job: Job, s: SamplingSection) -> set[tuple[int, int]]:
    return {(i, sd) for i in range(min(s.grid_prompts, len(job.prompts))) for sd in job.seeds[: s.grid_seeds]}


def run_jobs(cfg: CompareConfig, jobs: list[Job], checkpoints: dict[str, list[tuple[int, Path]]], toolkit: Toolkit,
             judge: Judge | None, root: Path | None = None) -> list[JobResult]:
    from tqdm.auto import tqdm

    ckpt = {(name, step): path for name, lst in checkpoints.items() for step, path in lst}
    results: list[JobResult] = []
    total = sum(len(j.prompts) * len(j.seeds) for j in jobs)
    bar = tqdm(total=total, desc="compare: sampling", unit="img", dynamic_ncols=True)
    for base_name in dict.fromkeys(j.base for j in jobs):
        entry = cfg.base(base_name)
        bar.set_postfix_str(f"loading {base_name}")
        model = toolkit.load_base(entry)
        base_jobs = [j for j in jobs if j.base == base_name]
        for lora_key in dict.fromkeys((j.lora, j.step) for j in base_jobs):
            lora_name, step = lora_key
            if lora_name is None:
                ctx = contextlib.nullcontext()
            else:
                lx = cfg.lora(lora_name)
                path = _resolve(lx.path, root) if step is None else ckpt[(lora_name, step)]
                ctx = toolkit.apply_lora(model, path, lx.strength)
            with ctx:
                for job in (j for j in base_jobs if (j.lora, j.step) == lora_key):
                    bar.set_postfix_str(job.key.split("|n")[0])
                    results.append(_run_job(cfg, job, entry, model, toolkit, judge, bar))
        toolkit.release(model)
        del model
    bar.close()
    return results


def _resolve(path: str, root: Path | None) -> Path:
    p = Path(path)
    p = root / p if root is not None and not p.is_absolute() else p
    if not p.is_file():
        raise UserError(f"LoRA file {p} does not exist")
    return p


def _run_job(cfg, job, entry, model, toolkit, judge, bar) -> JobResult:
    import torch

    s = cfg.sampling
    pairs = _pairs(job.prompts, job.seeds)
    keep = _grid_subset(job, s)
    t0 = time.perf_counter()
    style, adher, feats, grid = [], [], [], {}
    per_call = max(1, s.batch_size // len(job.seeds))  # prompts per call; every prompt with every seed
    for k in range(0, len(job.prompts), per_call):
        idx = range(k, min(k + per_call, len(job.prompts)))
        chunk = [(i, sd) for i in idx for sd in job.seeds]
        images = toolkit.generate(model, [job.prompts[i] for i in idx], job.seeds, entry=entry,
                                  guidance=job.guidance, sampling=s)
        if len(images) != len(chunk):
            raise RuntimeError(f"generate returned {len(images)} images for {len(chunk)} prompt x seed pairs")
        prompts = [job.prompts[i] for i, _ in chunk]
        if judge is not None:
            sc = judge.score(images, prompts)
            style.append(sc["style"])
            adher.append(sc["adherence"])
            feats.append(judge.features(images))
        for img, pair in zip(images, chunk):
            if pair in keep:
                grid[pair] = img
        bar.update(len(chunk))
    res = JobResult(job, time.perf_counter() - t0, np.array([i for i, _ in pairs]), np.array([sd for _, sd in pairs]))
    if judge is not None:
        res.style, res.adherence = np.concatenate(style), np.concatenate(adher)
        res.features = np.concatenate(feats)
    if grid:
        res.images = {pair: torch.as_tensor(img) for pair, img in grid.items()}
    return res


def summarize(res: JobResult, ref_features: np.ndarray | None, judge: Judge | None, m: MetricsSection) -> None:
    """Fill `res.metrics` (see the module docstring for the intervals)."""
    if res.style is None:
        return
    lvl = m.level
    res.metrics["style"] = mean_ci(res.style, lvl)
    res.metrics["adherence"] = mean_ci(res.adherence, lvl)
    res.metrics["score"] = mean_ci(res.style * res.adherence, lvl)
    if ref_features is not None and judge is not None:
        f = res.features
        fd = jackknife_ci(len(f), lambda idx: judge.frechet(f[idx], ref_features), lvl)
        res.metrics["fd"] = dataclasses.replace(fd, lo=max(0.0, fd.lo)) if math.isfinite(fd.lo) else fd  # a distance
    else:
        res.metrics["fd"] = NAN_ESTIMATE
    res.metrics["diversity"] = mean_ci(pairwise_diversity(res.features, res.prompt_index), lvl)


# ---------------------------------------------------------------------------------------------------------------------
# Verdict on a claim


def rank_cells(cells: dict[tuple[str, str], Estimate], higher_is_better: bool) -> list[tuple[str, str]]:
    ok = [k for k, e in cells.items() if math.isfinite(e.mean)]
    return sorted(ok, key=lambda k: -cells[k].mean if higher_is_better else cells[k].mean)


def competition_rank(cells: dict[tuple[str, str], Estimate], cell: tuple[str, str], higher_is_better: bool) -> int:
    """1 + the number of cells strictly better than `cell` (ties share a rank)."""
    m = cells[cell].mean
    return 1 + sum(1 for e in cells.values() if math.isfinite(e.mean) and (e.mean > m if higher_is_better
                                                                             else e.mean < m))


def claim_verdict(cells: dict[str, dict[tuple[str, str], Estimate]], claim: tuple[str, str], metric: str,
                  describe: Callable[[tuple[str, str]], str]) -> dict:
    """Is `claim` (lora, base) the best LoRA cell on `metric`? Reproduced when its mean is strictly the best;
    "clearly" when, in addition, its interval does not overlap the runner-up's; a tie for first is not a
    reproduction. Also its rank (ties share one) on every metric. `cells[metric][(lora, base)]` are the
    main-guidance estimates."""
    spec = METRIC[metric]
    ranking = rank_cells(cells[metric], spec.higher_is_better)
    out: dict[str, Any] = {"claim": list(claim), "metric": metric, "ranking": [list(k) for k in ranking]}
    if claim not in ranking:
        out.update(reproduced=None, clear=False,
                   text=f"The claim could not be checked: no {spec.label} for {describe(claim)}.")
        return out
    e = cells[metric][claim]
    others = [k for k in ranking if k != claim]
    rank = competition_rank(cells[metric], claim, spec.higher_is_better)
    clear = False
    if not others:
        reproduced, text = True, f"Only one cell was scored ({describe(claim)}: {e.fmt()}); nothing to compare."
    elif rank == 1 and cells[metric][others[0]].mean != e.mean:
        reproduced = True
        other = cells[metric][others[0]]
        if math.isfinite(e.lo) and math.isfinite(other.hi):
            clear = bool(e.lo > other.hi) if spec.higher_is_better else bool(e.hi < other.lo)
        text = (f"**Reproduced{' clearly' if clear else ' (intervals overlap: not significant)'}.** On {spec.label}, "
                f"{describe(claim)} is best with {e.fmt()}; the runner-up is {describe(others[0])} with "
                f"{other.fmt()}.")
    else:
        reproduced = False
        best = others[0]
        b = cells[metric][best]
        if b.mean == e.mean:
            text = (f"**Not reproduced (tie).** On {spec.label}, {describe(claim)} ties with {describe(best)} for the "
                    f"best value, {e.fmt()}.")
        else:
            overlap = (b.lo <= e.hi) if spec.higher_is_better else (b.hi >= e.lo)
            tops = [k for k in others if cells[metric][k].mean == b.mean]
            who = " and ".join(describe(k) for k in tops) + (" tie for best" if len(tops) > 1 else " is best")
            text = (f"**Not reproduced.** On {spec.label}, {who} with {b.fmt()}; {describe(claim)} "
                    f"ranks {rank} of {len(ranking)} with {e.fmt()}"
                    + (" (intervals overlap)." if overlap and math.isfinite(b.lo) and math.isfinite(e.lo) else "."))
    ranks = {}
    for m in METRICS:
        c = cells.get(m.key, {})
        if claim in c and math.isfinite(c[claim].mean):
            ranks[m.key] = [competition_rank(c, claim, m.higher_is_better),
                            sum(math.isfinite(x.mean) for x in c.values())]
    out.update(reproduced=reproduced, clear=clear, text=text, ranks=ranks)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: grid, plots, report, results.json


def _cell_label(cfg: CompareConfig, lora: str | None, base: str) -> str:
    b = cfg.base(base)
    on = "no LoRA" if lora is None else f"trained on {cfg.lora(lora).trained_on}"
    return f"{on} -> {base} ({b.describe()})"


def save_grid(cfg: CompareConfig, results: list[JobResult], path: Path) -> Path | None:
    """Rows: trained-on x applied-to cells at each base's main guidance; columns: prompts x seeds."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    s = cfg.sampling
    rows = [r for r in results if r.images and r.job.step is None and r.job.guidance == cfg.base(r.job.base).guidance
            and r.job.seeds == s.seeds and r.job.prompts == s.prompts]
    if not rows:
        return None
    lorder = {x.name: i for i, x in enumerate(cfg.loras)}
    border = {b.name: i for i, b in enumerate(cfg.bases)}
    rows.sort(key=lambda r: (border[r.job.base], -1 if r.job.lora is None else lorder[r.job.lora]))
    cols = sorted(set().union(*[set(r.images) for r in rows]))
    sample = next(iter(rows[0].images.values()))
    h, w = int(sample.shape[-2]) * s.grid_scale, int(sample.shape[-1]) * s.grid_scale
    font = ImageFont.load_default(size=11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(measure.textlength(_cell_label(cfg, r.job.lora, r.job.base), font=font)) for r in rows)
    heads = [_wrap(f"{s.prompts[pi]} (seed {sd})", w, lambda t: measure.textlength(t, font=font)) for pi, sd in cols]
    pad, line_h = 4, 13
    head_h = 4 + line_h * max(len(x) for x in heads)
    grid = Image.new("RGB", (label_w + len(cols) * (w + pad), head_h + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(heads):
        for k, line in enumerate(lines):
            draw.text((label_w + c * (w + pad), 2 + k * line_h), line, fill="black", font=font)
    for r, res in enumerate(rows):
        y = head_h + r * (h + pad)
        draw.text((4, y + h // 2 - 8), _cell_label(cfg, res.job.lora, res.job.base), fill="black", font=font)
        for c, pair in enumerate(cols):
            img = res.images.get(pair)
            if img is None:
                continue
            arr = ((torch.as_tensor(img).clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            grid.paste(tile, (label_w + c * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _wrap(text: str, width: float, length: Callable[[str], float]) -> list[str]:
    """Greedy word wrap of `text` to lines no longer than `width` (a long single word stays on its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and length(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _panels(n: int, per_row: int = 3):
    """A figure with `n` panels, at most `per_row` per row; returns (figure, the n axes, a spare axis or None)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n, per_row)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.4 * cols, 3.3 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n], (axes[n] if len(axes) > n else None)


def _legend(axes, spare, **kw) -> None:
    """The legend in the spare panel when there is one, else in the first panel."""
    handles, labels = axes[0].get_legend_handles_labels()
    (spare or axes[0]).legend(handles, labels, loc="center" if spare else "best", **kw)


def _scored_metrics(results: list[JobResult]) -> list[Metric]:
    return [m for m in METRICS if any(math.isfinite(r.metrics.get(m.key, NAN_ESTIMATE).mean) for r in results)]


def plot_bars(cfg: CompareConfig, main: dict, path: Path) -> Path | None:
    """One panel per metric: bars grouped by applied-to base, one bar per trained-on LoRA, with interval whiskers."""
    metrics = [m for m in METRICS if any(math.isfinite(e.mean) for e in main.get(m.key, {}).values())]
    if not metrics:
        return None
    fig, axes, spare = _panels(len(metrics))
    rows = ([None] if cfg.baseline else []) + [x.name for x in cfg.loras]
    width = 0.8 / max(1, len(rows))
    for ax, m in zip(axes, metrics):
        for i, lora in enumerate(rows):
            xs, ys, err = [], [], [[], []]
            for k, b in enumerate(cfg.bases):
                e = main[m.key].get((lora or "", b.name))
                if e is None or not math.isfinite(e.mean):
                    continue
                xs.append(k + (i - (len(rows) - 1) / 2) * width)
                ys.append(e.mean)
                lo, hi = (e.lo, e.hi) if math.isfinite(e.lo) else (e.mean, e.mean)
                err[0].append(max(0.0, e.mean - lo))
                err[1].append(max(0.0, hi - e.mean))
            label = "no LoRA" if lora is None else cfg.lora(lora).trained_on
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
        ax.set_xticks(range(len(cfg.bases)), [f"on {b.name}\n({b.describe()})" for b in cfg.bases], fontsize=8)
        ax.set_title(m.label + (" (lower is better)" if not m.higher_is_better else ""), fontsize=9)
    _legend(axes, spare, fontsize=8, title="LoRA trained on", title_fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_lines(cfg: CompareConfig, series: dict, xlabel: str, path: Path) -> Path | None:
    """`series[metric][(lora, base)] = [(x, Estimate), ...]`: one panel per metric, one line (with band) per cell."""
    def finite(pts):
        return sorted(((x, e) for x, e in pts if math.isfinite(e.mean)), key=lambda p: p[0])

    metrics = [m for m in METRICS if any(len(finite(v)) > 1 for v in series.get(m.key, {}).values())]
    if not metrics:
        return None
    colours = {"": "0.4"} | {x.name: f"C{i}" for i, x in enumerate(cfg.loras)}  # colour: the LoRA
    styles = {b.name: ("-", "--", ":", "-.")[i % 4] for i, b in enumerate(cfg.bases)}  # line style: the base
    lorder = {x.name: i for i, x in enumerate(cfg.loras)} | {"": -1}
    border = {b.name: i for i, b in enumerate(cfg.bases)}
    fig, axes, spare = _panels(len(metrics))
    for ax, m in zip(axes, metrics):
        for (lora, base), pts in sorted(series[m.key].items(), key=lambda kv: (border[kv[0][1]], lorder[kv[0][0]])):
            pts = finite(pts)
            if len(pts) < 2:
                continue
            xs = [x for x, _ in pts]
            label = f"{'no LoRA' if not lora else cfg.lora(lora).trained_on} -> {base}"
            ax.plot(xs, [e.mean for _, e in pts], marker="o", ms=3, label=label, color=colours[lora or ""],
                    ls=styles[base])
            lo = [e.lo if math.isfinite(e.lo) else e.mean for _, e in pts]
            hi = [e.hi if math.isfinite(e.hi) else e.mean for _, e in pts]
            ax.fill_between(xs, lo, hi, color=colours[lora or ""], alpha=0.12, lw=0)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(m.label + (" (lower is better)" if not m.higher_is_better else ""), fontsize=9)
    _legend(axes, spare, fontsize=7 if spare else 6)
    fig.savefig(path, dpi=110)
    return path


@dataclass
class CompareResult:
    config: CompareConfig
    results: list[JobResult]
    main: dict  # main[metric][(lora or "", base)] = Estimate at each base's main guidance
    sweep: dict  # sweep[metric][(lora or "", base)] = [(guidance, Estimate)]
    curves: dict  # curves[metric][(lora, base)] = [(step, Estimate)]
    verdict: dict | None
    files: dict[str, str]
    seconds: float
    total_seconds: float = 0.0  # set by callers that run more than the comparison (the demo)

    def table(self) -> str:
        return main_table(self.config, self.main)


def collect(cfg: CompareConfig, results: list[JobResult]) -> tuple[dict, dict, dict]:
    s = cfg.sampling
    main: dict = {m.key: {} for m in METRICS}
    sweep: dict = {m.key: {} for m in METRICS}
    curves: dict = {m.key: {} for m in METRICS}
    for r in results:
        j = r.job
        full = j.prompts == s.prompts and j.seeds == s.seeds
        for m in METRICS:
            e = r.metrics.get(m.key, NAN_ESTIMATE)
            cell = (j.lora or "", j.base)
            if full and j.step is None:
                if j.guidance == cfg.base(j.base).guidance:
                    main[m.key][cell] = e
                sweep[m.key].setdefault(cell, []).append((j.guidance, e))
            if j.prompts == s.curve_prompt_list() and j.seeds == s.curve_seed_list() and j.guidance == cfg.base(
                    j.base).guidance:
                if j.lora is None and j.step is None:
                    for x in cfg.loras:
                        curves[m.key].setdefault((x.name, j.base), []).append((0, e))
                elif j.step is not None:
                    curves[m.key].setdefault((j.lora, j.base), []).append((j.step, e))
    curves = {k: {c: sorted(v, key=lambda t: t[0]) for c, v in d.items() if any(st > 0 for st, _ in v)}
              for k, d in curves.items()}
    sweep = {k: {c: sorted(v, key=lambda t: t[0]) for c, v in d.items()} for k, d in sweep.items()}
    return main, sweep, curves


def main_table(cfg: CompareConfig, main: dict) -> str:
    """Markdown: one row per cell (trained on, applied to), one column per metric, `mean [lo, hi]`."""
    metrics = [m for m in METRICS if any(math.isfinite(e.mean) for e in main[m.key].values())]
    head = ["trained on", "applied to"] + [m.label + (" (lower better)" if not m.higher_is_better else "")
                                           for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = ([None] if cfg.baseline else []) + [x.name for x in cfg.loras]
    for b in cfg.bases:
        for lora in rows:
            cell = (lora or "", b.name)
            if not any(cell in main[m.key] for m in METRICS):
                continue
            on = "(no LoRA)" if lora is None else cfg.lora(lora).trained_on
            vals = [main[m.key].get(cell, NAN_ESTIMATE).fmt() for m in metrics]
            lines.append(f"| {on} | {b.name} ({b.describe()}) | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def pivot_table(cfg: CompareConfig, main: dict, metric: str) -> str:
    """Markdown 2x2 (or n x m): rows trained-on, columns applied-to, one metric."""
    cols = [b.name for b in cfg.bases]
    lines = ["| trained on \\ applied to | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for x in cfg.loras:
        vals = [main[metric].get((x.name, c), NAN_ESTIMATE).fmt() for c in cols]
        lines.append(f"| {x.trained_on} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def series_table(cfg: CompareConfig, series: dict, xname: str) -> str:
    metrics = [m for m in METRICS if series.get(m.key)]
    if not metrics:
        return ""
    head = ["LoRA", "base", xname] + [m.label for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {x.name: i for i, x in enumerate(cfg.loras)} | {"": -1}
    border = {b.name: i for i, b in enumerate(cfg.bases)}
    cells = sorted(dict.fromkeys(c for m in metrics for c in series[m.key]), key=lambda c: (border[c[1]], order[c[0]]))
    for cell in cells:
        xs = sorted({x for m in metrics for x, _ in series[m.key].get(cell, [])})
        for x in xs:
            vals = [dict(series[m.key].get(cell, [])).get(x, NAN_ESTIMATE).fmt() for m in metrics]
            on = cfg.lora(cell[0]).trained_on if cell[0] else "(no LoRA)"
            lines.append(f"| {on} | {cell[1]} | {x:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_report(res: CompareResult, out: Path, preface: str = "") -> Path:
    cfg, s = res.config, res.config.sampling
    files = res.files
    parts = [f"# {cfg.output.title}", ""]
    if preface:
        parts += [preface.rstrip(), ""]
    if res.verdict:
        parts += ["## Verdict", "", res.verdict["text"], ""]
        if res.verdict.get("ranks"):
            ranks = ", ".join(f"{METRIC[k].label}: {r}/{n}" for k, (r, n) in res.verdict["ranks"].items())
            parts += [f"Rank of the claimed cell on each metric (1 = best): {ranks}.", ""]
    parts += ["## Setup", ""]
    for b in cfg.bases:
        sweep = f" (sweep: {', '.join(f'{g:g}' for g in sorted(b.values()))})" if b.sweep else ""
        neg = f", negative prompt {b.negative!r}" if b.negative else ""
        parts.append(f"- base **{b.name}**: `{b.ref}`, {b.describe()}{sweep}{neg}")
    for x in cfg.loras:
        parts.append(f"- LoRA **{x.name}**: trained on {x.trained_on}, strength {x.strength:g}, `{x.path}`")
    parts += [f"- {len(s.prompts)} prompts x {len(s.seeds)} seeds ({', '.join(map(str, s.seeds))}), {s.steps} "
              f"sampling steps, {s.height}x{s.width}; curves: {len(s.curve_prompt_list())} prompts x "
              f"{len(s.curve_seed_list())} seeds", ""]
    parts += ["Prompts: " + "; ".join(f"`{p}`" for p in s.prompts), ""]
    level = f"{cfg.metrics.level:.0%}"
    parts += ["## Results at each base's main guidance", "",
              f"Mean [{level} interval]. Intervals: " + "; ".join(f"{m.label}: {m.interval}" for m in METRICS) + ".",
              "", res.table(), ""]
    if len(cfg.loras) > 1 or len(cfg.bases) > 1:
        for key in ("score", "style", "adherence"):
            if any(math.isfinite(e.mean) for e in res.main[key].values()):
                parts += [f"### {METRIC[key].label}: trained on x applied to", "", pivot_table(cfg, res.main, key), ""]
    for name, title in (("grid", "Image grid"), ("bars", "Metrics per cell")):
        if name in files:
            parts += [f"### {title}", "", f"![{name}]({files[name]})", ""]
    if any(b.sweep for b in cfg.bases):
        parts += ["## Guidance sweep", ""]
        if "sweep" in files:
            parts += [f"![guidance sweep]({files['sweep']})", ""]
        parts += [series_table(cfg, res.sweep, "guidance"), ""]
    if any(res.curves[m.key] for m in METRICS):
        parts += ["## Metrics over training steps", "", "Step 0 is the base without a LoRA.", ""]
        if "curves" in files:
            parts += [f"![curves]({files['curves']})", ""]
        parts += [series_table(cfg, res.curves, "step"), ""]
    parts += ["## Run", "", f"{len(res.results)} image sets, {sum(len(r.seed) for r in res.results)} images, "
              f"{res.seconds:.0f} s. Raw numbers: `results.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_results_json(res: CompareResult, out: Path) -> Path:
    jobs = []
    for r in res.results:
        j = r.job
        jobs.append({
            "base": j.base, "lora": j.lora, "step": j.step, "guidance": j.guidance, "prompts": list(j.prompts),
            "seeds": list(j.seeds), "seconds": r.seconds, "metrics": {k: e.to_dict() for k, e in r.metrics.items()},
            "per_image": None if r.style is None else {
                "prompt_index": r.prompt_index.tolist(), "seed": r.seed.tolist(), "style": r.style.tolist(),
                "adherence": r.adherence.tolist()},
        })
    main = {m: [{"lora": c[0] or None, "base": c[1], **e.to_dict()} for c, e in d.items()] for m, d in res.main.items()}
    data = {"config": dataclasses.asdict(res.config), "main": main, "verdict": res.verdict, "jobs": jobs,
            "files": res.files, "seconds": res.seconds}
    path = out / "results.json"
    path.write_text(json.dumps(_json_safe(data), indent=1), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def run_compare(cfg: CompareConfig, toolkit: Toolkit | None = None, root: str | Path | None = None,
                preface: str = "") -> CompareResult:
    """Run the whole comparison and write its outputs to `cfg.output.dir`. Relative LoRA/reference paths resolve
    against `root` (the config file's folder for `dev2pro compare`; None: the working directory)."""
    t0 = time.perf_counter()
    root = Path(root) if root is not None else None
    out = Path(cfg.output.dir)
    out = root / out if root is not None and not out.is_absolute() else out
    out.mkdir(parents=True, exist_ok=True)
    toolkit = toolkit if toolkit is not None else FluxToolkit(cfg.models)
    for x in cfg.loras:
        _resolve(x.path, root)
    checkpoints = {x.name: find_checkpoints(x.checkpoints, root) for x in cfg.loras} if cfg.curves else {}
    judge = toolkit.judge(cfg.metrics)
    ref_features = None
    if judge is not None and cfg.metrics.reference:
        ref_dir = Path(cfg.metrics.reference)
        ref_dir = root / ref_dir if root is not None and not ref_dir.is_absolute() else ref_dir
        ref_features = reference_features(judge, ref_dir, cfg.metrics.reference_limit,
                                          (cfg.sampling.height, cfg.sampling.width))
        if hasattr(judge, "set_reference"):
            judge.set_reference(ref_features)
    jobs = plan_jobs(cfg, checkpoints)
    results = run_jobs(cfg, jobs, checkpoints, toolkit, judge, root)
    for r in results:
        summarize(r, ref_features, judge, cfg.metrics)
    main, sweep, curves = collect(cfg, results)

    verdict = None
    if cfg.claim.lora and judge is not None:
        lora_cells = {k: {c: e for c, e in d.items() if c[0]} for k, d in main.items()}
        verdict = claim_verdict(lora_cells, (cfg.claim.lora, cfg.claim.base), cfg.claim.metric,
                                lambda c: f"trained on {cfg.lora(c[0]).trained_on}, applied to {c[1]}")
    files: dict[str, str] = {}
    for name, fn in (
        ("grid", lambda p: save_grid(cfg, results, p)),
        ("bars", lambda p: plot_bars(cfg, main, p)),
        ("sweep", lambda p: plot_lines(cfg, sweep, "guidance", p)),
        ("curves", lambda p: plot_lines(cfg, curves, "training step", p)),
    ):
        p = fn(out / f"{name}.png")
        if p is not None:
            files[name] = p.name
    res = CompareResult(cfg, results, main, sweep, curves, verdict, files, time.perf_counter() - t0)
    write_results_json(res, out)
    res.files["report"] = write_report(res, out, preface).name
    res.files["results"] = "results.json"
    return res
