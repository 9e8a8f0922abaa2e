"""The experiment plan: the strict `compare` config (bases with their sampling modes, LoRAs, sampling, metrics,
claim, output; see configs/compare-example.toml), the intermediate LoRA checkpoints found on disk for the curves, and
the work list of jobs (one set of images each).

`plan_jobs` dedupes the jobs the cells, the guidance sweep and the curves ask for, and orders them by base, then by
LoRA/step, so each base loads once and each LoRA merges once. Pitfall: a checkpoint's training step is read from its
name (`checkpoint-<step>`), so a LoRA file or folder named otherwise cannot be placed on a curve (an error says so).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dev2pro.errors import ConfigError, UserError
from dev2pro.eval.stats import METRIC

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
    # Guidance response: also sample at this low guidance value (0 = off) and report, per image, adherence at
    # `guidance` minus adherence at `response` (same prompt, same seed), for the cells and along the curves.
    response: float = 0.0
    curves: bool = True  # evaluate the LoRAs' intermediate checkpoints on this base


    def validate(self) -> None:
        if not self.name or not re.fullmatch(r"[\w.+-]+", self.name):
            raise ConfigError(f"bases: name {self.name!r} must be a non-empty word (letters, digits, _ . + -)")
        for g in (self.guidance, *self.sweep):
            if not g > 0:
                raise ConfigError(f"bases '{self.name}': guidance values must be > 0, got {g}")
        if self.response < 0 or self.response == self.guidance:
            raise ConfigError(f"bases '{self.name}': response must be 0 (off) or a guidance value other than "
                              f"guidance = {self.guidance:g}, got {self.response:g}")
        if self.negative and self.mode != "cfg":
            raise ConfigError(f"bases '{self.name}': a negative prompt needs mode = \"cfg\"")

    def values(self) -> tuple[float, ...]:
        """The guidance values the LoRA cells are evaluated at: the main one first, the response value, the sweep."""
        return tuple(dict.fromkeys((self.guidance, *((self.response,) if self.response else ()), *self.sweep)))

    def main_values(self) -> tuple[float, ...]:
        """The values of the baseline and the curves: the main guidance and the response value, if any."""
        return (self.guidance, self.response) if self.response else (self.guidance,)

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
    # The training configuration this LoRA is one run of: LoRAs with the same group (same data, steps, rank; another
    # training seed) are pooled, with intervals over the runs (see dev2pro.eval.groups). "" = a group of its own.
    group: str = ""

    def validate(self) -> None:
        if not self.name or not re.fullmatch(r"[\w.+-]+", self.name):
            raise ConfigError(f"loras: name {self.name!r} must be a non-empty word (letters, digits, _ . + -)")


@dataclass(frozen=True)
class ModelsSection:
    """`[models]`: the encoders shared by every base (single files, folders, pipeline folders, hub ids, or "toy" named
    explicitly: an unset one is an error when images are made), `tokenizers` for single encoder files, where and in
    which dtype the bases run. fp8 base files stay fp8 (computing in `dtype`)."""

    autoencoder: str | None = None
    t5: str | None = None
    clip: str | None = None
    tokenizers: str | None = None
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

    lora: str = ""  # a LoRA's name, or a group's when the LoRAs have groups
    base: str = ""
    metric: str = "score"
    among: tuple[str, ...] = ()  # the LoRAs (or groups) the claimed cell is compared with (empty: all)

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
        for x in self.loras:
            if x.group and any(y.name == x.group and y.group != x.group for y in self.loras):
                raise ConfigError(f"loras: group {x.group!r} is also the name of a LoRA outside it")
        names = set(self.groups()) if self.grouped else {x.name for x in self.loras}
        for key, n in [("claim.lora", self.claim.lora)] * bool(self.claim.lora) + [
                ("claim.among", n) for n in self.claim.among]:
            if n not in names:
                raise ConfigError(f"{key}: {n!r} is not one of the loras' " + (
                    "groups (a LoRA in a group is one training run; the claim is about the group)" if self.grouped
                    else "names"))
        if self.claim.base and self.claim.base not in [b.name for b in self.bases]:
            raise ConfigError(f"claim.base: {self.claim.base!r} is not one of the bases' names")
        if bool(self.claim.lora) != bool(self.claim.base):
            raise ConfigError("claim: give both lora and base, or neither")

    def base(self, name: str) -> BaseEntry:
        return next(b for b in self.bases if b.name == name)

    def lora(self, name: str) -> LoraEntry:
        return next(x for x in self.loras if x.name == name)

    def groups(self) -> dict[str, list[str]]:
        """Group key -> the names of its LoRAs (training runs), in config order; an ungrouped LoRA is its own group."""
        out: dict[str, list[str]] = {}
        for x in self.loras:
            out.setdefault(x.group or x.name, []).append(x.name)
        return out

    @property
    def grouped(self) -> bool:
        """Whether any LoRA names a group (the report then pools training runs)."""
        return any(x.group for x in self.loras)

    def label(self, key: str) -> str:
        """The "trained on" label of a LoRA or a group (a group's: its first LoRA's)."""
        if not key:
            return "(no LoRA)"
        return self.lora(self.groups().get(key, [key])[0]).trained_on


def load_compare_config(path: str | Path, overrides: Sequence[str] = ()) -> CompareConfig:
    from dev2pro.config import load_config

    return load_config(CompareConfig, path, list(overrides))


# ---------------------------------------------------------------------------------------------------------------------
# Intermediate checkpoints

_STEP_RE = re.compile(r"checkpoint-(\d+)")
_STATE_FILES = ("trainable", "optimizer", "rng-", "extra", "shard-")  # dev2pro.train.checkpointing's files


def _lora_file_in(folder: Path) -> Path:
    """The LoRA in a checkpoint folder: a LoRA file if there is one, else the folder itself when it is a train-lora
    checkpoint (`trainable.safetensors` + `config.toml`, read by `read_lora`)."""
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith(_STATE_FILES))
    if files:
        return files[0]
    if (folder / "trainable.safetensors").is_file() and (folder / "config.toml").is_file():
        return folder
    raise UserError(f"{folder}: no LoRA .safetensors file (or train-lora trainable.safetensors + config.toml) inside")


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
            for g in (b.values() if lora is not None else b.main_values()):  # the sweep covers the LoRA cells
                j = Job(b.name, lora, None, g, s.prompts, s.seeds)
                jobs.setdefault(j.key, j)
        if cfg.curves and b.curves and any(checkpoints.values()):
            cp, cs = s.curve_prompt_list(), s.curve_seed_list()
            for g in b.main_values():
                j = Job(b.name, None, None, g, cp, cs)  # step 0 of every curve
                jobs.setdefault(j.key, j)
                for x in cfg.loras:
                    for step, _ in checkpoints.get(x.name, []):
                        j = Job(b.name, x.name, step, g, cp, cs)
                        jobs.setdefault(j.key, j)
    order = {b.name: i for i, b in enumerate(cfg.bases)}
    return sorted(jobs.values(), key=lambda j: (order[j.base], j.lora or "", -1 if j.step is None else j.step))
