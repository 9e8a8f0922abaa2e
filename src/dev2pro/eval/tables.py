"""Markdown tables of the comparison's estimates (`mean [lo, hi]`): the main table (one row per cell, one column per
metric), the trained-on x applied-to pivot of one metric, and the series tables of the guidance sweep and the
training-step curves. Used by the report, the CLI and the demo's results page.
"""

from __future__ import annotations

import math

from dev2pro.eval.plan import CompareConfig
from dev2pro.eval.stats import METRICS, NAN_ESTIMATE


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
