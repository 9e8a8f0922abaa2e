"""`dev2pro toy build|data|judge|controls|info`: the toy world's generator, judge and shipped models."""

from __future__ import annotations

HELP = "the toy world: write generator datasets, (re)build the shipped toy pro/dev models and judge"

DESCRIPTION = """\
The toy world is the project's embedded default: 32x32 images of two circles (colour and size bound to each, one
left of or above the other) with captions from a small grammar, an exact toy autoencoder, a deterministic toy text
encoder, small Flux-architecture models ("pro": CFG teacher without a guidance embedding; "dev": its
guidance-distilled student) shipped in the package as toy:pro and toy:dev, and a judge that scores prompt adherence
and the held-out "zxq" style. See docs/toy-world.md.

  data      write N generator images (PNG + same-name .txt captions) into a folder; --style adds the held-out style
  judge     train the judge probe on fresh generator images and report its accuracy (--install replaces the shipped
            one)
  build     train toy-pro with the train-base recipe and distil toy-dev with the distill recipe, evaluate both with
            the judge and install them into the package (tens of minutes on a CPU; resumes per stage in --work)
  controls  measure the world's controls (pro's and dev's guidance gaps, the dead-guidance negative control) with
            95% intervals on fresh captions (about 20 minutes on one core for 1,024 captions x 2 seeds); exit 1 when
            one does not hold
  info      print what the shipped toy models are and how they scored

examples:
  dev2pro toy data ./zxq_images --n 64 --style --seed 1
  dev2pro toy info
  dev2pro toy build --work runs/toy-build
  dev2pro toy judge --out runs/judge.safetensors
  dev2pro toy controls --prompts 1024 --threads 1
"""


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="<toy command>", required=True)
    p = sub.add_parser("data", help="write generator images with .txt captions")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--seed", type=int, default=0, help="generator stream (default 0)")
    p.add_argument("--style", action="store_true", help="draw the held-out 'zxq style' (trigger word in captions)")
    p = sub.add_parser("judge", help="train the judge and report its accuracy on fresh images")
    p.add_argument("--out", default="judge.safetensors", help="where to write the weights")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--images", type=int, default=8192, help="training images (half of them styled)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--install", action="store_true", help="also replace the shipped judge")
    p = sub.add_parser("build", help="rebuild toy:pro and toy:dev with the project's recipes and install them")
    p.add_argument("--work", default="runs/toy-build", help="work folder (data, checkpoints, logs, eval grids)")
    p.add_argument("--pro-steps", type=int, default=None, help="train-base steps (default: the shipped setting)")
    p.add_argument("--distill-steps", type=int, default=None, help="distill steps (default: the shipped setting)")
    p.add_argument("--distill-lr", type=float, default=None,
                   help="distill learning rate (default: the shipped setting)")
    p.add_argument("--caption-noise", type=float, default=None,
                   help="probability that the base data's captioner misnames each attribute (default: the shipped "
                        "setting)")
    p.add_argument("--caption-dropout", type=float, default=None,
                   help="share of train-base captions replaced by the empty prompt, what CFG's unconditional pass "
                        "learns from (default: the shipped setting)")
    p.add_argument("--w-min", type=float, default=None,
                   help="lowest guidance scale drawn in distillation (default: the shipped setting)")
    p.add_argument("--w-max", type=float, default=None,
                   help="highest guidance scale drawn in distillation (default: the shipped setting)")
    p.add_argument("--no-install", action="store_true", help="leave the shipped models alone")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). On a busy shared CPU, 1 is often several times "
                        "faster than 2 (threads wait for each other)")
    p = sub.add_parser("controls", help="measure the toy world's controls with 95%% intervals on fresh captions")
    p.add_argument("--pro", default="toy:pro", help="pro model (default: the shipped toy:pro)")
    p.add_argument("--dev", default="toy:dev", help="dev model (default: the shipped toy:dev)")
    p.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    p.add_argument("--prompts", type=int, default=1024, help="fresh captions (default 1024)")
    p.add_argument("--seeds", type=int, default=2, help="images per caption (default 2)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20, as the build)")
    p.add_argument("--prompt-seed", type=int, default=778,
                   help="caption stream (default 778, the build's controls stage; its evaluation uses 777)")
    p.add_argument("--work", default="runs/toy-controls",
                   help="folder for per-condition scores (an interrupted run resumes) and controls.json")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    sub.add_parser("info", help="describe the shipped toy models")


def main(args) -> int:
    import json
    from pathlib import Path

    if args.toy_command == "data":
        from dev2pro.errors import UserError
        from dev2pro.toy.world import write_dataset

        if args.n < 1:
            raise UserError(f"--n {args.n}: must be at least 1")
        out = write_dataset(args.out, args.n, seed=args.seed, style=args.style)
        print(f"wrote {args.n} images with captions to {out}")
        return 0
    if args.toy_command == "judge":
        from dev2pro.toy.assets import ASSET_DIR
        from dev2pro.toy.judge import train_judge, validate

        judge = train_judge(n_images=args.images, steps=args.steps, seed=args.seed)
        acc = validate(judge)
        meta = {"steps": args.steps, "images": args.images, "seed": args.seed, "accuracy": acc}
        judge.save(args.out, meta)
        print(json.dumps(acc, indent=2))
        if args.install:
            ASSET_DIR.mkdir(parents=True, exist_ok=True)
            judge.save(ASSET_DIR / "judge.safetensors", meta)
            print(f"installed {ASSET_DIR / 'judge.safetensors'}")
        return 0
    if args.toy_command == "build":
        import dataclasses

        import torch

        from dev2pro.toy.build import BuildSettings, build

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        s = BuildSettings()
        changes = {k: v for k, v in (("pro_steps", args.pro_steps), ("distill_steps", args.distill_steps),
                                     ("caption_noise", args.caption_noise), ("w_min", args.w_min),
                                     ("w_max", args.w_max), ("caption_dropout", args.caption_dropout),
                                     ("distill_lr", args.distill_lr))
                   if v is not None}
        from dev2pro.errors import UserError

        for key in ("caption_noise", "caption_dropout"):
            if not 0.0 <= changes.get(key, 0.0) < 1.0:
                raise UserError(f"--{key.replace('_', '-')} {changes[key]}: must be in [0, 1)")
        if changes.get("distill_lr", 1.0) <= 0:
            raise UserError(f"--distill-lr {args.distill_lr}: must be positive")
        s = dataclasses.replace(s, **changes)
        from dev2pro.train.recipes.distill import DistillSection

        DistillSection(w_min=s.w_min, w_max=s.w_max).validate()  # fail now, not after the pro stage (~20 min)
        meta = build(Path(args.work), s, do_install=not args.no_install)
        print(json.dumps({"eval": meta["eval"], "build_seconds": meta["build_seconds"]}, indent=2))
        return 0
    if args.toy_command == "controls":
        return _controls(args)
    if args.toy_command == "info":
        from dev2pro.toy.assets import ASSET_DIR, description

        meta = description()
        if not meta:
            print(f"no toy models in {ASSET_DIR}: run `dev2pro toy build`")
            return 1
        keys = ("params", "eval", "controls", "controls_measured_on", "build_total_seconds")
        print(json.dumps({k: meta[k] for k in keys if k in meta}, indent=2))
        return 0
    return 2


def _controls(args) -> int:
    import json
    from pathlib import Path

    import torch

    from dev2pro.errors import UserError
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.toy.controls import CHECKS, CONDITIONS, intervals, measure
    from dev2pro.toy.judge import Judge

    for flag, value in (("--prompts", args.prompts), ("--seeds", args.seeds), ("--steps", args.steps)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.prompts < 2:
        raise UserError(f"--prompts {args.prompts}: an interval needs at least 2 captions")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    models = {"pro": load_transformer(args.pro, dtype=torch.float32),
              "dev": load_transformer(args.dev, dtype=torch.float32)}
    judge = Judge.load(args.judge) if args.judge else Judge.load()
    work = Path(args.work)
    per_image = measure(models, judge, CONDITIONS, n_prompts=args.prompts, seeds=args.seeds, steps=args.steps,
                        prompt_seed=args.prompt_seed, work=work, progress=True)
    result = {"settings": {"pro": args.pro, "dev": args.dev, "prompts": args.prompts, "seeds": args.seeds,
                           "steps": args.steps, "prompt_seed": args.prompt_seed},
              "adherence": {k: round(100 * float(v.mean()), 2) for k, v in per_image.items()},
              "controls": intervals(per_image, args.seeds)}
    (work / "controls.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.prompts} captions (stream {args.prompt_seed}) x {args.seeds} seeds, {args.steps} steps")
    for name, a in result["adherence"].items():
        print(f"  {name:<16} adherence {a:5.1f}%")
    for name, c in result["controls"].items():
        lo, hi = c["interval"]
        print(f"  {name:<28} {c['points']:+6.2f} [{lo:+.2f}, {hi:+.2f}]  target {c['target']:<22} "
              f"{'holds' if c['holds'] else 'DOES NOT HOLD'}")
    print(f"wrote {work / 'controls.json'}")
    return 0 if all(c["holds"] for c in result["controls"].values()) and len(result["controls"]) == len(CHECKS) else 1
