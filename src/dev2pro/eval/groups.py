"""Pooling training runs: LoRAs that share a `group` (the same training configuration, another training seed) become
one row of the report, with intervals over the runs.

The interval is the two-stage ("per-run means", cluster-level) one: each run's value of a metric is computed first
(the mean over its images for per-image metrics, the statistic itself for the Frechet distance and diversity), then
the Student-t interval is taken over the runs:

    mean_r +- t_{(1+level)/2, R-1} * sd(per-run values) / sqrt(R)        (R runs of the group)

Each run's value already carries its own sampling noise, so the spread of the per-run values holds both the
differences between training runs and the sampling noise; with equal image counts per run the centre equals the mean
over all images. Pitfalls: with R = 2 or 3 runs the t quantile is large (12.7 and 4.3), so intervals are wide, as
they should be; every run is sampled with the same prompts and seeds (a crossed design), so the interval treats the
prompt set as fixed (it says how another training run would score on these prompts, not on other prompts). Step 0 of
a curve (the base without a LoRA) has no training run: it keeps its own interval over images. A group with a single
run keeps that run's interval over images.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from dev2pro.eval.plan import CompareConfig
from dev2pro.eval.stats import METRICS, NAN_ESTIMATE, Estimate, mean_ci

METHOD = "t over training runs"


def runs_ci(values, level: float = 0.95) -> Estimate:
    """Mean of the per-run values and the t-interval over them (n = the runs with a finite value)."""
    e = mean_ci(values, level)
    return dataclasses.replace(e, method=METHOD) if e.n else e


@dataclass
class Pooled:
    """The report's rows when LoRAs have groups: keys (group, base); ("", base) is the base without a LoRA.
    `runs`/`run_curves` keep each run's value (by LoRA name) for the claims."""

    main: dict  # main[metric][(group, base)] = Estimate
    sweep: dict  # sweep[metric][(group, base)] = [(guidance, Estimate)]
    curves: dict  # curves[metric][(group, base)] = [(step, Estimate)]
    runs: dict  # runs[metric][(group, base)] = {lora: value}
    run_curves: dict  # run_curves[metric][(group, base)] = {lora: [(step, value)]}
    sizes: dict  # group -> number of runs


def _pool_cell(estimates: dict[str, Estimate], level: float, metric: str = "") -> Estimate:
    """`estimates`: run name -> that run's estimate of one cell. A distance's interval is clipped at 0."""
    if len(estimates) == 1:
        return next(iter(estimates.values()))
    e = runs_ci([x.mean for x in estimates.values()], level)
    return dataclasses.replace(e, lo=max(0.0, e.lo)) if metric == "fd" and math.isfinite(e.lo) else e


def pool(cfg: CompareConfig, main: dict, sweep: dict, curves: dict, level: float = 0.95) -> Pooled:
    """Group the per-LoRA tables of `dev2pro.eval.results.collect` by `cfg.groups()`."""
    groups = cfg.groups()
    pm: dict = {m.key: {} for m in METRICS}
    ps: dict = {m.key: {} for m in METRICS}
    pc: dict = {m.key: {} for m in METRICS}
    runs: dict = {m.key: {} for m in METRICS}
    run_curves: dict = {m.key: {} for m in METRICS}
    for m in METRICS:
        for cell, e in main[m.key].items():
            if not cell[0]:
                pm[m.key][cell] = e  # the base alone
        for g, names in groups.items():
            for b in cfg.bases:
                per = {n: main[m.key][(n, b.name)] for n in names if (n, b.name) in main[m.key]}
                if per:
                    pm[m.key][(g, b.name)] = _pool_cell(per, level, m.key)
                    runs[m.key][(g, b.name)] = {n: e.mean for n, e in per.items()}
                for src, dst, store in ((sweep, ps, None), (curves, pc, run_curves)):
                    series = {n: dict(src[m.key][(n, b.name)]) for n in names if (n, b.name) in src[m.key]}
                    if not series:
                        continue
                    xs = sorted(set().union(*series.values()))
                    pts = []
                    for x in xs:
                        at = {n: s[x] for n, s in series.items() if x in s}
                        # step 0 of a curve is the base alone, the same job for every run: its own interval
                        pts.append((x, next(iter(at.values())) if (dst is pc and x == 0)
                                    else _pool_cell(at, level, m.key)))
                    dst[m.key][(g, b.name)] = pts
                    if store is not None:
                        store[m.key][(g, b.name)] = {n: sorted((x, e.mean) for x, e in s.items())
                                                     for n, s in series.items()}
        for cell, pts in sweep[m.key].items():
            if not cell[0]:
                ps[m.key][cell] = pts
    return Pooled(pm, ps, pc, runs, run_curves, {g: len(n) for g, n in groups.items()})


def per_run(pooled: Pooled, metric: str, cell: tuple[str, str]) -> np.ndarray:
    """The per-run values of one pooled cell (finite ones only)."""
    v = np.array(list(pooled.runs.get(metric, {}).get(cell, {}).values()), dtype=np.float64)
    return v[np.isfinite(v)]


def estimate(pooled: Pooled, metric: str, cell: tuple[str, str]) -> Estimate:
    return pooled.main.get(metric, {}).get(cell, NAN_ESTIMATE)


def finite(e: Estimate) -> bool:
    return math.isfinite(e.mean)
