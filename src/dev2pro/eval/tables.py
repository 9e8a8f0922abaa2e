"""Markdown tables of the comparison's estimates (`mean [lo, hi]`): the main table (one row per cell, one column per
metric), the trained-on x applied-to pivot of one metric, and the series tables of the guidance sweep and the
training-step curves. Used by the report, the CLI and the demo's results page.
"""

from __future__ import annotations

import math

from dev2pro.eval.plan import CompareConfig
from dev2pro.eval.stats import METRICS, NAN_ESTIMATE


def row_labels(cfg: CompareConfig, pooled: bool = False) -> dict[str, str]:
    """The LoRA rows of the tables and plots, in order: key -> "trained on" label. `pooled`: one row per group
    (`dev2pro.eval.groups`), else one per LoRA."""
    if pooled:
        return {g: cfg.label(g) for g in cfg.groups()}
    return {x.name: x.trained_on for x in cfg.loras}


def main_table(cfg: CompareConfig, main: dict, rows: dict[str, str] | None = None) -> str:
    """Markdown: one row per cell (trained on, applied to), one column per metric, `mean [lo, hi]`. `rows`: the LoRA
    rows (key -> label; default one per LoRA)."""
    rows = rows if rows is not None else row_labels(cfg)
    metrics = [m for m in METRICS if any(math.isfinite(e.mean) for e in main[m.key].values())]
    head = ["trained on", "applied to"] + [m.label + (" (lower better)" if not m.higher_is_better else "")
                                           for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = ([None] if cfg.baseline else []) + list(rows)
    for b in cfg.bases:
        for lora in keys:
            cell = (lora or "", b.name)
            if not any(cell in main[m.key] for m in METRICS):
                continue
            on = "(no LoRA)" if lora is None else rows[lora]
            vals = [main[m.key].get(cell, NAN_ESTIMATE).fmt() for m in metrics]
            lines.append(f"| {on} | {b.name} ({b.describe()}) | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def pivot_table(cfg: CompareConfig, main: dict, metric: str, rows: dict[str, str] | None = None) -> str:
    """Markdown 2x2 (or n x m): rows trained-on, columns applied-to, one metric."""
    rows = rows if rows is not None else row_labels(cfg)
    cols = [b.name for b in cfg.bases]
    lines = ["| trained on \\ applied to | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for key, label in rows.items():
        vals = [main[metric].get((key, c), NAN_ESTIMATE).fmt() for c in cols]
        if any(v != "n/a" for v in vals):
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def series_table(cfg: CompareConfig, series: dict, xname: str, rows: dict[str, str] | None = None) -> str:
    rows = rows if rows is not None else row_labels(cfg)
    metrics = [m for m in METRICS if series.get(m.key)]
    if not metrics:
        return ""
    head = ["LoRA", "base", xname] + [m.label for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {k: i for i, k in enumerate(rows)} | {"": -1}
    border = {b.name: i for i, b in enumerate(cfg.bases)}
    cells = sorted((c for c in dict.fromkeys(c for m in metrics for c in series[m.key]) if c[0] in order),
                   key=lambda c: (border[c[1]], order[c[0]]))
    for cell in cells:
        xs = sorted({x for m in metrics for x, _ in series[m.key].get(cell, [])})
        for x in xs:
            vals = [dict(series[m.key].get(cell, [])).get(x, NAN_ESTIMATE).fmt() for m in metrics]
            on = rows[cell[0]] if cell[0] else "(no LoRA)"
            lines.append(f"| {on} | {cell[1]} | {x:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
