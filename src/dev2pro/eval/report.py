"""The comparison's written outputs: `report.md` (verdict, setup, tables, figures, sweep, curves, run time) and
`results.json` (the config, the main estimates, the verdict, and every job's estimates and per-image scores). Values
that are not finite are written as null in JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from dev2pro.eval.results import CompareResult
from dev2pro.eval.stats import METRIC, METRICS
from dev2pro.eval.tables import main_table, pivot_table, series_table


def write_report(res: CompareResult, out: Path, preface: str = "") -> Path:
    cfg, s = res.config, res.config.sampling
    files = res.files
    parts = [f"# {cfg.output.title}", ""]
    if preface:
        parts += [preface.rstrip(), ""]
    if res.verdict:
        parts += ["## Verdict", "", res.verdict["text"], ""]
        if res.verdict.get("ranks"):
            ranks = ", ".join(f"{METRIC[k].label}: {r}/{n}" for k, (r, n) in res.verdict["ranks"].items())
            parts += [f"Rank of the claimed cell on each metric (1 = best): {ranks}.", ""]
    parts += ["## Setup", ""]
    for b in cfg.bases:
        sweep = f" (sweep: {', '.join(f'{g:g}' for g in sorted(b.values()))})" if b.sweep else ""
        neg = f", negative prompt {b.negative!r}" if b.negative else ""
        parts.append(f"- base **{b.name}**: `{b.ref}`, {b.describe()}{sweep}{neg}")
    if res.pooled is not None:
        for g, names in cfg.groups().items():
            parts.append(f"- LoRA **{g}**: trained on {cfg.label(g)}, {len(names)} training run(s): "
                         + ", ".join(f"`{cfg.lora(n).path}`" for n in names))
    else:
        for x in cfg.loras:
            parts.append(f"- LoRA **{x.name}**: trained on {x.trained_on}, strength {x.strength:g}, `{x.path}`")
    if any(b.response for b in cfg.bases):
        parts.append("- guidance response (adherence at the main guidance minus at the low one, same prompt and "
                     "seed): " + ", ".join(f"{b.name} {b.guidance:g} - {b.response:g}" for b in cfg.bases
                                           if b.response))
    parts += [f"- {len(s.prompts)} prompts x {len(s.seeds)} seeds ({', '.join(map(str, s.seeds))}), {s.steps} "
              f"sampling steps, {s.height}x{s.width}; curves: {len(s.curve_prompt_list())} prompts x "
              f"{len(s.curve_seed_list())} seeds", ""]
    parts += ["Prompts: " + "; ".join(f"`{p}`" for p in s.prompts), ""]
    level = f"{cfg.metrics.level:.0%}"
    main, sweep, curves, rows = res.view()
    how = "; ".join(f"{m.label}: {m.interval}" for m in METRICS)
    if res.pooled is not None:
        how = ("over training runs: each run's value first, then the Student-t interval over the runs of a "
               f"LoRA (see dev2pro.eval.groups); within one run: {how}")
    parts += ["## Results at each base's main guidance", "", f"Mean [{level} interval]. Intervals: {how}.", "",
              res.table(), ""]
    if len(rows) > 1 or len(cfg.bases) > 1:
        for key in ("score", "style", "adherence", "response"):
            if any(math.isfinite(e.mean) for e in main[key].values()):
                parts += [f"### {METRIC[key].label}: trained on x applied to", "",
                          pivot_table(cfg, main, key, rows), ""]
    for name, title in (("grid", "Image grid"), ("bars", "Metrics per cell")):
        if name in files:
            parts += [f"### {title}", "", f"![{name}]({files[name]})", ""]
    if any(b.sweep for b in cfg.bases):
        parts += ["## Guidance sweep", ""]
        if "sweep" in files:
            parts += [f"![guidance sweep]({files['sweep']})", ""]
        parts += [series_table(cfg, sweep, "guidance", rows), ""]
    if any(curves[m.key] for m in METRICS):
        parts += ["## Metrics over training steps", "", "Step 0 is the base without a LoRA.", ""]
        if "curves" in files:
            parts += [f"![curves]({files['curves']})", ""]
        parts += [series_table(cfg, curves, "step", rows), ""]
    if res.pooled is not None:
        parts += ["## Each training run", "", "The same table per training run (intervals over that run's images).",
                  "", main_table(cfg, res.main), ""]
    parts += ["## Run", "", f"{len(res.results)} image sets, {sum(len(r.seed) for r in res.results)} images, "
              f"{res.seconds:.0f} s. Raw numbers: `results.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_results_json(res: CompareResult, out: Path) -> Path:
    jobs = []
    for r in res.results:
        j = r.job
        jobs.append({
            "base": j.base, "lora": j.lora, "step": j.step, "guidance": j.guidance, "prompts": list(j.prompts),
            "seeds": list(j.seeds), "seconds": r.seconds, "metrics": {k: e.to_dict() for k, e in r.metrics.items()},
            "per_image": None if r.style is None else {
                "prompt_index": r.prompt_index.tolist(), "seed": r.seed.tolist(), "style": r.style.tolist(),
                "adherence": r.adherence.tolist()},
        })
    main = {m: [{"lora": c[0] or None, "base": c[1], **e.to_dict()} for c, e in d.items()] for m, d in res.main.items()}
    data = {"config": dataclasses.asdict(res.config), "main": main, "verdict": res.verdict, "jobs": jobs,
            "files": res.files, "seconds": res.seconds}
    path = out / "results.json"
    path.write_text(json.dumps(_json_safe(data), indent=1), encoding="utf-8")
    return path
