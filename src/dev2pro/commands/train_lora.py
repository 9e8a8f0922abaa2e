"""`dev2pro train-lora CONFIG.toml [key=value ...] [--resume]`: train a Flux LoRA on a frozen base."""

from __future__ import annotations

HELP = "train a LoRA on a frozen Flux base (bf16 or fp8) at a fixed guidance input; kohya or diffusers output"

DESCRIPTION = """\
Train a LoRA on the images and .txt captions in data.dir with the flow-matching loss, the base model (model.base:
the dev2pro fp8 file, any BFL/ComfyUI/diffusers checkpoint, or preset:NAME@SEED) frozen, the guidance input fixed at
train.guidance (1.0 on a de-distilled base). Latents and text embeddings are cached first; the encoders are freed
before training. Overrides are dotted key=value pairs, checked against the config schema.

Output in output.dir: <output.name>.safetensors (output.format = kohya for ComfyUI/Forge, or diffusers), checkpoints
checkpoint-<step> every output.save_every steps (resume exactly with --resume), log.csv and TensorBoard logs (tb/),
sample grids (samples/) every sample.every steps, monitor.csv with monitor.every.

Examples:
  dev2pro train-lora configs/tiny-cpu.toml data.dir=./toy_images output.dir=runs/tiny
  dev2pro train-lora configs/lora-24gb.toml data.dir=./my_images output.dir=runs/my_lora train.steps=2000
  dev2pro train-lora configs/lora-24gb.toml output.dir=runs/my_lora --resume
"""


def add_arguments(parser) -> None:
    parser.add_argument("config", help="recipe config (TOML); see configs/lora-24gb.toml, configs/tiny-cpu.toml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 data.dir=./images")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")


def main(args) -> int:
    from dev2pro.config import load_config
    from dev2pro.train.recipes import train_lora

    cfg = load_config(train_lora.TrainLoraConfig, args.config, args.overrides)
    path = train_lora.run(cfg, resume=args.resume)
    print(f"saved {path}")
    return 0
