"""`dev2pro plan-memory`: estimate the peak GPU memory of a LoRA or de-distillation job and what fits 12/16/24/80 GB."""

from __future__ import annotations

import argparse

HELP = "estimate peak GPU memory of a training job and which settings fit 12/16/24/80 GB"
DESCRIPTION = """\
Estimate the peak GPU memory of a train-lora or dedistill job on Flux from its config (same TOML and key=value
overrides as the trainers) or from flags, with a breakdown: base weights by dtype (fp8 keeps norms, biases,
embedders and the final layer in bf16), LoRA parameters, gradients and AdamW state, activations with or without
gradient checkpointing, block swap, and encoders when latents are not cached. Then list the settings (bf16/fp8 base,
checkpointing, block swap) that fit 12, 16, 24 and 80 GB cards. The formulas are in dev2pro/train/memory_estimate.py
and are validated against measured peaks on a CPU (tests/test_plan_memory.py, docs/benchmarks.md).

examples:
  dev2pro plan-memory configs/lora-24gb.toml
  dev2pro plan-memory configs/lora-24gb.toml data.resolution=1024 lora.rank=32
  dev2pro plan-memory --preset flux-dev --rank 16 --resolution 1024 --dtype fp8 --gradient-checkpointing
  dev2pro plan-memory --preset flux-dev --method full --dtype bf16 --gradient-checkpointing --shards 8
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="train-lora or dedistill TOML (optional when --preset is given)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for the trainers")
    p.add_argument("--preset", help="model preset instead of model.base (flux-dev, flux-schnell, flux-mid, ...)")
    p.add_argument("--method", choices=["lora", "full"], help="LoRA or full fine-tune (default: lora, or full for a "
                   "config without [lora])")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    p.add_argument("--targets", choices=["attention", "all-linear"], help="LoRA targets (default attention)")
    p.add_argument("--resolution", type=int, help="image side in pixels, area = side^2 (default 512 with a config, "
                   "1024 with --preset)")
    p.add_argument("--batch-size", type=int, help="images per step (default 1)")
    p.add_argument("--text-len", type=int, help="T5 tokens (default 512 for dev, 256 for schnell)")
    p.add_argument("--dtype", choices=["bf16", "fp8", "fp32"], help="storage dtype of the base weights")
    p.add_argument("--no-autocast", action="store_true", help="compute in the weight dtype instead of bf16 autocast")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--blocks-to-swap", type=int, help="transformer blocks kept on the CPU (default 0)")
    p.add_argument("--no-cache", action="store_true", help="encoders stay in memory (latents/text not cached)")
    p.add_argument("--shards", type=int, help="FSDP shards of the full fine-tune state (GPUs; default 1)")


def main(args) -> int:
    from dev2pro.errors import UserError
    from dev2pro.train import plan_memory as pm

    if args.config and "=" in args.config and not args.config.endswith(".toml"):
        args.overrides.insert(0, args.config)
        args.config = None
    if args.config is None and args.preset is None:
        raise UserError("give a config file (train-lora/dedistill TOML) or --preset NAME")
    flags = dict(method=args.method, rank=args.rank, targets=args.targets, resolution=args.resolution,
                 batch_size=args.batch_size, text_len=args.text_len, weight_dtype=args.dtype,
                 gradient_checkpointing=args.gradient_checkpointing, blocks_to_swap=args.blocks_to_swap,
                 shards=args.shards)
    if args.no_autocast:
        flags["autocast"] = False
    if args.no_cache:
        flags["cached"] = False
    if args.preset:
        flags["spec"] = pm.get_spec(args.preset)
    if args.config is not None:
        data = load_recipe_toml(args.config, args.overrides)
    else:
        if args.overrides:
            raise UserError(f"overrides {args.overrides} need a config file")
        data = {"lora": {}} if args.method != "full" else {}
        data["data"] = {"resolution": 1024}
        data["model"] = {"base": args.preset, "dtype": "bf16"}
    job = pm.job_from_config(data, **flags)
    print(pm.report(job))
    return 0


def load_recipe_toml(path: str, overrides: list[str]) -> dict:
    """The config as a dict with overrides applied, checked against the recipe's own schema when it is known
    (train-lora for a file with [lora], dedistill otherwise): the same errors as the trainer would give."""
    import dataclasses
    import importlib

    from dev2pro.config import from_dict, parse_override, read_toml
    from dev2pro.errors import ConfigError

    raw = read_toml(path)
    module = "train_lora" if "lora" in raw else "dedistill"
    schema = None
    try:
        mod = importlib.import_module(f"dev2pro.train.recipes.{module}")
        schema = getattr(mod, "CONFIG", None) or next(
            (v for k, v in vars(mod).items() if k.endswith("Config") and dataclasses.is_dataclass(v)
             and {"model", "train", "output"} <= {f.name for f in dataclasses.fields(v)}), None)
    except ImportError:
        pass
    try:
        if schema is not None:
            return dataclasses.asdict(from_dict(schema, raw, overrides))
        for text in overrides:  # recipe not importable: apply overrides unchecked
            keys, value = parse_override(text)
            node = raw
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value
        return raw
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
