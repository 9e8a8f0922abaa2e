"""`dev2pro distill CONFIG.toml [key=value ...] [--resume]`: guidance distillation (Meng et al. 2023)."""

from __future__ import annotations

HELP = "guidance distillation: a student with a guidance input learns a frozen teacher's CFG output (pro -> dev)"

DESCRIPTION = """\
The student starts as a copy of the teacher (distill.teacher) plus a new guidance embedding whose output layer is
zero-initialised, so at step 0 it predicts exactly what the teacher does. Each sample draws a guidance scale
w ~ U[distill.w_min, distill.w_max]; the student at guidance w regresses the teacher's classifier-free-guided
prediction v_u + w (v_c - v_u) (v_u: the empty prompt), plus distill.flow_weight x the plain flow loss.
The teacher may be held in fp8 (distill.teacher_fp8) to save memory. The final student is a BFL single file
output.dir/<output.name>.safetensors.

Examples:
  dev2pro distill configs/distill.toml data.dir=./images output.dir=runs/distill
  dev2pro distill configs/distill.toml output.dir=runs/distill --resume
"""


def add_arguments(parser) -> None:
    parser.add_argument("config", help="recipe config (TOML); see configs/distill.toml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.w_max=5 train.steps=1000")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")


def main(args) -> int:
    from dev2pro.config import load_config
    from dev2pro.train.recipes import distill

    cfg = load_config(distill.DistillRecipeConfig, args.config, args.overrides)
    path = distill.run(cfg, resume=args.resume)
    print(f"saved {path}")
    return 0
