"""`dev2pro toy build`: make the toy world's models with the project's own recipes, measure them, ship them.

    1. write the generator's base dataset (PNG + .txt, no style) into <work>/data
    2. judge        train the judge on fresh generator images (half styled), validate it per attribute
    3. train-base   preset toy-pro (random init) -> toy-pro   flow loss, caption dropout 0.1 (CFG-capable teacher)
    4. distill      toy-pro -> toy-dev                         guidance distillation, w ~ U[1, 5]
    5. evaluate     judged on fresh captions: pro at CFG 1 / 3.5 / 4, dev at embedded g 1 / 3.5, dev with a dead
                    guidance input (`dead_guidance`) at g 1 / 3.5, real images for reference (means, Frechet
                    distance, diversity, grids; 256 captions)
    6. controls     the same conditions scored per image on 1,024 other captions (`controls.measure`, what
                    `dev2pro toy controls` runs), each control with its 95% interval: toy.json's "controls"
    7. install      judge, toy-pro/toy-dev safetensors (BFL layout, bf16) and toy.json into the package's assets

The recipes are called as library functions with their config dataclasses (exactly what `dev2pro train-base` and
`dev2pro distill` do with a TOML file), through their normal data-folder path: nothing here is a toy-only branch of
recipe code, and nothing here is a training loop.

The controls say whether the toy world is one where guidance matters (it is built so that it is: see
docs/toy-world.md): pro's adherence at CFG 1 well below CFG 4, dev at g = 3.5 close to pro at CFG 3.5 and well above
dev at g = 1, and the negative control, dev whose guidance embedding is held at its g = 1 output, showing no guidance
response.

Pitfalls: the build is CPU-bound (tens of minutes on one thread); every stage is skipped when its output already exists
in <work>, so an interrupted build resumes where it stopped (use a fresh <work> to rebuild from scratch). The shipped
files must stay small (< 20 MB in total): the toy presets are sized for that.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dev2pro.toy import world
from dev2pro.toy.controls import condition, controls, intervals, measure


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the shipped toy models (recorded in toy.json)."""

    seed: int = 0
    n_images: int = 8000
    caption_noise: float = world.CAPTION_NOISE  # base data captions misname each attribute with this probability
    judge_images: int = 8192
    judge_steps: int = 1500
    judge_seed: int = 7
    pro_steps: int = 3000  # pro's CFG 3.5 - CFG 1 gap peaks here: 2,000 +14.3, 3,000 +15.7, 4,000 +14.8, 6,000 +12.2
    pro_batch: int = 32
    pro_lr: float = 1e-3
    timestep_sampling: str = "shift"  # U(0,1) then k t / (1 + (k-1) t): trains the high-noise times where shape is
    shift: float = 3.0  # decided (logit-normal left shapes at chance after 1,500 steps while colours were learned)
    caption_dropout: float = 0.1
    distill_steps: int = 1000
    distill_batch: int = 32
    distill_lr: float = 1e-3  # build V: 3e-4 left dev at g = 1 2-3 points more guided than pro at CFG 1
    w_min: float = 1.0
    w_max: float = 5.0
    eval_prompts: int = 256
    eval_seeds: int = 2
    eval_steps: int = 20
    eval_prompt_seed: int = 777
    pro_cfgs: tuple[float, ...] = (1.0, 3.5, 4.0)
    dev_guidances: tuple[float, ...] = (1.0, 3.5)
    judge_val_images: int = 1024
    control_prompts: int = 1024  # the controls' captions (a stream of their own), x eval_seeds, eval_steps
    control_prompt_seed: int = 778


def _train_config(s: BuildSettings, steps: int, batch: int, lr: float):
    from dev2pro.train.config import TrainConfig

    return TrainConfig(steps=steps, seed=s.seed, batch_size=batch, lr=lr, betas=(0.9, 0.99), warmup_steps=100,
                       lr_schedule="cosine", min_lr_ratio=0.1, timestep_sampling=s.timestep_sampling, shift=s.shift,
                       mixed_precision="bf16", device="cpu", log_every=50)


def _data_config(data_dir: Path):
    from dev2pro.data.config import DataConfig

    return DataConfig(dir=str(data_dir), resolution=world.IMAGE_SIZE)


def pro_config(s: BuildSettings, work: Path):
    """The train-base config of the toy teacher (also written to <work>/pro/toy-pro.toml by the recipe)."""
    from dev2pro.train.config import ModelConfig, OutputConfig
    from dev2pro.train.recipes.train_base import BaseSection, TrainBaseConfig

    return TrainBaseConfig(
        model=ModelConfig(base=f"preset:toy-pro@{s.seed}", t5="toy", clip="toy", autoencoder="toy"),
        train=_train_config(s, s.pro_steps, s.pro_batch, s.pro_lr),
        output=OutputConfig(dir=str(work / "pro"), name="toy-pro", dtype="bf16", save_every=250, keep_last=2),
        data=_data_config(work / "data"),
        base=BaseSection(caption_dropout=s.caption_dropout),
    )


def dev_config(s: BuildSettings, work: Path, teacher: Path):
    """The distill config of the toy student."""
    from dev2pro.train.config import ModelConfig, OutputConfig
    from dev2pro.train.recipes.distill import DistillRecipeConfig, DistillSection

    return DistillRecipeConfig(
        model=ModelConfig(base=str(teacher), t5="toy", clip="toy", autoencoder="toy"),
        train=_train_config(s, s.distill_steps, s.distill_batch, s.distill_lr),
        output=OutputConfig(dir=str(work / "dev"), name="toy-dev", dtype="bf16", save_every=250, keep_last=2),
        data=_data_config(work / "data"),
        distill=DistillSection(w_min=s.w_min, w_max=s.w_max),
    )


def write_data(s: BuildSettings, data_dir: Path) -> Path:
    if len(list(data_dir.glob("*.txt"))) == s.n_images:
        return data_dir
    return world.write_dataset(data_dir, s.n_images, seed=s.seed, caption_noise=s.caption_noise)


@contextmanager
def dead_guidance(model, value: float = 1.0):
    """Negative control: while active, `model`'s guidance embedding outputs what it outputs for g = `value`, whatever
    g is asked (a forward pre-hook feeds `time_text_embed.guidance_embedder` the sinusoidal code of `value`, scaled
    by 1000 as diffusers' FluxTransformer2DModel scales g before `time_proj`). A model whose prompt adherence still
    rose with g under this hook would be getting its guidance response from somewhere else."""
    emb = model.time_text_embed
    if not hasattr(emb, "guidance_embedder"):
        raise ValueError("dead_guidance needs a model with a guidance embedding (a dev model)")

    def hook(module, args):
        proj = args[0]
        g = torch.full((proj.shape[0],), value * 1000.0, device=proj.device, dtype=torch.float32)
        return (emb.time_proj(g).to(proj.dtype),)

    handle = emb.guidance_embedder.register_forward_pre_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


@torch.no_grad()
def evaluate(model, judge, *, n_prompts: int = 256, seeds: int = 2, steps: int = 20, cfg: float = 1.0,
             guidance: float | None = None, prompt_seed: int = 777, progress: bool = False) -> dict:
    """Judge scores of `model` on `n_prompts` fresh generator captions x `seeds`: mean prompt adherence, accuracy per
    attribute, mean style probability, Frechet distance and diversity vs real images of the same captions."""
    from dev2pro.flux import sampling
    from dev2pro.toy.judge import diversity, frechet_distance

    real, captions, _ = world.make_batch(n_prompts, seed=prompt_seed)
    ae, text = world.ToyAutoencoder(), world.ToyTextEncoder()
    images = sampling.generate(model, ae, text, captions, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE,
                               steps=steps, guidance=guidance, cfg=cfg, seeds=range(seeds), batch_size=128,
                               progress=progress)
    caps = [c for c in captions for _ in range(seeds)]
    sc = judge.score(images, caps)
    real_feats = judge.features(real)
    return {
        "adherence": float(sc["adherence"].mean()),
        "per_attribute": {k: float(v.nanmean()) for k, v in sc["correct"].items()},
        "all_correct": float(torch.stack([v for v in sc["correct"].values()], 1).min(1).values.mean()),
        "style": float(sc["style"].mean()),
        "frechet_vs_real": frechet_distance(sc["features"], real_feats),
        "diversity": diversity(sc["features"]),
        "images": images,
        "captions": caps,
    }


def install(pro: Path, dev: Path, meta: dict, asset_dir: Path | None = None, judge: Path | None = None) -> Path:
    from dev2pro.toy.assets import ASSET_DIR, MODELS

    dst = Path(asset_dir) if asset_dir is not None else ASSET_DIR
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pro, dst / MODELS["pro"])
    shutil.copyfile(dev, dst / MODELS["dev"])
    if judge is not None:
        shutil.copyfile(judge, dst / "judge.safetensors")
    (dst / "toy.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def _timed(times: dict, key: str):
    """Add the wall time of the `with` block to `times[key]`."""

    @contextmanager
    def block():
        t0 = time.perf_counter()
        yield
        times[key] = times.get(key, 0.0) + time.perf_counter() - t0

    return block()


def _stage_json(path: Path, make) -> dict:
    """A stage whose output is a JSON file: read it when it exists, else compute it with `make()` and write it."""
    if path.exists():
        return json.loads(path.read_text())
    out = make()
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def build(work: str | Path, settings: BuildSettings | None = None, *, install_to: str | Path | None = None,
          do_install: bool = True, progress: bool = True) -> dict:
    """Run the whole build in `work` (resumable per stage: each stage is skipped when its output exists); returns the
    description written to toy.json."""
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.sampling import save_grid
    from dev2pro.toy.judge import Judge, train_judge, validate
    from dev2pro.train.recipes import distill, train_base

    s = settings or BuildSettings()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    times_path = work / "times.json"
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.exists() else {}

    def save_times():
        times_path.write_text(json.dumps(times, indent=1) + "\n")

    with _timed(times, "data_s"):
        write_data(s, work / "data")
    save_times()

    judge_path = work / "judge.safetensors"
    if not judge_path.exists():
        with _timed(times, "judge_s"):
            j = train_judge(n_images=s.judge_images, steps=s.judge_steps, seed=s.judge_seed, progress=progress)
            acc = validate(j, n=s.judge_val_images)
            j.save(judge_path, {"steps": s.judge_steps, "images": s.judge_images, "seed": s.judge_seed,
                                "accuracy": acc})
            (work / "judge.json").write_text(json.dumps(acc, indent=1) + "\n")
        save_times()
    judge = Judge.load(judge_path)
    judge_acc = _stage_json(work / "judge.json", lambda: validate(judge, n=s.judge_val_images))

    pro_path = work / "pro" / "toy-pro.safetensors"
    if not pro_path.exists():
        with _timed(times, "pro_s"):
            pro_path = train_base.run(pro_config(s, work), resume=(work / "pro").exists())
        save_times()

    dev_path = work / "dev" / "toy-dev.safetensors"
    if not dev_path.exists():
        with _timed(times, "dev_s"):
            dev_path = distill.run(dev_config(s, work, pro_path), resume=(work / "dev").exists())
        save_times()

    common = dict(n_prompts=s.eval_prompts, seeds=s.eval_seeds, steps=s.eval_steps, prompt_seed=s.eval_prompt_seed,
                  progress=progress)
    models = {"pro": load_transformer(str(pro_path), dtype=torch.float32),
              "dev": load_transformer(str(dev_path), dtype=torch.float32)}
    names = [f"pro_cfg{c:g}" for c in s.pro_cfgs]
    names += [f"{dead}dev_g{g:g}" for dead in ("", "dead_") for g in s.dev_guidances]
    (work / "eval").mkdir(exist_ok=True)
    evals = {}
    for name in names:  # one JSON per condition, so an interrupted evaluation resumes
        out = work / "eval" / f"{name}.json"
        if not out.exists():
            which, kw, dead = condition(name)
            with _timed(times, "eval_s"), dead_guidance(models[which]) if dead else nullcontext():
                ev = evaluate(models[which], judge, **kw, **common)
            save_grid(ev.pop("images")[:64], work / "eval" / f"{name}.png", ncols=8)
            ev.pop("captions")
            out.write_text(json.dumps(ev, indent=1) + "\n")
            save_times()
        evals[name] = json.loads(out.read_text())
    with _timed(times, "controls_s"):  # cached per condition in <work>/controls: an interrupted stage resumes
        per_image = measure(models, judge, names, n_prompts=s.control_prompts, seeds=s.eval_seeds,
                            steps=s.eval_steps, prompt_seed=s.control_prompt_seed, work=work / "controls",
                            progress=progress)
    save_times()
    real, captions, _ = world.make_batch(s.eval_prompts, seed=s.eval_prompt_seed)
    real_score = judge.score(real, captions)

    from dev2pro.flux.models import PRESETS

    meta = {
        "world": "v2: two objects (colour, shape, size bound to each) left of / above each other",
        "settings": asdict(s),
        "presets": {k: asdict(PRESETS[k]) for k in ("toy-pro", "toy-dev")},
        "params": {k: PRESETS[k].num_params() for k in ("toy-pro", "toy-dev")},
        "autoencoder": world.ToyAutoencoder().identity,
        "text_encoder": world.ToyTextEncoder().identity,
        "image_size": world.IMAGE_SIZE,
        "judge_accuracy": judge_acc,
        "eval": {"real_images_adherence": float(real_score["adherence"].mean()), **evals},
        "controls": intervals(per_image, s.eval_seeds),
        "controls_measured_on": f"{s.control_prompts} captions (stream {s.control_prompt_seed}) x {s.eval_seeds} "
                                f"seeds, {s.eval_steps} steps, 95% intervals over captions",
        "eval_controls": controls(evals),
        "command": (f"dev2pro toy build --threads 1 --pro-steps {s.pro_steps} --distill-steps {s.distill_steps} "
                    f"--caption-noise {s.caption_noise:g} --caption-dropout {s.caption_dropout:g} "
                    f"--w-min {s.w_min:g} --w-max {s.w_max:g} --distill-lr {s.distill_lr:g}"),
        "build_seconds": {k: round(v, 1) for k, v in times.items()},
        "build_total_seconds": round(sum(times.values()), 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    (work / "toy.json").write_text(json.dumps(meta, indent=2) + "\n")
    if do_install:
        install(pro_path, dev_path, meta, install_to, judge=judge_path)
    return meta
