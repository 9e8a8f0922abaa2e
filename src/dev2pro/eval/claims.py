"""Verdicts on the six-way comparison's three claims, from pooled training runs (`dev2pro.eval.groups`), each with its
interval and a plain outcome: "yes" (holds, intervals clear of zero), "weak" (the direction holds but an interval
includes zero), "no" (the direction does not hold), "unknown" (not enough numbers to check).

(i)  erosion: training on dev at g = 3.5 erodes guidance as training goes on. Per training run, the least-squares
     slope of the guidance response (adherence at the main guidance minus at the low one) against the training step,
     over the checkpoints (step > 0), in units per 100 steps; the eroding mode's mean slope must be below 0 and below
     each control's (the difference of means over runs with Welch's interval).
(ii) best cell: the claimed cell (trained on dev2pro, applied to dev) is the best of the compared cells on the
     headline metric (`dev2pro.eval.verdict.claim_verdict` on the pooled estimates: intervals over runs).
(iii) alternatives: how each alternative (the guidance loss, the de-distill adapter) compares with the recipe, and how
     close the recipe comes to its upper bound (trained on pro): differences of means over runs, Welch intervals.

Welch's interval for a difference of two groups' means over runs (runs are independent; variances may differ):
`d +- t_{(1+level)/2, nu} sqrt(s_a^2/n_a + s_b^2/n_b)`, `nu` from the Welch-Satterthwaite formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from dev2pro.eval.groups import Pooled, per_run
from dev2pro.eval.stats import METRIC, NAN_ESTIMATE, Estimate, mean_ci, student_t_ppf
from dev2pro.eval.verdict import claim_verdict

PER = 100  # slopes are given per this many training steps


def welch_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Estimate:
    """mean(a) - mean(b) with Welch's t-interval (nan interval when a side has < 2 values or no spread)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not a.size or not b.size:
        return NAN_ESTIMATE
    d = float(a.mean() - b.mean())
    n = a.size + b.size
    if a.size < 2 or b.size < 2:
        return Estimate(d, math.nan, math.nan, n, "welch")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se2 = va + vb
    if se2 == 0:
        return Estimate(d, d, d, n, "welch")
    df = se2 ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = student_t_ppf(0.5 + level / 2, df) * math.sqrt(se2)
    return Estimate(d, d - half, d + half, n, "welch")


def slope(points: Sequence[tuple[float, float]], per: float = PER) -> float:
    """Least-squares slope of value against step, per `per` steps (nan with < 2 distinct finite points)."""
    pts = [(x, y) for x, y in points if math.isfinite(y)]
    if len({x for x, _ in pts}) < 2:
        return math.nan
    x = np.array([p[0] for p in pts], dtype=np.float64)
    y = np.array([p[1] for p in pts], dtype=np.float64)
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum() * per)


def run_slopes(pooled: Pooled, metric: str, cell: tuple[str, str], min_step: int = 1) -> np.ndarray:
    """Each training run's slope of `metric` over its checkpoints at step >= `min_step`."""
    runs = pooled.run_curves.get(metric, {}).get(cell, {})
    return np.array([slope([(s, v) for s, v in pts if s >= min_step]) for pts in runs.values()], dtype=np.float64)


def _sig(e: Estimate) -> int:
    """+1 / -1 when the interval lies above / below 0, 0 when it includes 0 or is unknown."""
    if not (math.isfinite(e.lo) and math.isfinite(e.hi)):
        return 0
    return 1 if e.lo > 0 else -1 if e.hi < 0 else 0


def _word(outcome: str) -> str:
    return {"yes": "**Holds.**", "weak": "**Holds in direction, not significantly.**", "no": "**Does not hold.**",
            "unknown": "**Cannot be checked.**"}[outcome]


def erosion_verdict(slopes: dict[str, np.ndarray], eroding: str, controls: Sequence[str],
                    label: Callable[[str], str], level: float = 0.95) -> dict:
    """Claim (i): `slopes[group]` = per-run slopes of the guidance response (per 100 steps) on dev."""
    a = slopes.get(eroding, np.array([]))
    a = a[np.isfinite(a)]
    ctrl = {c: slopes[c][np.isfinite(slopes[c])] for c in controls if c in slopes}
    ctrl = {c: v for c, v in ctrl.items() if v.size}
    if not a.size or not ctrl:
        return {"claim": "i", "outcome": "unknown",
                "text": f"{_word('unknown')} No guidance-response curves for {label(eroding)} and its controls."}
    own = mean_ci(a, level)
    diffs = {c: welch_diff(a, v, level) for c, v in ctrl.items()}
    if own.mean < 0 and all(d.mean < 0 for d in diffs.values()):
        outcome = "yes" if _sig(own) < 0 and all(_sig(d) < 0 for d in diffs.values()) else "weak"
    else:
        outcome = "no"
    parts = [f"{_word(outcome)} The guidance response of the LoRA trained on {label(eroding)} (applied to dev) changes "
             f"by {own.fmt()} per {PER} training steps (least-squares slope over its checkpoints, mean over "
             f"{own.n} training runs [{level:.0%} interval over runs])"]
    for c, d in diffs.items():
        parts.append(f"{label(c)}: {mean_ci(ctrl[c], level).fmt()}, difference {d.fmt()}")
    text = "; ".join(parts[:1]) + ". Controls: " + "; ".join(parts[1:]) + " (Welch interval)."
    return {"claim": "i", "outcome": outcome, "text": text, "slope": own.to_dict(),
            "controls": {c: {"slope": mean_ci(ctrl[c], level).to_dict(), "difference": d.to_dict()}
                         for c, d in diffs.items()}}


def best_verdict(pooled: Pooled, claim: tuple[str, str], among: Sequence[str], metric: str,
                 label: Callable[[str], str]) -> dict:
    """Claim (ii): is `claim` = (group, base) the best of the `among` groups' cells on `metric`?"""
    cells = {m: {c: e for c, e in d.items() if c[0] in among} for m, d in pooled.main.items()}
    v = claim_verdict(cells, claim, metric, lambda c: f"trained on {label(c[0])}, applied to {c[1]}")
    outcome = {None: "unknown", False: "no", True: "yes" if v.get("clear") else "weak"}[v.get("reproduced")]
    return {**v, "claim": "ii", "cell": v["claim"], "outcome": outcome}


def compare_verdict(pooled: Pooled, ref: str, others: Sequence[str], base: str, metric: str,
                    label: Callable[[str], str], level: float = 0.95) -> dict:
    """Claim (iii): each of `others` minus `ref` on `metric` applied to `base` (Welch over runs). Per other:
    "better" / "worse" (interval clear of 0, in the metric's good direction) or "no clear difference"."""
    spec = METRIC[metric]
    r = per_run(pooled, metric, (ref, base))
    out: dict = {"claim": "iii", "metric": metric, "base": base, "ref": ref, "comparisons": {}}
    texts = []
    for o in others:
        v = per_run(pooled, metric, (o, base))
        if not (v.size and r.size):
            continue
        d = welch_diff(v, r, level)
        s = _sig(d) * (1 if spec.higher_is_better else -1)
        word = "better than" if s > 0 else "worse than" if s < 0 else "not clearly different from"
        out["comparisons"][o] = {"difference": d.to_dict(), "word": word}
        texts.append(f"trained on {label(o)} is {word} trained on {label(ref)}: difference {d.fmt()}")
    out["text"] = (f"On {spec.label}, applied to {base}: " + "; ".join(texts) + ".") if texts else (
        f"No {spec.label} to compare with trained on {label(ref)}.")
    return out


def six_way_claims(pooled: Pooled, modes: dict[str, str], metric: str, label: Callable[[str], str],
                   base: str = "dev", low_base: str | None = "dev2pro", level: float = 0.95) -> list[dict]:
    """The three claims for the six training modes. `modes` maps the roles "a" .. "f" (dev at 3.5, dev at 1.0,
    dev2pro, guidance loss, adapter, pro) to group names; missing roles are left out of the claims."""
    has = [r for r in "abcdef" if r in modes]
    slopes = {modes[r]: run_slopes(pooled, "response", (modes[r], base)) for r in has}
    out = [erosion_verdict(slopes, modes.get("a", ""), [modes[r] for r in "bc" if r in modes], label, level)]
    among = [modes[r] for r in "abc" if r in modes]
    bases = [base] + ([low_base] if low_base else [])
    if "c" in modes:
        v = best_verdict(pooled, (modes["c"], base), among, metric, label)
        v["text"] = f"{_word(v['outcome'])} Among the cells trained on {', '.join(label(g) for g in among)} x " \
                    f"applied to {', '.join(bases)}: " + v["text"].split("** ", 1)[-1]
        out.append(v)
        alts = [modes[r] for r in "de" if r in modes]
        v = compare_verdict(pooled, modes["c"], alts, base, metric, label, level)
        texts = [v["text"]]
        if "f" in modes:
            up = compare_verdict(pooled, modes["f"], [modes["c"]], base, metric, label, level)
            v["upper_bound"] = up
            texts.append("Against the upper bound: " + up["text"][0].lower() + up["text"][1:])
        resp = compare_verdict(pooled, modes["c"], alts + ([modes["f"]] if "f" in modes else []), base, "response",
                               label, level)
        v["response"] = resp
        texts.append(resp["text"])
        v["text"] = " ".join(texts)
        v["outcome"] = "report"
        out.append(v)
    return out
