"""`dev2pro dedistill CONFIG.toml [key=value ...] [--resume]`: de-distill a guidance-distilled Flux (dev -> dev2pro)."""

from __future__ import annotations

HELP = "de-distill FLUX.1-dev into a guidance-1.0 training base: full fine-tune, guidance input fixed, plain flow loss"

DESCRIPTION = """\
Fine-tune every weight of a guidance-distilled model (model.base, e.g. flux1-dev.safetensors) with the plain
flow-matching loss while its guidance input is held at train.guidance (1.0). Optional EMA ([ema] enabled = true; the
EMA weights are exported), gradient checkpointing, bf16 autocast, several GPUs with DDP or FSDP2
([distributed] strategy). Checkpoints checkpoint-<step> every output.save_every steps; --resume continues exactly.
The result is a BFL single file output.dir/<output.name>.safetensors (output.dtype bf16, or fp8_e4m3fn with
output.scaling); `dev2pro convert` makes an fp8 copy later too.

Examples:
  dev2pro dedistill configs/dedistill.toml data.dir=./images output.dir=runs/dev2pro
  accelerate launch --num_processes 8 -m dev2pro.cli dedistill configs/dedistill.toml distributed.strategy=fsdp2
  dev2pro dedistill configs/dedistill.toml output.dir=runs/dev2pro --resume
"""


def add_arguments(parser) -> None:
    parser.add_argument("config", help="recipe config (TOML); see configs/dedistill.toml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 data.dir=./images")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")


def main(args) -> int:
    from dev2pro.config import load_config
    from dev2pro.train.recipes import dedistill

    cfg = load_config(dedistill.DedistillConfig, args.config, args.overrides)
    path = dedistill.run(cfg, resume=args.resume)
    print(f"saved {path}")
    return 0
