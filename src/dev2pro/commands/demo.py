"""`dev2pro demo [--out runs/demo] [--full] [--steps-scale X]`: six ways to train a LoRA on the toy world
(dev2pro.eval.demo)."""

from __future__ import annotations

HELP = "train one style LoRA six ways on the toy world (CPU) and check the claims with intervals over training runs"

DESCRIPTION = """\
De-distill the shipped toy dev model into toy dev2pro and extract the difference as a de-distill adapter, then train
one style LoRA six ways, several training seeds each: (a) on dev at guidance 3.5, (b) on dev at 1.0, (c) on dev2pro
at 1.0 (the recipe), (d) on dev with the guidance-preserving loss, (e) on dev + the adapter, (f) on pro (the upper
bound). Apply each run to dev (embedded guidance) and dev2pro (true CFG), follow the metrics and the guidance response
over training steps, and write <out>/report.md with tables, curves, image grid and verdicts on three claims:
(i) training on dev at 3.5 erodes guidance, (ii) trained on dev2pro, applied to dev is best, (iii) how the
alternatives compare with dev2pro and how close it comes to pro. The default run is a cut-down version (under 10
minutes on a 2-core CPU); --full runs the whole experiment (about an hour). Every stage's config is saved in
<out>/configs/ and can be re-run with the matching command.

Examples:
  dev2pro demo
  dev2pro demo --full --out runs/demo-full --docs docs --readme README.md
  dev2pro demo --steps-scale 0.05 --out /tmp/demo-smoke      # a quick smoke run (results meaningless)
"""


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--full", action="store_true", help="the whole experiment: more seeds, steps, prompts")
    parser.add_argument("--steps-scale", type=float, default=1.0, metavar="X",
                        help="multiply every training step count by X (default 1.0)")
    parser.add_argument("--dev", default="toy:dev", metavar="REF",
                        help="the dev-like base (default toy:dev, the shipped toy model)")
    parser.add_argument("--pro", default="toy:pro", metavar="REF",
                        help="the undistilled teacher, mode f (default toy:pro, the shipped toy model)")
    parser.add_argument("--docs", metavar="DIR",
                        help="also write DIR/demo-results.md and DIR/img/demo-*.png")
    parser.add_argument("--readme", metavar="FILE",
                        help="also replace FILE's section between <!-- DEMO-RESULTS --> markers with a summary")
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
    res = run_demo(args.out, plan, full=args.full, dev=args.dev, pro=args.pro)
    print()
    print(res.table())
    for c in res.claims:
        print()
        print(c["text"].replace("**", ""))
    print(f"\nreport: {args.out}/report.md  ({res.total_seconds:.0f} s in all)")
    cmd = "dev2pro demo" + (" --full" if args.full else "") + (
        f" --steps-scale {args.steps_scale:g}" if args.steps_scale != 1.0 else "")
    if args.docs:
        from dev2pro.eval.demo_report import write_results_doc

        print(f"docs: {write_results_doc(res, args.docs, cmd)}")
    if args.readme:
        import os
        from pathlib import Path

        from dev2pro.eval.demo_report import readme_summary, update_readme

        doc = Path(args.docs or "docs") / "demo-results.md"  # linked relative to the README's folder
        link = Path(os.path.relpath(doc.resolve(), Path(args.readme).resolve().parent)).as_posix()
        print(f"readme: {update_readme(args.readme, readme_summary(res, link))}")
    return 0
