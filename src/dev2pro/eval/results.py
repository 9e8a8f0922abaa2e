"""The results of a comparison run: per job the per-image scores and features (`JobResult`) and their estimates
(`summarize`, intervals as `dev2pro.eval.stats` states), and the estimates collected into the tables the report,
plots and verdict read (`collect`): the main cells at each base's main guidance, the guidance sweep, and the curves
over training steps (step 0 is the base without a LoRA). `CompareResult` holds it all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dev2pro.eval.judges import Judge
from dev2pro.eval.plan import CompareConfig, Job, MetricsSection
from dev2pro.eval.stats import METRICS, NAN_ESTIMATE, Estimate, jackknife_ci, mean_ci, pairwise_diversity
from dev2pro.eval.tables import main_table, row_labels


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


def summarize(res: JobResult, ref_features: np.ndarray | None, judge: Judge | None, m: MetricsSection) -> None:
    """Fill `res.metrics` (intervals as the `dev2pro.eval.stats` docstring states)."""
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


def add_response(cfg: CompareConfig, results: list[JobResult]) -> None:
    """The guidance response of every job at a base's main guidance that has a twin at the base's `response` value
    (same base, LoRA, step, prompts and seeds): per image, adherence at the main value minus at the low one (paired:
    same prompt, same seed, so the starting noise is the same), as `metrics["response"]`."""
    twins = {(r.job.base, r.job.lora, r.job.step, r.job.prompts, r.job.seeds, r.job.guidance): r for r in results}
    for r in results:
        j, b = r.job, cfg.base(r.job.base)
        low = twins.get((j.base, j.lora, j.step, j.prompts, j.seeds, b.response)) if b.response else None
        if low is None or j.guidance != b.guidance or r.adherence is None or low.adherence is None:
            continue
        if not (np.array_equal(r.prompt_index, low.prompt_index) and np.array_equal(r.seed, low.seed)):
            raise RuntimeError(f"{j.key}: the images at the two guidance values are not in the same order")
        r.metrics["response"] = mean_ci(r.adherence - low.adherence, cfg.metrics.level)


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
    pooled: Any = None  # dev2pro.eval.groups.Pooled when LoRAs have groups (training runs pooled)
    summary: dict = field(default_factory=dict)  # set by the demo
    claims: list = field(default_factory=list)  # set by the demo (dev2pro.eval.claims)

    def view(self) -> tuple[dict, dict, dict, dict[str, str]]:
        """What the report shows: (main, sweep, curves, rows): pooled over training runs when LoRAs have groups."""
        rows = row_labels(self.config, pooled=self.pooled is not None)
        if self.pooled is not None:
            return self.pooled.main, self.pooled.sweep, self.pooled.curves, rows
        return self.main, self.sweep, self.curves, rows

    def table(self) -> str:
        main, _, _, rows = self.view()
        return main_table(self.config, main, rows)


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
