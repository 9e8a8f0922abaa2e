"""The verdict on a claim: is the claimed cell (trained-on LoRA x applied-to base) the best LoRA cell on a metric,
and clearly so (intervals apart)? Plus the claimed cell's rank on every metric. Ties share a rank (competition
ranking) and a tie for first is not a reproduction: a claim that one cell is best needs it strictly best.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from dev2pro.eval.stats import METRIC, METRICS, Estimate


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
