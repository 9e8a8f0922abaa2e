"""The demo's words around the comparison: the report's preface (what was trained, what the quick run cut), the
three claims' verdicts appended to `report.md`, `docs/demo-results.md` (`dev2pro demo --docs docs`) and the README's
summary of it between the `<!-- DEMO-RESULTS -->` markers (`--readme README.md`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

from dev2pro.eval.claims import six_way_claims
from dev2pro.eval.modes import MODE

CLAIM_TITLES = {
    "i": "(i) Training on dev at g = 3.5 erodes guidance as training goes on",
    "ii": "(ii) Trained on dev2pro, applied to dev is best",
    "iii": "(iii) The guidance loss and the adapter against dev2pro; dev2pro against its upper bound (pro)",
}
MARK_BEGIN, MARK_END = "<!-- DEMO-RESULTS -->", "<!-- /DEMO-RESULTS -->"


def cuts(plan, full_plan) -> list[str]:
    """What `plan` (the quick demo) cuts from the full experiment, field by field."""
    names = {"train_seeds": "training seeds per mode", "lora_steps": "LoRA steps", "checkpoints": "curve points",
             "dedistill_steps": "de-distillation steps", "n_base": "de-distillation images", "n_style": "style images",
             "prompts": "evaluation prompts", "seeds": "sampling seeds", "sample_steps": "sampling steps",
             "sweep": "extra guidance values on dev", "curve_seeds": "curve seeds", "curve_prompts": "curve prompts"}
    def fmt(name: str, v) -> str:
        if name in ("train_seeds", "seeds", "curve_seeds"):
            return str(len(v))
        if name == "curve_prompts" and v == 0:
            return "all"
        return (", ".join(f"{x:g}" for x in v) or "none") if isinstance(v, tuple) else str(v)

    out = []
    for f in dataclasses.fields(plan):
        a, b = getattr(plan, f.name), getattr(full_plan, f.name)
        if a != b and f.name in names:
            out.append(f"{names[f.name]} {fmt(f.name, a)} (full: {fmt(f.name, b)})")
    return out


def preface(plan, timings: dict[str, float], dev: str, pro: str, full: bool, skipped: dict[str, str],
            adapter: dict) -> str:
    from dev2pro.eval.demo import DemoPlan

    modes = "; ".join(f"({MODE[k].role}) {MODE[k].label}" for k in plan.modes)
    lines = [
        "Written by `dev2pro demo`" + (" --full" if full else "") + ": one style LoRA trained six ways on the toy "
        f"world. Toy dev (`{dev}`) was de-distilled into toy dev2pro (guidance input 1.0, plain flow loss, "
        f"{plan.dedistill_steps} steps on {plan.n_base} generator images)"
        + (f"; dev2pro - dev extracted as a rank-{adapter['rank']} LoRA (the de-distill adapter, "
           f"{adapter['energy']:.1%} of the difference's energy)" if adapter else "")
        + f". A rank-{plan.lora_rank} style LoRA ({plan.lora_targets}, {plan.lora_steps} steps, lr {plan.lora_lr:g}, "
        f"batch {plan.batch_size}, {plan.n_style} images of the held-out zxq style) was trained on: {modes}; "
        f"{len(plan.train_seeds)} training seeds each ({', '.join(map(str, plan.train_seeds))}); pro is `{pro}`. "
        f"Each run is applied to dev (embedded guidance {plan.guidance:g}; also {plan.response_guidance:g} for the "
        f"guidance response) and to dev2pro (true CFG {plan.guidance:g}, empty negative prompt).",
        "",
        "The headline metric is *styled and on prompt*: per image, the judge's style probability times its prompt "
        "adherence. The guidance response is adherence at guidance "
        f"{plan.guidance:g} minus at {plan.response_guidance:g} on dev, per image (same prompt and seed). Every row "
        "pools the training runs of one mode: its interval is over training runs (each run's value first, then the "
        "t-interval over runs). The verdicts on the three claims are at the end of this report.",
    ]
    if skipped:
        lines += ["", "Left out: " + "; ".join(f"{MODE[k].label} ({why})" for k, why in skipped.items()) + "."]
    if not full and plan != DemoPlan.full():
        lines += ["", "This is the quick demo; against `dev2pro demo --full` it cuts: "
                  + "; ".join(cuts(plan, DemoPlan.full())) + "."]
    lines += ["", "Stage times on this machine: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
              + f"; total before evaluation {sum(timings.values()):.0f} s."]
    return "\n".join(lines)


def run_claims(res, plan) -> list[dict]:
    if res.pooled is None:
        return []
    roles = {MODE[k].role: k for k in plan.modes}
    return six_way_claims(res.pooled, roles, res.config.claim.metric, res.config.label, base="dev",
                          low_base="dev2pro", level=res.config.metrics.level)


def claims_markdown(claims: list[dict]) -> str:
    parts = []
    for c in claims:
        parts += [f"### {CLAIM_TITLES[c['claim']]}", "", c["text"], ""]
    return "\n".join(parts)


def append_claims(res, report: Path) -> None:
    with report.open("a", encoding="utf-8") as f:
        f.write("## The three claims\n\n" + claims_markdown(res.claims) + "\n")
        t = res.summary["timings_s"]
        f.write(f"Whole demo: {res.total_seconds:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in t.items())}).\n")


def _run_line(res) -> str:
    summ = res.summary
    m, t = summ["machine"], summ["timings_s"]
    load = ""
    if m.get("load_average_start") is not None:
        load = f", load average {m['load_average_start']:.1f} at the start and {m['load_average_end']:.1f} at the end"
    return (f"Run: {summ['total_s'] / 60:.1f} minutes in all (" + ", ".join(f"{k} {x:.0f} s" for k, x in t.items())
            + f") on {m['cores']} CPU cores ({m['processor']}), {m['torch_threads']} torch thread(s){load}; "
            f"{m['cpu_seconds']:.0f} CPU seconds" + (" (" + ", ".join(f"{k} {x:.0f}" for k, x in summ["cpu_s"].items())
                                                     + ")" if summ.get("cpu_s") else "") + ".")


def _observations(res) -> list[str]:
    """Bullet points computed from the run: how the bases follow prompts alone, whether every mode learned the style."""
    main, _, _, rows = res.view()
    lines = []
    base = [(b, main["adherence"].get(("", b.name))) for b in res.config.bases]
    base = [(b, e) for b, e in base if e is not None and math.isfinite(e.mean)]
    if base:
        lines.append("- Without a LoRA, prompt adherence is " + ", ".join(
            f"{b.name} ({b.describe()}) {e.fmt()}" for b, e in base) + ".")
    styles = {k: main["style"].get((k, "dev")) for k in rows}
    styles = {k: e for k, e in styles.items() if e is not None and math.isfinite(e.mean)}
    if styles:
        lines.append("- Style probability applied to dev: " + ", ".join(
            f"{rows[k]} {e.fmt()}" for k, e in styles.items()) + ".")
    return lines


def write_results_doc(res, docs: str | Path, command: str = "dev2pro demo") -> Path:
    """`<docs>/demo-results.md` plus `<docs>/img/demo-*.png` from a finished demo (`run_demo`'s result)."""
    from dev2pro.eval.tables import pivot_table

    docs = Path(docs)
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    out = Path(res.config.output.dir)
    links = {}
    for name in ("grid", "bars", "curves", "sweep"):
        if name in res.files:
            shutil.copyfile(out / res.files[name], img / f"demo-{name}.png")
            links[name] = f"img/demo-{name}.png"
    main, _, _, rows = res.view()
    plan = res.summary["plan"]
    parts = [
        "## The toy demo: one style LoRA trained six ways", "",
        f"`{command}` de-distills the shipped toy dev into toy dev2pro, then trains one style LoRA (same data, rank, "
        "steps and training seeds) six ways: (a) on dev at guidance 3.5, (b) on dev at 1.0, (c) on dev2pro at 1.0 "
        "(the recipe), (d) on dev with the guidance-preserving loss at s = 3.5, (e) on dev + the de-distill adapter "
        "(dev2pro - dev as a LoRA) at 1.0, (f) on pro, the undistilled teacher (the upper bound). Each run is applied "
        "to dev (embedded guidance) and to dev2pro (true CFG). Numbers from a real run (its "
        f"`{out}/report.md` has everything).", "",
        f"{len(plan['train_seeds'])} training runs per mode, {plan['lora_steps']} LoRA steps; intervals are 95% "
        "t-intervals over training runs (each run's value first), so they include the spread between runs.", "",
    ]
    if res.summary.get("skipped_modes"):
        parts += ["Left out: " + "; ".join(f"{MODE[k].label} ({w})" for k, w in res.summary["skipped_modes"].items())
                  + ".", ""]
    if not res.summary.get("full"):
        from dev2pro.eval.demo import DemoPlan

        q = DemoPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.items()})
        parts += ["This is the quick demo. Against `dev2pro demo --full` it cuts: "
                  + "; ".join(cuts(q, DemoPlan.full())) + ".", ""]
    parts += ["### The claims", "", claims_markdown(res.claims), _run_line(res), "",
              "### Styled and on prompt (style probability x prompt adherence; mean [95% interval over runs])", "",
              pivot_table(res.config, main, "score", rows), ""]
    if any(math.isfinite(e.mean) for e in main["response"].values()):
        parts += [f"### Guidance response on dev (adherence at {plan['guidance']:g} minus at "
                  f"{plan['response_guidance']:g}; mean [95% interval over runs])", "",
                  pivot_table(res.config, main, "response", rows), ""]
    parts += ["### All metrics", "", res.table(), ""]
    if "curves" in links:
        parts += ["### Metrics over LoRA training steps (on dev; bands: 95% intervals over runs)", "",
                  f"![demo curves]({links['curves']})", ""]
    if "grid" in links:
        parts += ["### Image grid", "", "Rows: trained on x applied to (the first training run of each mode), and "
                  "each base alone; columns: evaluation prompts (fresh scenes in the zxq style), seed 0.", "",
                  f"![demo grid]({links['grid']})", ""]
    parts += ["### Reading it", "", *_observations(res),
              "- The toy world is a scientific instrument, not a proof: tiny Flux-architecture models, 32x32 images, a "
              "style of stripes, a judge trained on the generator. Whatever it shows is reported as it came out.",
              "- Regenerate this page with `dev2pro demo --full --docs docs --readme README.md`.", ""]
    path = docs / "demo-results.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def readme_summary(res, results_doc: str = "docs/demo-results.md") -> str:
    """The README's demo section: the verdicts, the headline table, a link to the full page."""
    from dev2pro.eval.tables import pivot_table

    main, _, _, rows = res.view()
    plan = res.summary["plan"]
    cmd = "dev2pro demo" + (" --full" if res.summary.get("full") else "")
    lines = ["## The toy demo: one style LoRA trained six ways", "",
             f"`{cmd}` trains one style LoRA on dev at 3.5, dev at 1.0, dev2pro (the recipe), dev with the guidance "
             "loss, dev + the de-distill adapter and pro (the upper bound), "
             f"{len(plan['train_seeds'])} training runs each, and checks three claims (intervals over training "
             f"runs). Full results, curves and grid: [{Path(results_doc).name}]({results_doc}).", ""]
    for c in res.claims:
        lines += [f"- **{CLAIM_TITLES[c['claim']]}**: {c['text']}"]
    lines += ["", "Styled and on prompt (mean [95% interval over runs]):", "",
              pivot_table(res.config, main, "score", rows), "", _run_line(res)]
    return "\n".join(lines)


def update_readme(readme: str | Path, section: str) -> Path:
    """Replace what lies between the README's `<!-- DEMO-RESULTS -->` markers with `section`."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    i, j = text.find(MARK_BEGIN), text.find(MARK_END)
    if i < 0 or j < i:
        raise ValueError(f"{readme}: no {MARK_BEGIN} ... {MARK_END} markers")
    readme.write_text(text[: i + len(MARK_BEGIN)] + "\n" + section.rstrip() + "\n" + text[j:], encoding="utf-8")
    return readme
