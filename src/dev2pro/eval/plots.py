"""The comparison's figures: the image grid (rows: trained-on x applied-to cells, columns: prompts x seeds, labelled),
the bars of every metric per cell with interval whiskers, and the lines (with interval bands) of the guidance sweep
and the training-step curves. Matplotlib through its Agg canvas (no pyplot state, no display); small images are
upscaled nearest so their pixels stay visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dev2pro.eval.plan import CompareConfig
from dev2pro.eval.results import JobResult
from dev2pro.eval.stats import METRICS, NAN_ESTIMATE, Metric
from dev2pro.eval.tables import row_labels


def _cell_label(cfg: CompareConfig, lora: str | None, base: str, rows: dict[str, str]) -> str:
    b = cfg.base(base)
    on = "no LoRA" if lora is None else f"trained on {rows[lora]}"
    return f"{on} -> {base} ({b.describe()})"


def save_grid(cfg: CompareConfig, results: list[JobResult], path: Path, rows: dict[str, str] | None = None
              ) -> Path | None:
    """Rows: trained-on x applied-to cells at each base's main guidance; columns: prompts x seeds. `rows`: the LoRAs
    shown (name -> label; default all; with training-run groups, the first run of each group)."""
    rows = rows if rows is not None else row_labels(cfg)
    import torch
    from PIL import Image, ImageDraw, ImageFont

    s = cfg.sampling
    labels = rows
    rows = [r for r in results if r.images and r.job.step is None and r.job.guidance == cfg.base(r.job.base).guidance
            and r.job.seeds == s.seeds and r.job.prompts == s.prompts and (r.job.lora is None or r.job.lora in labels)]
    if not rows:
        return None
    lorder = {k: i for i, k in enumerate(labels)}
    border = {b.name: i for i, b in enumerate(cfg.bases)}
    rows.sort(key=lambda r: (border[r.job.base], -1 if r.job.lora is None else lorder[r.job.lora]))
    cols = sorted(set().union(*[set(r.images) for r in rows]))
    sample = next(iter(rows[0].images.values()))
    h, w = int(sample.shape[-2]) * s.grid_scale, int(sample.shape[-1]) * s.grid_scale
    font = ImageFont.load_default(size=11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(measure.textlength(_cell_label(cfg, r.job.lora, r.job.base, labels), font=font))
                      for r in rows)
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
        draw.text((4, y + h // 2 - 8), _cell_label(cfg, res.job.lora, res.job.base, labels), fill="black", font=font)
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


def plot_bars(cfg: CompareConfig, main: dict, path: Path, labels: dict[str, str] | None = None) -> Path | None:
    """One panel per metric: bars grouped by applied-to base, one bar per trained-on LoRA (or group: `labels`), with
    interval whiskers."""
    labels = labels if labels is not None else row_labels(cfg)
    metrics = [m for m in METRICS if any(math.isfinite(e.mean) for e in main.get(m.key, {}).values())]
    if not metrics:
        return None
    fig, axes, spare = _panels(len(metrics))
    rows = ([None] if cfg.baseline else []) + list(labels)
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
            label = "no LoRA" if lora is None else labels[lora]
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
        ax.set_xticks(range(len(cfg.bases)), [f"on {b.name}\n({b.describe()})" for b in cfg.bases], fontsize=8)
        ax.set_title(m.label + (" (lower is better)" if not m.higher_is_better else ""), fontsize=9)
    _legend(axes, spare, fontsize=8, title="LoRA trained on", title_fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_lines(cfg: CompareConfig, series: dict, xlabel: str, path: Path, labels: dict[str, str] | None = None
               ) -> Path | None:
    """`series[metric][(lora, base)] = [(x, Estimate), ...]`: one panel per metric, one line (with band) per cell.
    `labels`: the LoRA (or group) keys of the series -> their labels (default: one per LoRA)."""
    labels = labels if labels is not None else row_labels(cfg)
    def finite(pts):
        return sorted(((x, e) for x, e in pts if math.isfinite(e.mean)), key=lambda p: p[0])

    metrics = [m for m in METRICS if any(len(finite(v)) > 1 for v in series.get(m.key, {}).values())]
    if not metrics:
        return None
    colours = {"": "0.4"} | {k: f"C{i % 10}" for i, k in enumerate(labels)}  # colour: the LoRA
    styles = {b.name: ("-", "--", ":", "-.")[i % 4] for i, b in enumerate(cfg.bases)}  # line style: the base
    lorder = {k: i for i, k in enumerate(labels)} | {"": -1}
    border = {b.name: i for i, b in enumerate(cfg.bases)}
    fig, axes, spare = _panels(len(metrics))
    for ax, m in zip(axes, metrics):
        items = [kv for kv in series[m.key].items() if kv[0][0] in lorder]
        for (lora, base), pts in sorted(items, key=lambda kv: (border[kv[0][1]], lorder[kv[0][0]])):
            pts = finite(pts)
            if len(pts) < 2:
                continue
            xs = [x for x, _ in pts]
            label = f"{'no LoRA' if not lora else labels[lora]} -> {base}"
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
