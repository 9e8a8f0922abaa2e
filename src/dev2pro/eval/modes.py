"""The six ways the demo trains one style LoRA (same data, rank, steps and training seeds), as data, and the
`train-lora` config each one becomes. The field's answers to the distillation problem (docs/evaluation.md):

    a  dev at g = 3.5, plain flow loss              kohya sd-scripts' and the diffusers example's default
    b  dev at g = 1.0, plain flow loss              SimpleTuner's, ai-toolkit's, OneTrainer's default
    c  dev2pro at g = 1.0, plain flow loss          the dev2pro recipe
    d  dev with a guidance-preserving loss, s = 3.5 ai-toolkit's "guidance loss" (`train.guidance_loss`)
    e  dev + the de-distill adapter, g = 1.0        `lora extract dev dev2pro` as `model.adapter`
    f  pro (the undistilled teacher), no guidance   the upper bound that dev2pro approximates

Pitfall: mode d needs `train.guidance_loss` in the train-lora recipe; `supports_guidance_loss` reads the recipe's
config schema, and the demo leaves d out (saying so) where it is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    role: str  # "a" .. "f": the role in the claims (dev2pro.eval.claims.six_way_claims)
    key: str  # group name in the comparison, folder names
    label: str  # "trained on ..." in tables
    base: str  # the model trained on: "dev", "dev2pro" or "pro"
    guidance: float = 1.0  # train.guidance (ignored by pro, which has no guidance input)
    guidance_loss: float = 0.0  # train.guidance_loss (0: the plain flow loss)
    adapter: bool = False  # train with the de-distill adapter (dev2pro - dev as a LoRA) attached


MODES: tuple[Mode, ...] = (
    Mode("a", "dev-g3.5", "dev (g=3.5)", "dev", 3.5),
    Mode("b", "dev-g1", "dev (g=1.0)", "dev", 1.0),
    Mode("c", "dev2pro-g1", "dev2pro (g=1.0)", "dev2pro", 1.0),
    Mode("d", "dev-gloss3.5", "dev, guidance loss (s=3.5)", "dev", 3.5, guidance_loss=3.5),
    Mode("e", "dev-adapter-g1", "dev + de-distill adapter (g=1.0)", "dev", 1.0, adapter=True),
    Mode("f", "pro", "pro (teacher, no guidance input)", "pro"),
)
MODE = {m.key: m for m in MODES}
CLAIM = ("dev2pro-g1", "dev")  # the article's claimed best cell: trained on dev2pro, applied to dev


def recipe_config_class(name: str):
    """The config dataclass a recipe's `run(cfg, ...)` takes (read from its annotation, so the demo follows the
    recipe's schema instead of restating its class name)."""
    module = importlib.import_module(f"dev2pro.train.recipes.{name}")
    return typing.get_type_hints(module.run)["cfg"]


def supports_guidance_loss() -> bool:
    """Whether train-lora's `[train]` section has `guidance_loss` (mode d)."""
    train_cls = typing.get_type_hints(recipe_config_class("train_lora"))["train"]
    return any(f.name == "guidance_loss" for f in dataclasses.fields(train_cls))


def run_name(mode: Mode, seed: int) -> str:
    return f"{mode.key}-s{seed}"


def lora_config(mode: Mode, seed: int, *, refs: dict[str, str], adapter: str | None, plan, data_dir: str,
                out_dir: str) -> dict:
    """The train-lora config (as a dict, validated by the recipe's schema) of one training run of `mode`. `refs`:
    model references of "dev", "dev2pro" and "pro"; `plan`: the demo's `DemoPlan`."""
    from dev2pro.toy.world import IMAGE_SIZE

    train = {"steps": plan.lora_steps, "guidance": mode.guidance, "seed": seed, "batch_size": plan.batch_size,
             "lr": plan.lora_lr, "device": "cpu", "log_every": 10}
    if mode.guidance_loss:
        train["guidance_loss"] = mode.guidance_loss
    model = {"base": refs[mode.base], "t5": "toy", "clip": "toy", "autoencoder": "toy", "dtype": "fp32"}
    if mode.adapter:
        if adapter is None:
            raise ValueError(f"mode {mode.key} needs the de-distill adapter")
        model["adapter"] = adapter
    return {
        "model": model,
        "train": train,
        "lora": {"rank": plan.lora_rank, "alpha": float(plan.lora_rank), "targets": plan.lora_targets},
        "data": {"dir": data_dir, "resolution": IMAGE_SIZE},
        "output": {"dir": out_dir, "name": f"style-{run_name(mode, seed)}", "save_every": plan.save_every(),
                   "keep_last": plan.keep_last()},
    }
