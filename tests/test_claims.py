"""The statistics of pooled training runs and the six-way claims (`dev2pro.eval.groups`, `dev2pro.eval.claims`): the
interval over runs, Welch's interval and the slope against closed forms, and each claim's verdict on constructed
numbers where it must come out true and where it must come out false."""

import math
import statistics

import pytest

from dev2pro.eval import claims as K
from dev2pro.eval import groups as G
from dev2pro.eval import stats as S
from test_compare import _t_quantile_closed_form


def test_runs_interval_is_the_t_interval_over_per_run_values():
    """Three training runs: mean +- t_{0.975, 2} sd / sqrt(3), t from its closed form (df = 2)."""
    per_run = [0.62, 0.70, 0.72]
    e = G.runs_ci(per_run)
    sd = statistics.stdev(per_run)
    half = _t_quantile_closed_form(0.975, 2) * sd / math.sqrt(3)
    assert half == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)
    assert (e.n, e.method) == (3, "t over training runs")
    assert e.mean == pytest.approx(0.68) and e.lo == pytest.approx(0.68 - half) and e.hi == pytest.approx(0.68 + half)


def test_welch_interval_and_slope_against_closed_forms():
    # equal sizes and variances: Welch's df = 2 (n - 1) = 4, se^2 = s^2 (1/3 + 1/3)
    d = K.welch_diff([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    half = _t_quantile_closed_form(0.975, 4) * math.sqrt(2 / 3)
    assert d.mean == 2.0 and d.lo == pytest.approx(2.0 - half) and d.hi == pytest.approx(2.0 + half)
    # unequal: nu = se^4 / sum (v_i^2 / (n_i - 1)) = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17
    d = K.welch_diff([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert d.hi - d.mean == pytest.approx(S.student_t_ppf(0.975, 50 / 17) * math.sqrt(5 / 3))
    assert math.isnan(K.welch_diff([1.0], [2.0, 3.0]).lo) and K.welch_diff([1.0], [2.0, 3.0]).mean == -1.5
    assert K.slope([(100, 0.5), (200, 0.4), (300, 0.3)]) == pytest.approx(-0.1)  # per 100 steps
    assert K.slope([(0, 1.0), (10, 3.0)], per=1) == pytest.approx(0.2)
    assert math.isnan(K.slope([(100, 0.5)]))


def _pooled(values: dict[tuple[str, str], list[float]], metric="score", curves=None) -> G.Pooled:
    """A Pooled from per-run values: values[(group, base)] = one value per run."""
    main = {m.key: {} for m in S.METRICS}
    runs = {m.key: {} for m in S.METRICS}
    for cell, v in values.items():
        main[metric][cell] = G.runs_ci(v)
        runs[metric][cell] = {f"{cell[0]}-s{i}": x for i, x in enumerate(v)}
    run_curves = {m.key: {} for m in S.METRICS}
    for cell, per in (curves or {}).items():
        run_curves["response"][cell] = {f"{cell[0]}-s{i}": pts for i, pts in enumerate(per)}
    return G.Pooled(main, {}, {}, runs, run_curves, {})


def _curve(slope_per_100: float, noise: float) -> list[tuple[int, float]]:
    return [(0, 0.3)] + [(s, 0.3 + slope_per_100 * s / 100 + noise * (-1) ** (s // 100)) for s in range(100, 700, 100)]


@pytest.mark.parametrize("a,b,c,outcome", [
    (-0.05, 0.0, 0.0, "yes"),  # a falls, clearly, and clearly faster than both controls
    (-0.05, -0.049, 0.0, "weak"),  # a falls, but not clearly faster than b
    (0.01, 0.0, 0.0, "no"),  # a does not fall
    (-0.05, -0.08, 0.0, "no"),  # a falls, but b falls faster
])
def test_erosion_claim(a, b, c, outcome):
    label = {"a": "dev (g=3.5)", "b": "dev (g=1.0)", "c": "dev2pro (g=1.0)"}.get
    # three runs per mode whose slopes spread by +-0.002 around the given slope
    curves = {(k, "dev"): [_curve(s + e, 0.001) for e in (-0.002, 0.0, 0.002)] for k, s in zip("abc", (a, b, c))}
    p = _pooled({}, curves=curves)
    slopes = {k: K.run_slopes(p, "response", (k, "dev")) for k in "abc"}
    assert slopes["a"] == pytest.approx([a - 0.002, a, a + 0.002], abs=1e-3)
    v = K.erosion_verdict(slopes, "a", ["b", "c"], label)
    assert v["outcome"] == outcome, v["text"]
    assert v["text"].startswith({"yes": "**Holds.**", "weak": "**Holds in direction", "no": "**Does not hold.**"}[
        outcome]) and "dev (g=3.5)" in v["text"] and "per 100 training steps" in v["text"]
    assert v["slope"]["mean"] == pytest.approx(a, abs=1e-3)
    assert K.erosion_verdict({}, "a", ["b"], label)["outcome"] == "unknown"


@pytest.mark.parametrize("c_runs,outcome", [([0.90, 0.91, 0.92], "yes"), ([0.80, 0.86, 0.92], "weak"),
                                            ([0.60, 0.62, 0.64], "no")])
def test_best_cell_claim(c_runs, outcome):
    values = {("c", "dev"): c_runs, ("a", "dev"): [0.70, 0.72, 0.74], ("b", "dev"): [0.78, 0.80, 0.82],
              ("c", "dev2pro"): [0.5, 0.5, 0.6], ("f", "dev"): [0.99, 0.99, 0.99]}
    v = K.best_verdict(_pooled(values), ("c", "dev"), ["a", "b", "c"], "score", str)
    assert v["outcome"] == outcome and v["claim"] == "ii" and v["cell"] == ["c", "dev"]
    assert ["f", "dev"] not in v["ranking"]  # only the compared groups


def test_alternatives_claim_and_the_six_way_claims():
    values = {("c", "dev"): [0.80, 0.82, 0.84], ("d", "dev"): [0.90, 0.92, 0.94], ("e", "dev"): [0.60, 0.62, 0.64],
              ("f", "dev"): [0.80, 0.84, 0.88], ("a", "dev"): [0.5, 0.5, 0.5], ("b", "dev"): [0.6, 0.6, 0.6]}
    p = _pooled(values)
    v = K.compare_verdict(p, "c", ["d", "e"], "dev", "score", lambda g: g.upper())
    assert v["comparisons"]["d"]["word"] == "better than" and v["comparisons"]["e"]["word"] == "worse than"
    assert v["comparisons"]["d"]["difference"]["mean"] == pytest.approx(0.10)
    up = K.compare_verdict(p, "f", ["c"], "dev", "score", str)
    assert up["comparisons"]["c"]["word"] == "not clearly different from"
    fd = K.compare_verdict(_pooled({("c", "dev"): [1.0, 1.1], ("d", "dev"): [2.0, 2.1]}, "fd"), "c", ["d"], "dev", "fd",
                           str)
    assert fd["comparisons"]["d"]["word"] == "worse than"  # a higher Frechet distance is worse
    out = K.six_way_claims(p, {r: r for r in "abcdef"}, "score", str)
    assert [c["claim"] for c in out] == ["i", "ii", "iii"]
    assert out[0]["outcome"] == "unknown" and out[1]["outcome"] == "yes"  # no curves; c beats a and b clearly
    assert "better than" in out[2]["text"] and "upper bound" in out[2]["text"]
