"""The toy world's positive and negative controls, and their measurement with intervals (`dev2pro toy controls`).

Why a module of its own: a gap of two adherences measured on the build's 256-caption evaluation has a sampling error
of about two points, so a control near its threshold (the dev guidance gap) needs a larger measurement with an
interval to say whether it holds. The build's controls stage and `dev2pro toy controls` both use this module.
`measure` scores any set of conditions on any number of fresh captions, one image at a time (per-image adherence,
cached per condition so an interrupted run resumes), and `intervals` gives each control's difference with a 95%
interval over captions: both conditions of a control are sampled on the same captions and seeds, so the difference
is paired per caption.

Conditions are named as in the build: `pro_cfg{c}` (true CFG c), `dev_g{g}` (embedded guidance g), `dead_dev_g{g}`
(dev with its guidance input held at g = 1, `build.dead_guidance`).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch

# name: (minuend, subtrahend, target, test on the difference in adherence points)
CHECKS = {
    "pro_cfg4_minus_cfg1": ("pro_cfg4", "pro_cfg1", ">= 15", lambda d: d >= 15),
    "dev_g3.5_minus_pro_cfg3.5": ("dev_g3.5", "pro_cfg3.5", "within +-3", lambda d: abs(d) <= 3),
    "dev_g3.5_minus_g1": ("dev_g3.5", "dev_g1", ">= 15", lambda d: d >= 15),
    "dead_dev_g3.5_minus_g1": ("dead_dev_g3.5", "dead_dev_g1", "about 0 (within +-3)", lambda d: abs(d) <= 3),
}
CONDITIONS = ("pro_cfg1", "pro_cfg3.5", "pro_cfg4", "dev_g1", "dev_g3.5", "dead_dev_g1", "dead_dev_g3.5")


def controls(evals: dict) -> dict:
    """The controls from mean adherences (`{condition: {"adherence": fraction}}`), in points, each with its target and
    whether it holds; controls whose conditions were not evaluated are left out."""
    a = {k: 100 * v["adherence"] for k, v in evals.items()}
    out = {}
    for name, (x, y, target, test) in CHECKS.items():
        if x in a and y in a:
            d = a[x] - a[y]
            out[name] = {"points": round(d, 2), "target": target, "holds": bool(test(d))}
    return out


def condition(name: str) -> tuple[str, dict, bool]:
    """(model "pro" or "dev", sampling keywords, dead guidance) of a condition name."""
    dead = name.startswith("dead_")
    base = name.removeprefix("dead_")
    if base.startswith("pro_cfg"):
        model, kw = "pro", {"cfg": float(base.removeprefix("pro_cfg"))}
    elif base.startswith("dev_g"):
        model, kw = "dev", {"guidance": float(base.removeprefix("dev_g"))}
    else:
        raise ValueError(f"unknown condition {name!r}: expected pro_cfg<c>, dev_g<g> or dead_dev_g<g>")
    if dead and model != "dev":
        raise ValueError(f"{name!r}: dead guidance applies to dev only")
    return model, kw, dead


@torch.no_grad()
def measure(models: dict, judge, names=CONDITIONS, *, n_prompts: int = 1024, seeds: int = 2, steps: int = 20,
            prompt_seed: int = 778, work: str | Path | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-image prompt adherence (n_prompts * seeds,), caption-major, of each condition in `names` on fresh generator
    captions of stream `prompt_seed`. `models` maps "pro" / "dev" to loaded transformers. With `work`, each condition
    is cached as `<work>/<name>.json` together with its settings; a cached file with other settings is a
    UserError (the CLI's one-line exit 2)."""
    from dev2pro.errors import UserError
    from dev2pro.flux import sampling
    from dev2pro.toy import world
    from dev2pro.toy.build import dead_guidance

    settings = {"n_prompts": n_prompts, "seeds": seeds, "steps": steps, "prompt_seed": prompt_seed}
    _, captions, _ = world.make_batch(n_prompts, seed=prompt_seed)
    caps = [c for c in captions for _ in range(seeds)]
    ae, text = world.ToyAutoencoder(), world.ToyTextEncoder()
    out = {}
    for name in names:
        which, kw, dead = condition(name)
        path = Path(work) / f"{name}.json" if work is not None else None
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") != settings:
                raise UserError(f"{path} was measured with {saved.get('settings')}, not {settings}: use another "
                                 "work folder or delete it")
            out[name] = torch.tensor(saved["adherence"], dtype=torch.float64)
            continue
        model = models[which]
        with dead_guidance(model) if dead else nullcontext():
            images = sampling.generate(model, ae, text, captions, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE,
                                       steps=steps, seeds=range(seeds), batch_size=128, progress=progress, **kw)
        out[name] = judge.score(images, caps)["adherence"].double()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings, "adherence": out[name].tolist()}) + "\n")
    return out


def paired_interval(a: torch.Tensor, b: torch.Tensor, seeds: int) -> tuple[float, float, float]:
    """Mean of a - b in points with a 95% normal interval over captions: the per-image differences are averaged over
    each caption's `seeds` images first, so images of one caption count once."""
    d = (100 * (a - b)).reshape(-1, seeds).mean(1)
    n = d.numel()
    mean = float(d.mean())
    half = 1.96 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return mean, mean - half, mean + half


def intervals(per_image: dict[str, torch.Tensor], seeds: int) -> dict:
    """Each control whose two conditions were measured: difference in points, its 95% interval, target, and whether
    the point value holds (the same rule as `controls`)."""
    out = {}
    for name, (x, y, target, test) in CHECKS.items():
        if x in per_image and y in per_image:
            mean, lo, hi = paired_interval(per_image[x], per_image[y], seeds)
            out[name] = {"points": round(mean, 2), "interval": [round(lo, 2), round(hi, 2)], "target": target,
                         "holds": bool(test(mean))}
    return out
