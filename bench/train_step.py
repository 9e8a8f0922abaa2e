"""Bench a: LoRA training speed of `dev2pro train-lora` vs a loop written like diffusers' example script
(`bench/reference_diffusers_loop.py`), same base, LoRA (rank, attention targets, fp32), batch, images, fp32 compute,
no compile, on this CPU, side by side in one process.

Ours: the recipe as users run it (`dev2pro.train.recipes.train_lora.run`): latents and text embeddings are cached once,
then steps read the cache. Reference: images decoded, encoded by the autoencoder and captions encoded at every step.
Per step = median step time after the first (ours: between the recipe's per-step loss checks, over 2 epochs).
Per epoch = wall time of one pass over the dataset from a cold start (ours includes building the cache;
later epochs cost E x per step). Encoders are the toy world's (an exact pixel-unshuffle autoencoder and a hashed
word-embedding text encoder), so their per-step cost is far smaller than Flux's VAE and T5: on real Flux the gap from
caching is larger than measured here.
Goal: >= 1.3x faster per step and per epoch.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import one_thread, table, verdict

GOAL = 1.3
REPO = Path(__file__).resolve().parents[1]


def _ours(base: str, data: Path, out: Path, steps: int, batch: int, res: int, rank: int,
          extra: tuple[str, ...] = ()) -> tuple[float, list[float]]:
    """(wall time of the whole run, per-step times). Step boundaries are taken from the recipe's once-per-step
    `optim.check_finite(loss, "loss", ...)` call in `finish_step`, wrapped here to record a timestamp (nothing else
    changes). `extra`: more config overrides (after the defaults here, so they win)."""
    from dev2pro.config import load_config
    from dev2pro.train import optim
    from dev2pro.train.recipes import train_lora

    cfg = load_config(train_lora.TrainLoraConfig, REPO / "configs" / "tiny-cpu.toml", [
        f"model.base={base}", f"data.dir={data}", f"data.resolution={res}", f"output.dir={out}",
        f"train.steps={steps}", f"train.batch_size={batch}", f"lora.rank={rank}", f"lora.alpha={rank}",
        "sample.every=0", "monitor.every=0", "output.save_every=0", "train.warmup_steps=0", "train.lr=1e-4",
        f"data.cache_dir={out}/cache", *extra])
    stamps = []
    real = optim.check_finite

    def stamped(value, what, step, out_dir):
        if what == "loss":
            stamps.append(time.perf_counter())
        return real(value, what, step, out_dir)

    optim.check_finite = stamped
    try:
        t = time.perf_counter()
        train_lora.run(cfg)
        total = time.perf_counter() - t
    finally:
        optim.check_finite = real
    return total, [b - a for a, b in zip(stamps[:-1], stamps[1:])]


def measure(preset: str, n_images: int, size: int, batch: int, rank: int, folder: Path) -> dict[str, float]:
    import torch

    from bench import reference_diffusers_loop as ref
    from dev2pro.flux import checkpoint, models
    from dev2pro.toy.world import ToyAutoencoder, ToyTextEncoder, write_dataset

    tiny = models.PRESETS["tiny-dev"]  # the toy encoders' dims
    spec = models.PRESETS[preset].replace(in_channels=tiny.in_channels, context_in_dim=tiny.context_in_dim,
                                         vec_in_dim=tiny.vec_in_dim)
    base = folder / "base.safetensors"
    checkpoint.save_transformer(models.random_transformer(spec, seed=0), base)
    data = write_dataset(folder / "data", n_images, seed=0, size=size)
    epoch = n_images // batch
    ours_epoch, ours_steps = _ours(str(base), data, folder / "ours", 2 * epoch, batch, size, rank)
    ours_epoch -= sum(ours_steps[epoch - 1:])  # cold start + the first epoch's steps
    t = time.perf_counter()
    model = checkpoint.load_transformer(str(base), dtype=torch.float32)
    times = ref.train(model, ToyAutoencoder(), ToyTextEncoder(), data, steps=epoch, batch_size=batch, size=size,
                      rank=rank)
    ref_epoch = time.perf_counter() - t
    return {"ours_step": statistics.median(ours_steps[1:]), "ours_epoch": ours_epoch,
            "ref_step": statistics.median(times[1:]),
            "ref_epoch": ref_epoch, "epoch_steps": epoch, "params": spec.num_params()}


def run(quick: bool = False) -> str:
    one_thread()
    cases = [("tiny-dev", 8, 32, 2, 4)] if quick else [("tiny-dev", 32, 32, 4, 4), ("flux-mid", 16, 64, 2, 16)]
    rows, ratios = [], []
    for preset, n, size, batch, rank in cases:
        with tempfile.TemporaryDirectory() as d:
            r = measure(preset, n, size, batch, rank, Path(d))
        s, e = r["ref_step"] / r["ours_step"], r["ref_epoch"] / r["ours_epoch"]
        ratios += [s, e]
        rows.append([f"{preset} ({r['params'] / 1e6:.1f} M)", f"{n} imgs {size}px, batch {batch}, rank {rank}",
                     r["ours_step"], r["ref_step"], s, r["ours_epoch"], r["ref_epoch"], e])
    return "\n\n".join([
        "## a. LoRA train step: `dev2pro train-lora` vs a diffusers-example-style loop",
        "Same base (random init), LoRA rank/targets (attention, fp32), batch, images and fp32 compute; no compile. "
        "The reference encodes images and captions every step as the diffusers script does; ours caches them once. "
        "Toy encoders (cheap): on real Flux (VAE + T5-XXL per step) the reference's per-step cost is much higher. "
        "Goal: >= 1.3x per step and per epoch.",
        table(["model", "data", "ours s/step", "reference s/step", "speedup/step", "ours epoch s (cold)",
               "reference epoch s", "speedup/epoch"], rows),
        verdict(min(ratios) >= GOAL, f"worst speedup {min(ratios):.2f}x (per step and per epoch over "
                f"{len(cases)} sizes)."),
    ])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
