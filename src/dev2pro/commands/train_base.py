"""`dev2pro train-base CONFIG.toml [key=value ...] [--resume]`: plain full training with caption dropout."""

from __future__ import annotations

HELP = "train a Flux transformer from scratch or continue one, with caption dropout for CFG (e.g. the toy teacher)"

DESCRIPTION = """\
Full training of every weight with the flow-matching loss. With probability base.caption_dropout a caption is
replaced by the empty prompt, so the model can be sampled with classifier-free guidance. model.base may be a
checkpoint (continue training) or `preset:NAME@SEED` (a seeded random init of a preset architecture).
Checkpoints `checkpoint-<step>` go to output.dir every output.save_every steps; the final model is a BFL single file
output.dir/<output.name>.safetensors.

Examples:
  dev2pro train-base configs/train-base.toml data.dir=./images output.dir=runs/base
  dev2pro train-base configs/train-base.toml output.dir=runs/base --resume
  torchrun --nproc_per_node 2 -m dev2pro.cli train-base configs/train-base.toml distributed.strategy=fsdp2
"""


def add_arguments(parser) -> None:
    parser.add_argument("config", help="recipe config (TOML); see configs/train-base.toml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 data.dir=./images")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")


def main(args) -> int:
    from dev2pro.config import load_config
    from dev2pro.train.recipes import train_base

    cfg = load_config(train_base.TrainBaseConfig, args.config, args.overrides)
    path = train_base.run(cfg, resume=args.resume)
    print(f"saved {path}")
    return 0
