"""`dev2pro demo [--out runs/demo] [--full] [--steps-scale X]`: the recipe on the toy world (dev2pro.eval.demo)."""

from __future__ import annotations

HELP = "run the whole recipe on the toy world on a CPU in minutes and report the 2x2 verdict"

DESCRIPTION = """\
De-distill the shipped toy dev model into toy dev2pro, train a style LoRA three ways (on dev at guidance 3.5, on
dev at 1.0, on dev2pro at 1.0), apply each to dev (embedded guidance) and to dev2pro (true CFG), and write
<out>/report.md with the table, image grid, guidance sweep, metric-vs-step curves and whether "trained on dev2pro,
applied to dev" came out best. Under 10 minutes on a 2-core CPU; --full runs longer with more prompts and seeds.
Every stage's config is saved in <out>/configs/ and can be re-run with the matching command.

Examples:
  dev2pro demo
  dev2pro demo --full --out runs/demo-full
  dev2pro demo --steps-scale 0.05 --out /tmp/demo-smoke      # a quick smoke run (results meaningless)
"""


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--full", action="store_true", help="longer training, more prompts and seeds")
    parser.add_argument("--steps-scale", type=float, default=1.0, metavar="X",
                        help="multiply every training step count by X (default 1.0)")
    parser.add_argument("--dev", default="toy:dev", metavar="REF",
                        help="the dev-like base (default toy:dev, the shipped toy model)")
    parser.add_argument("--docs", metavar="DIR",
                        help="also write DIR/demo-results.md and DIR/img/demo-*.png (the README's demo section)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="torch CPU threads (default: the idle cores, from the load average; at least 1)")


def main(args) -> int:
    import torch

    from dev2pro.errors import UserError
    from dev2pro.eval.demo import DemoPlan, run_demo
    from dev2pro.eval.toolkit import idle_cpu_threads

    if args.steps_scale <= 0:
        raise UserError(f"--steps-scale must be > 0, got {args.steps_scale}")
    torch.set_num_threads(args.threads or idle_cpu_threads())  # the toy models are small: see idle_cpu_threads
    plan = (DemoPlan.full() if args.full else DemoPlan.quick()).scaled(args.steps_scale)
    res = run_demo(args.out, plan, full=args.full, dev=args.dev)
    print()
    print(res.table())
    if res.verdict:
        print()
        print(res.verdict["text"].replace("**", ""))
    print(f"\nreport: {args.out}/report.md  ({res.total_seconds:.0f} s in all)")
    if args.docs:
        from dev2pro.eval.demo import write_results_doc

        cmd = "dev2pro demo" + (" --full" if args.full else "") + (
            f" --steps-scale {args.steps_scale:g}" if args.steps_scale != 1.0 else "")
        print(f"docs: {write_results_doc(res, args.docs, cmd)}")
    return 0
