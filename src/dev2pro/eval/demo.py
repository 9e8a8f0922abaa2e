"""`dev2pro demo`: the dev2pro recipe and the field's alternatives on the toy world, on a CPU, ending in verdicts.

Stages (each one is a normal recipe run with a config written to `<out>/configs/`, so any stage can be re-run by
hand with `dev2pro <recipe> <out>/configs/<stage>.toml`):

1. data: the generator writes plain base images (for de-distillation), the style set (the held-out "zxq" style,
   for the LoRAs) and reference images: the evaluation prompts' own scenes rendered in the style, several
   sub-pixel placements each (what a perfect model would draw; the Frechet distance compares against them);
2. de-distill toy dev into toy dev2pro (`dedistill` recipe: all weights, guidance input fixed at 1.0, plain flow
   loss, on the base images), then extract dev2pro - dev as a LoRA: the de-distill adapter (`lora extract`);
3. one style LoRA trained six ways (`dev2pro.eval.modes`: dev at 3.5, dev at 1.0, dev2pro, dev with the guidance
   loss, dev + adapter, pro), each with several training seeds, same data, steps and rank; checkpoints for the curves;
4. `compare`: every run applied to dev (embedded guidance 3.5, and 1.0 for the guidance response) and to dev2pro (true
   CFG 3.5, empty negative prompt), the curves over training steps on dev, the runs of each mode pooled with
   intervals over training runs (`dev2pro.eval.groups`);
5. the verdicts on the three claims (`dev2pro.eval.claims`) appended to `<out>/report.md`, whatever the numbers are.

Sizes (`DemoPlan`): the default run stays under 10 minutes on a 2-core CPU with one torch thread; `--full` is the whole
experiment (about an hour there: docs/evaluation.md has the measured and extrapolated timings); `--steps-scale`
multiplies every training step count (tests use a tiny one). Pitfall: the toy models must exist (`toy:dev`,
`toy:pro`, shipped in the package; `dev2pro toy build` rebuilds them); `--dev` / `--pro` point the demo elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dev2pro.config import dump_toml, from_dict
from dev2pro.eval.modes import CLAIM, MODE, MODES, lora_config, recipe_config_class, run_name, supports_guidance_loss


@dataclass(frozen=True)
class DemoPlan:
    """Every size and step count of the demo in one place (the default is the quick demo)."""

    n_base: int = 1024  # plain generator images for de-distillation
    n_style: int = 64  # styled images for the LoRA
    reference_variants: int = 8  # reference renderings per evaluation prompt (jitter variants), for the FD
    dedistill_steps: int = 300
    dedistill_lr: float = 2e-4
    adapter_rank: int = 32  # rank of the extracted de-distill adapter (mode e)
    modes: tuple[str, ...] = tuple(m.key for m in MODES)
    train_seeds: tuple[int, ...] = (0, 1)  # training runs per mode
    lora_steps: int = 100  # a rank-8 LoRA learns the zxq style in ~100-150 steps (judge P(style) 0.13 -> 0.99)
    lora_lr: float = 1e-3
    lora_rank: int = 8
    lora_targets: str = "all-linear"
    batch_size: int = 16
    checkpoints: int = 5  # LoRA checkpoints evenly over training, the last at the final step (curve points > 0)
    prompts: int = 8  # evaluation prompts (fresh scenes, with the trigger)
    seeds: tuple[int, ...] = (0, 1)  # sampling seeds of the final cells
    curve_prompts: int = 4  # prompts of the curves, the first ones (0: all)
    curve_seeds: tuple[int, ...] = (0,)
    sample_steps: int = 16
    guidance: float = 3.5  # dev's embedded guidance and dev2pro's CFG scale at evaluation
    response_guidance: float = 1.0  # the low guidance of the guidance response (on dev)
    sweep: tuple[float, ...] = ()  # more embedded guidance values for the final cells on dev
    seed: int = 0  # data streams

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls()

    @classmethod
    def full(cls) -> DemoPlan:
        return cls(n_base=4096, n_style=128, dedistill_steps=1200, train_seeds=(0, 1, 2), lora_steps=600,
                   checkpoints=6, prompts=16, seeds=(0, 1, 2, 3), curve_prompts=0, curve_seeds=(0,), sample_steps=20,
                   sweep=(2.0, 5.0))

    def scaled(self, scale: float) -> DemoPlan:
        """Training step counts times `scale` (at least 2 steps each)."""
        return dataclasses.replace(self, dedistill_steps=max(2, round(self.dedistill_steps * scale)),
                                   lora_steps=max(2, round(self.lora_steps * scale)))

    def save_every(self) -> int:
        """LoRA checkpoint interval: `checkpoints` of them, the last at the final step (0: none)."""
        return max(1, math.ceil(self.lora_steps / self.checkpoints)) if self.checkpoints > 0 else 0

    def keep_last(self) -> int:
        return max(1, math.ceil(self.lora_steps / self.save_every())) if self.checkpoints > 0 else 1

    def curve_steps(self) -> list[int]:
        """The training steps on the curves (besides step 0)."""
        if self.checkpoints <= 0:
            return []
        k = self.save_every()
        return [s for s in range(k, self.lora_steps, k)] + [self.lora_steps]


def run_recipe(name: str, data: dict, config_path: Path) -> Path:
    """Build recipe `name`'s config from `data` (strictly), save it as TOML, run it; returns the recipe's output."""
    import importlib

    module = importlib.import_module(f"dev2pro.train.recipes.{name}")
    cfg = from_dict(recipe_config_class(name), data)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(dump_toml(cfg), encoding="utf-8")
    return Path(module.run(cfg))


def eval_scenes(plan: DemoPlan):
    """Fresh styled scenes (a generator stream no training set uses): the evaluation prompts are their captions."""
    from dev2pro.toy.world import scenes

    return scenes(plan.prompts, seed=plan.seed + 7001, style=True)


def eval_prompts(plan: DemoPlan) -> tuple[str, ...]:
    return tuple(s.caption() for s in eval_scenes(plan))


def write_reference(folder: Path, plan: DemoPlan) -> Path:
    """Each evaluation scene rendered `reference_variants` times with its random placement redrawn as the generator
    draws it (`world.variant`): the distribution a perfect model would sample for the evaluation prompts."""
    import numpy as np
    from PIL import Image

    from dev2pro.toy.world import render, variant

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(plan.seed + 3001)
    for i, sc in enumerate(eval_scenes(plan)):
        for k in range(plan.reference_variants):
            Image.fromarray(render(variant(sc, rng))).save(folder / f"{i:03d}-{k:02d}.png")
    return folder


def as_file(ref: str, path: Path) -> str:
    """A model reference as a checkpoint file (`lora extract` reads files): `preset:` models are written out."""
    if not ref.startswith("preset:"):
        return ref
    from dev2pro.flux.checkpoint import load_transformer, save_transformer

    if not path.is_file():
        save_transformer(load_transformer(ref), path)
    return str(path)


def compare_config(plan: DemoPlan, out: Path, refs: dict[str, str], runs: dict[tuple[str, int], Path],
                   title: str) -> dict:
    """The comparison: every training run (grouped by mode) applied to dev and dev2pro."""
    from dev2pro.toy.world import IMAGE_SIZE

    modes = [MODE[k] for k in plan.modes]
    return {
        "bases": [
            {"name": "dev", "ref": refs["dev"], "mode": "embedded", "guidance": plan.guidance,
             "response": plan.response_guidance, "sweep": list(plan.sweep)},
            {"name": "dev2pro", "ref": refs["dev2pro"], "mode": "cfg", "guidance": plan.guidance, "negative": "",
             "curves": False},
        ],
        "loras": [{"name": run_name(m, s), "group": m.key, "path": str(runs[(m.key, s)]), "trained_on": m.label,
                   "checkpoints": [str(runs[(m.key, s)].parent)] if plan.checkpoints > 0 else []}
                  for m in modes for s in plan.train_seeds if (m.key, s) in runs],
        "sampling": {"prompts": list(eval_prompts(plan)), "seeds": list(plan.seeds), "steps": plan.sample_steps,
                     "height": IMAGE_SIZE, "width": IMAGE_SIZE, "batch_size": 32, "curve_seeds": list(plan.curve_seeds),
                     "curve_prompts": plan.curve_prompts, "grid_prompts": 6, "grid_seeds": 1},
        "models": {"autoencoder": "toy", "t5": "toy", "clip": "toy", "device": "cpu", "dtype": "fp32"},
        "metrics": {"judge": "toy", "reference": str(out / "data" / "reference"), "seed": plan.seed},
        "claim": {"lora": CLAIM[0], "base": CLAIM[1], "metric": "score",
                  "among": [k for k in ("dev-g3.5", "dev-g1", "dev2pro-g1") if k in plan.modes]},
        "output": {"dir": str(out), "title": title},
        "curves": plan.checkpoints > 0,
    }


def run_demo(out: str | Path = "runs/demo", plan: DemoPlan | None = None, *, full: bool = False, dev: str = "toy:dev",
             pro: str = "toy:pro", toolkit=None, log=print):
    """Run every stage; returns the `CompareResult` (with `.claims` and `.summary`). `toolkit` replaces compare's
    model/judge toolkit (tests)."""
    from dev2pro.eval.compare import run_compare
    from dev2pro.eval.demo_report import append_claims, preface, run_claims
    from dev2pro.eval.plan import CompareConfig
    from dev2pro.lora.ops import extract_lora
    from dev2pro.toy.world import write_dataset

    plan = plan or (DemoPlan.full() if full else DemoPlan.quick())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = out / "configs"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    skipped: dict[str, str] = {}
    if "dev-gloss3.5" in plan.modes and not supports_guidance_loss():
        skipped["dev-gloss3.5"] = "this train-lora has no train.guidance_loss option yet"
        plan = dataclasses.replace(plan, modes=tuple(k for k in plan.modes if k != "dev-gloss3.5"))

    cpu: dict[str, float] = {}  # CPU seconds per stage: on a busy shared machine, wall time says little
    cpu_mark = [time.process_time()]

    def stage(name: str):
        log(f"[demo] {name} ...")
        cpu_mark[0] = time.process_time()
        return time.perf_counter()

    def done(key: str, t0: float) -> None:
        timings[key] = time.perf_counter() - t0
        cpu[key] = time.process_time() - cpu_mark[0]

    t0 = stage("writing the toy datasets")
    data = out / "data"
    write_dataset(data / "base", plan.n_base, seed=plan.seed + 1001)
    write_dataset(data / "style", plan.n_style, seed=plan.seed + 2001, style=True)
    write_reference(data / "reference", plan)
    done("data", t0)

    t0 = stage(f"de-distilling {dev} into dev2pro ({plan.dedistill_steps} steps, guidance 1.0)")
    dev2pro = run_recipe("dedistill", {
        "model": {"base": dev, "t5": "toy", "clip": "toy", "autoencoder": "toy", "dtype": "fp32"},
        "train": {"steps": plan.dedistill_steps, "guidance": 1.0, "seed": plan.seed, "batch_size": plan.batch_size,
                  "lr": plan.dedistill_lr, "device": "cpu", "log_every": 10},
        "data": {"dir": str(data / "base"), "resolution": _image_size()},
        "output": {"dir": str(out / "dev2pro"), "name": "toy-dev2pro", "dtype": "fp32"},
    }, configs / "dedistill.toml")
    done("dedistill", t0)

    adapter, adapter_info = None, {}
    if any(MODE[k].adapter for k in plan.modes):
        t0 = stage(f"extracting the de-distill adapter (dev2pro - dev, rank {plan.adapter_rank})")
        adapter = out / "adapter" / "dedistill-adapter.safetensors"
        adapter.parent.mkdir(parents=True, exist_ok=True)
        summ = extract_lora(as_file(dev, out / "adapter" / "dev.safetensors"), dev2pro, adapter,
                            rank=plan.adapter_rank, progress=False)
        adapter_info = {"rank": plan.adapter_rank, "energy": summ.fraction}
        done("adapter", t0)

    refs = {"dev": dev, "dev2pro": str(dev2pro), "pro": pro}
    runs: dict[tuple[str, int], Path] = {}
    for key in plan.modes:
        mode = MODE[key]
        t0 = stage(f"training the style LoRA on {mode.label}, seeds {list(plan.train_seeds)} "
                   f"({plan.lora_steps} steps each)")
        for s in plan.train_seeds:
            name = run_name(mode, s)
            runs[(key, s)] = run_recipe("train_lora", lora_config(
                mode, s, refs=refs, adapter=str(adapter) if adapter else None, plan=plan,
                data_dir=str(data / "style"), out_dir=str(out / "loras" / name)), configs / f"lora-{name}.toml")
        done(f"LoRAs {key}", t0)

    stage("evaluating: every run x {dev, dev2pro}, guidance response, step curves")
    title = "dev2pro demo: one style LoRA trained six ways, on the toy world"
    cfg = from_dict(CompareConfig, compare_config(plan, out, refs, runs, title))
    (configs / "compare.toml").write_text(dump_toml(cfg), encoding="utf-8")
    res = run_compare(cfg, toolkit=toolkit, preface=preface(plan, timings, dev, pro, full, skipped, adapter_info))
    timings["evaluation"] = res.seconds
    cpu["evaluation"] = time.process_time() - cpu_mark[0]
    res.claims = run_claims(res, plan)
    total = time.perf_counter() - t_start
    res.total_seconds = total
    res.summary = {"timings_s": timings, "cpu_s": {k: round(v, 1) for k, v in cpu.items()}, "total_s": total,
                   "plan": dataclasses.asdict(plan), "dev": dev, "pro": pro,
                   "full": full, "skipped_modes": skipped, "adapter": adapter_info, "verdict": res.verdict,
                   "claims": res.claims, "machine": machine_info(load_start)}
    (out / "demo.json").write_text(json.dumps(res.summary, indent=1, default=str), encoding="utf-8")
    append_claims(res, out / "report.md")
    res.files["demo"] = "demo.json"
    return res


def _image_size() -> int:
    from dev2pro.toy.world import IMAGE_SIZE

    return IMAGE_SIZE


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
