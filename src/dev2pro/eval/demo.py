"""`dev2pro demo`: the whole dev2pro recipe on the toy world, on a CPU, in minutes, ending in the 2x2 verdict.

Stages (each one is a normal recipe run with a config written to `<out>/configs/`, so any stage can be re-run by
hand with `dev2pro <recipe> <out>/configs/<stage>.toml`):

1. data: the generator writes plain base images (for de-distillation), the style set (the held-out "zxq" style,
   for the LoRAs) and reference images: the evaluation prompts' own scenes rendered in the style, several
   sub-pixel placements each (what a perfect model would draw; the Frechet distance compares against them);
2. de-distill toy dev into toy dev2pro (`dedistill` recipe: all weights, guidance input fixed at 1.0, plain flow
   loss, on the base images);
3. three style LoRAs with the same seed, steps, rank and data (`train-lora` recipe): on dev at guidance 3.5 (the
   common trainer default), on dev at 1.0, on dev2pro at 1.0; intermediate checkpoints kept for the curves;
4. `compare`: each LoRA applied to dev (embedded guidance 3.5) and to dev2pro (true CFG 3.5, empty negative prompt),
   a guidance sweep, several seeds, metrics with 95% intervals, curves over training steps, image grid;
5. `<out>/report.md`: the table, the grid, the curves, the stage timings, and the verdict on the article's claim
   ("trained on dev2pro, applied to dev" is best) on the headline metric, whatever the numbers are.

Sizes (`DemoPlan`) are chosen so the default run stays under 10 minutes on a 2-core CPU (timed in
docs/demo-results.md); `--full` trains longer and evaluates more prompts and seeds; `--steps-scale` multiplies every
training step count (tests use a tiny one). Pitfall: the toy models must exist (`toy:dev`, shipped in the package;
`dev2pro toy build` rebuilds them); `--dev` points the demo at another dev-like model.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from dev2pro.config import dump_toml, from_dict

# (name, "trained on" label, base key, training guidance). The claim's cell is ("dev2pro-g1", "dev").
LORAS: tuple[tuple[str, str, str, float], ...] = (
    ("dev-g3.5", "dev (g=3.5)", "dev", 3.5),
    ("dev-g1", "dev (g=1.0)", "dev", 1.0),
    ("dev2pro-g1", "dev2pro (g=1.0)", "dev2pro", 1.0),
)
CLAIM = ("dev2pro-g1", "dev")


@dataclass(frozen=True)
class DemoPlan:
    """Every size and step count of the demo in one place."""

    n_base: int = 1024  # plain generator images for de-distillation
    n_style: int = 64  # styled images for the LoRA
    reference_variants: int = 8  # reference renderings per evaluation prompt (jitter variants), for the FD
    dedistill_steps: int = 500
    dedistill_lr: float = 2e-4
    lora_steps: int = 250  # a rank-8 LoRA learns the zxq style in ~100-150 steps (judge P(style) 0.13 -> 0.99)
    lora_lr: float = 1e-3
    lora_rank: int = 8
    lora_targets: str = "all-linear"
    batch_size: int = 16
    checkpoints: int = 2  # intermediate LoRA checkpoints for the curves (plus the final step)
    prompts: int = 8  # evaluation prompts (fresh scenes, with the trigger)
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    curve_seeds: tuple[int, ...] = (0,)
    sample_steps: int = 16
    guidance: float = 3.5  # dev's embedded guidance and dev2pro's CFG scale at evaluation
    sweep: tuple[float, ...] = (2.0, 5.0)
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls()

    @classmethod
    def full(cls) -> DemoPlan:
        return cls(n_base=4096, n_style=128, dedistill_steps=1200, lora_steps=400, checkpoints=4,
                   prompts=16, seeds=(0, 1, 2, 3, 4, 5, 6, 7), curve_seeds=(0, 1, 2, 3), sample_steps=24,
                   sweep=(1.5, 2.0, 5.0, 7.0))

    def scaled(self, scale: float) -> DemoPlan:
        """Training step counts times `scale` (at least 2 steps each)."""
        return dataclasses.replace(self, dedistill_steps=max(2, round(self.dedistill_steps * scale)),
                                   lora_steps=max(2, round(self.lora_steps * scale)))

    def save_every(self) -> int:
        """LoRA checkpoint interval: `checkpoints` intermediate ones, then the final step."""
        return max(1, math.ceil(self.lora_steps / (self.checkpoints + 1))) if self.checkpoints > 0 else 0

    def keep_last(self) -> int:
        return max(1, self.lora_steps // self.save_every() + 1) if self.checkpoints > 0 else 1


def _recipe_config_class(module):
    """The config dataclass a recipe's `run(cfg, ...)` takes (read from its annotation, so the demo follows the
    recipe's schema instead of restating its class name)."""
    return typing.get_type_hints(module.run)["cfg"]


def run_recipe(name: str, data: dict, config_path: Path) -> Path:
    """Build recipe `name`'s config from `data` (strictly), save it as TOML, run it; returns the recipe's output."""
    module = importlib.import_module(f"dev2pro.train.recipes.{name}")
    cfg = from_dict(_recipe_config_class(module), data)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(dump_toml(cfg), encoding="utf-8")
    return Path(module.run(cfg))


def _model_section(base: str) -> dict:
    return {"base": base, "t5": "toy", "clip": "toy", "autoencoder": "toy", "dtype": "fp32"}


def _train_section(plan: DemoPlan, steps: int, lr: float, guidance: float) -> dict:
    return {"steps": steps, "guidance": guidance, "seed": plan.seed, "batch_size": plan.batch_size, "lr": lr,
            "device": "cpu", "log_every": 10}


def _data_section(folder: Path) -> dict:
    from dev2pro.toy.world import IMAGE_SIZE

    return {"dir": str(folder), "resolution": IMAGE_SIZE}


def eval_scenes(plan: DemoPlan):
    """Fresh styled scenes (a generator stream no training set uses): the evaluation prompts are their captions."""
    from dev2pro.toy.world import scenes

    return scenes(plan.prompts, seed=plan.seed + 7001, style=True)


def eval_prompts(plan: DemoPlan) -> tuple[str, ...]:
    return tuple(s.caption() for s in eval_scenes(plan))


def write_reference(folder: Path, plan: DemoPlan) -> Path:
    """Each evaluation scene rendered `reference_variants` times with seeded sub-pixel jitter (as the generator
    draws it): the distribution a perfect model would sample for the evaluation prompts."""
    import numpy as np
    from PIL import Image

    from dev2pro.toy.world import render

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(plan.seed + 3001)
    for i, sc in enumerate(eval_scenes(plan)):
        for k in range(plan.reference_variants):
            jitter = tuple(float(v) for v in rng.uniform(-0.03, 0.03, size=2))  # the range world.scene draws
            Image.fromarray(render(dataclasses.replace(sc, jitter=jitter))).save(folder / f"{i:03d}-{k:02d}.png")
    return folder


def compare_config(plan: DemoPlan, out: Path, dev: str, dev2pro: Path, loras: dict[str, Path], title: str) -> dict:
    from dev2pro.toy.world import IMAGE_SIZE

    return {
        "bases": [
            {"name": "dev", "ref": dev, "mode": "embedded", "guidance": plan.guidance, "sweep": list(plan.sweep)},
            {"name": "dev2pro", "ref": str(dev2pro), "mode": "cfg", "guidance": plan.guidance,
             "sweep": list(plan.sweep), "negative": ""},
        ],
        "loras": [{"name": name, "path": str(loras[name]), "trained_on": label,
                   "checkpoints": [str(loras[name].parent)] if plan.checkpoints > 0 else []}
                  for name, label, _, _ in LORAS],
        "sampling": {"prompts": list(eval_prompts(plan)), "seeds": list(plan.seeds), "steps": plan.sample_steps,
                     "height": IMAGE_SIZE, "width": IMAGE_SIZE, "batch_size": 32, "curve_seeds": list(plan.curve_seeds),
                     "grid_prompts": 6, "grid_seeds": 1},
        "models": {"autoencoder": "toy", "t5": "toy", "clip": "toy", "device": "cpu", "dtype": "fp32"},
        "metrics": {"judge": "toy", "reference": str(out / "data" / "reference"),
                    "seed": plan.seed},
        "claim": {"lora": CLAIM[0], "base": CLAIM[1], "metric": "score"},
        "output": {"dir": str(out), "title": title},
        "curves": plan.checkpoints > 0,
    }


def _preface(plan: DemoPlan, timings: dict[str, float], dev: str, full: bool) -> str:
    total = sum(timings.values())
    lines = [
        "Written by `dev2pro demo`" + (" --full" if full else "") + ": the dev2pro recipe on the toy world. "
        "Toy dev was de-distilled into toy dev2pro (guidance input 1.0, plain flow loss, "
        f"{plan.dedistill_steps} steps on {plan.n_base} generator images); a rank-{plan.lora_rank} style LoRA "
        f"({plan.lora_targets}, {plan.lora_steps} steps, lr {plan.lora_lr:g}, batch {plan.batch_size}, seed "
        f"{plan.seed}, {plan.n_style} images of the held-out zxq style) was trained three times: on dev at g=3.5, on "
        f"dev at g=1.0 and on dev2pro at g=1.0. Each is applied to dev (embedded guidance {plan.guidance:g}) and to "
        f"dev2pro (true CFG {plan.guidance:g}, empty negative prompt). Base model: `{dev}`.",
        "",
        "The headline metric is *styled and on prompt*: per image, the judge's style probability times its prompt "
        "adherence (fraction of the prompt's attributes it recovers); the claim is checked on it, and the other "
        "metrics are shown beside it.",
        "",
        "Stage times on this machine: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f"; total before evaluation {total:.0f} s (evaluation time at the end of this report).",
    ]
    return "\n".join(lines)


def run_demo(out: str | Path = "runs/demo", plan: DemoPlan | None = None, *, full: bool = False, dev: str = "toy:dev",
             toolkit=None, log=print):
    """Run every stage; returns the `CompareResult`. `toolkit` replaces compare's model/judge toolkit (tests)."""
    from dev2pro.eval.compare import run_compare
    from dev2pro.eval.plan import CompareConfig
    from dev2pro.toy.world import write_dataset

    plan = plan or (DemoPlan.full() if full else DemoPlan.quick())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = out / "configs"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def stage(name: str):
        log(f"[demo] {name} ...")
        return time.perf_counter()

    t0 = stage("writing the toy datasets")
    data = out / "data"
    write_dataset(data / "base", plan.n_base, seed=plan.seed + 1001)
    write_dataset(data / "style", plan.n_style, seed=plan.seed + 2001, style=True)
    write_reference(data / "reference", plan)
    timings["data"] = time.perf_counter() - t0

    t0 = stage(f"de-distilling {dev} into dev2pro ({plan.dedistill_steps} steps, guidance 1.0)")
    dev2pro = run_recipe("dedistill", {
        "model": _model_section(dev),
        "train": _train_section(plan, plan.dedistill_steps, plan.dedistill_lr, 1.0),
        "data": _data_section(data / "base"),
        "output": {"dir": str(out / "dev2pro"), "name": "toy-dev2pro", "dtype": "fp32"},
    }, configs / "dedistill.toml")
    timings["dedistill"] = time.perf_counter() - t0

    bases = {"dev": dev, "dev2pro": str(dev2pro)}
    loras: dict[str, Path] = {}
    for name, label, base, g in LORAS:
        t0 = stage(f"training the style LoRA on {label} ({plan.lora_steps} steps)")
        loras[name] = run_recipe("train_lora", {
            "model": _model_section(bases[base]),
            "train": _train_section(plan, plan.lora_steps, plan.lora_lr, g),
            "lora": {"rank": plan.lora_rank, "alpha": float(plan.lora_rank), "targets": plan.lora_targets},
            "data": _data_section(data / "style"),
            "output": {"dir": str(out / f"lora-{name}"), "name": f"style-{name}", "save_every": plan.save_every(),
                       "keep_last": plan.keep_last()},
        }, configs / f"lora-{name}.toml")
        timings[f"LoRA {name}"] = time.perf_counter() - t0

    log("[demo] evaluating: every LoRA x {dev, dev2pro}, guidance sweep, step curves ...")
    title = "dev2pro demo: the 2x2 experiment on the toy world"
    cdata = compare_config(plan, out, dev, dev2pro, loras, title)
    cfg = from_dict(CompareConfig, cdata)
    (configs / "compare.toml").write_text(dump_toml(cfg), encoding="utf-8")
    res = run_compare(cfg, toolkit=toolkit, preface=_preface(plan, timings, dev, full))
    timings["evaluation"] = res.seconds
    total = time.perf_counter() - t_start
    summary = {"timings_s": timings, "total_s": total, "plan": dataclasses.asdict(plan), "dev": dev, "full": full,
               "verdict": res.verdict, "machine": machine_info(load_start)}
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    with (out / "report.md").open("a", encoding="utf-8") as f:
        f.write(f"Whole demo: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).\n")
    res.files["demo"] = "demo.json"
    res.total_seconds = total
    res.summary = summary
    return res


def machine_info(load_start: float | None = None) -> dict:
    """What the timings were measured on: CPU, cores, torch threads, load average, this process's CPU seconds."""
    import platform
    import resource

    import torch

    ru = resource.getrusage(resource.RUSAGE_SELF)
    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 1)}
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = None if load_start is None else round(load_start, 2)
        info["load_average_end"] = round(os.getloadavg()[0], 2)
    return info


def _observations(res) -> list[str]:
    """Bullet points computed from the run: how well the bases follow prompts without a LoRA, how far apart the LoRA
    cells are on the headline metric, and whether every LoRA learned the style."""
    import math

    main, lines = res.main, []
    keys = [("", b.name) for b in res.config.bases if ("", b.name) in main["adherence"]]
    if keys:
        text = "- Without a LoRA, prompt adherence is " + ", ".join(
            f"{k[1]} ({res.config.base(k[1]).describe()}) {main['adherence'][k].fmt()}" for k in keys) + "."
        if min(main["adherence"][k].mean for k in keys) >= 0.9:
            text += (" The bases already follow the prompts, so the toy world leaves little room for guidance to "
                     "matter; differences between cells come mostly from style and image statistics.")
        lines.append(text)
    cells = {k: e for k, e in main["score"].items() if k[0] and math.isfinite(e.mean)}
    if cells:
        hi, lo = max(cells.values(), key=lambda e: e.mean), min(cells.values(), key=lambda e: e.mean)
        lines.append(f"- On the headline metric the six LoRA cells span {lo.mean:.3f} to {hi.mean:.3f} (95% "
                     f"intervals about +-{(hi.hi - hi.lo) / 2:.3f} wide each).")
    styles = [e.mean for k, e in main["style"].items() if k[0] and math.isfinite(e.mean)]
    if styles:
        span = f"{min(styles):.3f}" if f"{min(styles):.3f}" == f"{max(styles):.3f}" else (
            f"between {min(styles):.3f} and {max(styles):.3f}")
        lines.append(f"- The LoRA cells show the style with judge probability {span}; without a LoRA: "
                     + ", ".join(f"{k[1]} {e.mean:.3f}" for k, e in main["style"].items() if not k[0]) + ".")
    return lines


def write_results_doc(res, docs: str | Path, command: str = "dev2pro demo") -> Path:
    """`<docs>/demo-results.md` plus `<docs>/img/demo-*.png` from a finished demo (`run_demo`'s result): the section
    the README shows. Regenerate it whenever the demo changes: `dev2pro demo --docs docs`."""
    import shutil

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
    summ = res.summary
    m = summ["machine"]
    t = summ["timings_s"]
    load = ""
    if m.get("load_average_start") is not None:
        load = f", load average {m['load_average_start']:.1f} at the start and {m['load_average_end']:.1f} at the end"
    v = res.verdict or {}
    parts = [
        "## The toy demo", "",
        f"`{command}` runs the whole dev2pro recipe on the toy world on a CPU: it de-distills the shipped toy dev into "
        "toy dev2pro, trains one style LoRA three ways (on dev at guidance 3.5, on dev at 1.0, on dev2pro at 1.0; same "
        "data, seed, steps and rank) and applies each to dev (embedded guidance) and to dev2pro (true CFG). The "
        f"numbers below are from a real run (its `{out}/report.md` has everything, including the guidance sweep).", "",
        f"**Does the article's claim reproduce on the toy world?** {v.get('text', 'no verdict (no judge)')}", "",
        f"Run: {summ['total_s'] / 60:.1f} minutes in all ("
        + ", ".join(f"{k} {x:.0f} s" for k, x in t.items())
        + f") on {m['cores']} CPU cores ({m['processor']}), {m['torch_threads']} torch thread(s){load}; "
        f"{m['cpu_seconds']:.0f} CPU seconds.", "",
        "### Styled and on prompt (style probability x prompt adherence, per image; mean [95% t-interval])", "",
        pivot_table(res.config, res.main, "score"), "",
        "### All metrics", "", res.table(), "",
    ]
    if "grid" in links:
        parts += ["### Image grid", "", "Rows: trained on x applied to (and each base alone); columns: evaluation "
                  "prompts (fresh scenes in the zxq style), seed 0.", "", f"![demo grid]({links['grid']})", ""]
    if "curves" in links:
        parts += ["### Metrics over LoRA training steps", "", f"![demo curves]({links['curves']})", ""]
    parts += ["### Reading it", "", *_observations(res),
              "- The toy world is a scientific instrument, not a proof: tiny Flux-architecture models, 32x32 images, a "
              "style of stripes, a judge trained on the generator. Whatever it shows is reported as it came out.",
              "- Each LoRA was trained once (one seed): the intervals cover sampling noise over prompts and seeds, not "
              "the spread between training runs. `dev2pro demo --full` trains longer and samples more.",
              "- Regenerate this section with `dev2pro demo --docs docs` after changing the demo or the toy models.",
              ""]
    path = docs / "demo-results.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
