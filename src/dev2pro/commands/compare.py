"""`dev2pro compare CONFIG.toml [key=value ...]`: the trained-on x applied-to evaluation (see dev2pro.eval.compare)."""

from __future__ import annotations

HELP = "evaluate LoRAs x bases: 2x2 table, guidance sweep, step curves, image grid, report.md"

DESCRIPTION = """\
Apply every LoRA to every base, sample the evaluation prompts over several seeds, score the images and write
report.md, results.json, grid.png and plots to output.dir.

Each base samples in its own mode: mode = "embedded" (dev-like: guidance goes into the guidance embedding) or
mode = "cfg" (de-distilled: true CFG with the negative prompt). Each LoRA carries a "trained on" label and may list
intermediate checkpoints (checkpoint-<step>) for metric-vs-step curves. Metrics (with the toy judge): style fidelity,
prompt adherence, their product, Frechet distance to reference style images, diversity; mean and 95% interval.

Examples:
  dev2pro compare configs/compare-example.toml
  dev2pro compare runs/demo/compare.toml sampling.seeds=[0,1,2,3,4,5,6,7] output.dir=runs/demo-8seeds
"""


def add_arguments(parser) -> None:
    parser.add_argument("config", help="compare config (TOML); see configs/compare-example.toml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.steps=10 output.dir=runs/x")


def main(args) -> int:
    from pathlib import Path

    import torch

    from dev2pro.eval.compare import run_compare
    from dev2pro.eval.plan import load_compare_config
    from dev2pro.eval.toolkit import idle_cpu_threads

    cfg = load_compare_config(args.config, args.overrides)
    if cfg.models.device == "cpu" or (cfg.models.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(idle_cpu_threads())  # small CPU models: threads on busy cores cost many times over
    # Relative paths in the config resolve against the working directory, like every other command.
    res = run_compare(cfg)
    out = Path(cfg.output.dir)
    print(res.table())
    if res.verdict:
        print()
        print(res.verdict["text"].replace("**", ""))
    print(f"\nreport: {out / 'report.md'}")
    return 0
