"""`dev2pro toy build`: make the toy world's models with the project's own recipes, measure them, ship them.

    1. write the generator's base dataset (PNG + .txt, no style) into <work>/data
    2. train-base   preset toy-pro (random init) -> toy-pro   flow loss, caption dropout 0.1 (CFG-capable teacher)
    3. distill      toy-pro -> toy-dev                         guidance distillation, w ~ U[1, 5]
    4. evaluate     judge prompt adherence: pro with CFG, dev with embedded guidance 3.5, real images for reference
    5. install      toy-pro/toy-dev safetensors (BFL layout, bf16) and toy.json into the package's assets

The recipes are called as library functions with their config dataclasses (exactly what `dev2pro train-base` and
`dev2pro distill` do with a TOML file), through their normal data-folder path: nothing here is a toy-only branch of
recipe code, and nothing here is a training loop.

Pitfalls: the build is CPU-bound (tens of minutes on 2 cores); every stage is skipped when its output already exists
in <work>, so an interrupted build resumes where it stopped (use a fresh <work> to rebuild from scratch). The shipped
files must stay small (< 20 MB in total): the toy presets are sized for that.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dev2pro.toy import world


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the shipped toy models (recorded in toy.json)."""

    seed: int = 0
    n_images: int = 20000
    pro_steps: int = 4000
    pro_batch: int = 32
    pro_lr: float = 1e-3
    timestep_sampling: str = "shift"  # U(0,1) then k t / (1 + (k-1) t): trains the high-noise times where shape is
    shift: float = 3.0  # decided (logit-normal left shapes at chance after 1,500 steps while colours were learned)
    caption_dropout: float = 0.1
    distill_steps: int = 1000
    distill_batch: int = 32
    distill_lr: float = 3e-4
    w_min: float = 1.0
    w_max: float = 5.0
    eval_prompts: int = 64
    eval_seeds: int = 2
    eval_steps: int = 20
    pro_cfg: float = 4.0
    dev_guidance: float = 3.5


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
    return world.write_dataset(data_dir, s.n_images, seed=s.seed)


@torch.no_grad()
def evaluate(model, judge, *, n_prompts: int = 64, seeds: int = 2, steps: int = 20, cfg: float = 1.0,
             guidance: float | None = None, prompt_seed: int = 777, progress: bool = False) -> dict:
    """Judge scores of `model` on `n_prompts` fresh generator captions x `seeds`: mean prompt adherence, accuracy per
    attribute, mean style probability, Frechet distance and diversity vs real images of the same captions."""
    from dev2pro.flux import sampling
    from dev2pro.toy.judge import diversity, frechet_distance

    real, captions, _ = world.make_batch(n_prompts, seed=prompt_seed)
    ae, text = world.ToyAutoencoder(), world.ToyTextEncoder()
    images = sampling.generate(model, ae, text, captions, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE,
                               steps=steps, guidance=guidance, cfg=cfg, seeds=range(seeds), batch_size=64,
                               progress=progress)
    caps = [c for c in captions for _ in range(seeds)]
    sc = judge.score(images, caps)
    real_feats = judge.features(real)
    return {
        "adherence": float(sc["adherence"].mean()),
        "per_attribute": {k: float(v.nanmean()) for k, v in sc["correct"].items()},
        "style": float(sc["style"].mean()),
        "frechet_vs_real": frechet_distance(sc["features"], real_feats),
        "diversity": diversity(sc["features"]),
        "images": images,
        "captions": caps,
    }


def install(pro: Path, dev: Path, meta: dict, asset_dir: Path | None = None) -> Path:
    from dev2pro.toy.assets import ASSET_DIR, MODELS

    dst = Path(asset_dir) if asset_dir is not None else ASSET_DIR
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pro, dst / MODELS["pro"])
    shutil.copyfile(dev, dst / MODELS["dev"])
    (dst / "toy.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def build(work: str | Path, settings: BuildSettings | None = None, *, install_to: str | Path | None = None,
          do_install: bool = True, progress: bool = True) -> dict:
    """Run the whole build in `work` (resumable per stage); returns the description written to toy.json."""
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.sampling import save_grid
    from dev2pro.toy.judge import Judge
    from dev2pro.train.recipes import distill, train_base

    s = settings or BuildSettings()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    write_data(s, work / "data")
    times["data_s"] = time.perf_counter() - t0

    pro_path = work / "pro" / "toy-pro.safetensors"
    t0 = time.perf_counter()
    if not pro_path.exists():
        pro_path = train_base.run(pro_config(s, work), resume=(work / "pro").exists())
    times["pro_s"] = time.perf_counter() - t0

    dev_path = work / "dev" / "toy-dev.safetensors"
    t0 = time.perf_counter()
    if not dev_path.exists():
        dev_path = distill.run(dev_config(s, work, pro_path), resume=(work / "dev").exists())
    times["dev_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    judge = Judge.load()
    common = dict(n_prompts=s.eval_prompts, seeds=s.eval_seeds, steps=s.eval_steps, progress=progress)
    pro = load_transformer(str(pro_path), dtype=torch.float32)
    dev = load_transformer(str(dev_path), dtype=torch.float32)
    evals = {
        f"pro_cfg{s.pro_cfg:g}": evaluate(pro, judge, cfg=s.pro_cfg, **common),
        "pro_cfg1": evaluate(pro, judge, cfg=1.0, **common),
        f"dev_g{s.dev_guidance:g}": evaluate(dev, judge, guidance=s.dev_guidance, **common),
        "dev_g1": evaluate(dev, judge, guidance=1.0, **common),
    }
    real, captions, _ = world.make_batch(s.eval_prompts, seed=777)
    real_score = judge.score(real, captions)
    times["eval_s"] = time.perf_counter() - t0
    for name, ev in evals.items():
        save_grid(ev.pop("images")[:64], work / f"eval-{name}.png", ncols=8)
        ev.pop("captions")

    from dev2pro.flux.models import PRESETS

    meta = {
        "settings": asdict(s),
        "presets": {k: asdict(PRESETS[k]) for k in ("toy-pro", "toy-dev")},
        "params": {k: PRESETS[k].num_params() for k in ("toy-pro", "toy-dev")},
        "autoencoder": world.ToyAutoencoder().identity,
        "text_encoder": world.ToyTextEncoder().identity,
        "image_size": world.IMAGE_SIZE,
        "eval": {"real_images_adherence": float(real_score["adherence"].mean()), **evals},
        "build_seconds": {k: round(v, 1) for k, v in times.items()},
        "build_total_seconds": round(sum(times.values()), 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    (work / "toy.json").write_text(json.dumps(meta, indent=2) + "\n")
    if do_install:
        install(pro_path, dev_path, meta, install_to)
    return meta
