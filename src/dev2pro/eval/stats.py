"""Statistics of the comparison: Student-t quantiles, the `Estimate` (a value with its interval), the interval
methods, diversity across seeds, and the table of metrics (what each one is, which direction is better) that the
report, the plots and the verdict read. Small pure functions, checked against closed forms in tests (no scipy in this
environment).

Which interval each metric gets (stated in the report): per-image metrics (style, adherence, score) use the Student-t
interval over the images of the cell (prompts x seeds); diversity uses the Student-t interval over prompts; the
Frechet distance is a set statistic, its interval is the delete-one jackknife over generated images (reference set
fixed), centred on the full-set value. Pitfalls: images of one prompt across seeds are not independent draws of the
cell's population, so the t-intervals are somewhat narrow when prompts are few; a percentile bootstrap of the Frechet
distance would sit above the full-set value (resampling duplicates images, which inflates the distance), hence the
jackknife; Frechet distances from few images are biased upwards, so compare cells with equal image counts only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


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


@functools.lru_cache(maxsize=1024)
def student_t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t (bisection on `student_t_cdf`). No scipy in this environment. Cached: a report asks
    for the same few (level, n) pairs thousands of times, and each costs 60 integrations."""
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
    Metric("response", "guidance response", True,
           "paired t-interval over images (same prompt and seed at both guidance values)"),
)
METRIC = {m.key: m for m in METRICS}
