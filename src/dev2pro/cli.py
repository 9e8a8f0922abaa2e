"""The `dev2pro` command line: one entry point, one module per subcommand.

Each subcommand lives in `dev2pro.commands.<module>` and exposes `HELP` (one line for the overview),
`DESCRIPTION` (the subcommand's --help text), `add_arguments(parser)` and `main(args) -> int | None`. Heavy imports
(torch, diffusers) happen inside `main`, so `dev2pro --help` is instant. Only this module reads argv and the
environment. `UserError`s print as one line on stderr with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module under dev2pro.commands). Order is the order shown in --help.
COMMANDS: list[tuple[str, str]] = [
    ("inspect", "inspect_cmd"),
    ("convert", "convert"),
    ("train-lora", "train_lora"),
    ("dedistill", "dedistill"),
    ("distill", "distill"),
    ("train-base", "train_base"),
    ("cache", "cache"),
    ("sample", "sample"),
    ("lora", "lora"),
    ("compare", "compare"),
    ("toy", "toy"),
    ("demo", "demo"),
    ("plan-memory", "plan_memory"),
]

EPILOG = """\
The recipe, in commands:
  dev2pro dedistill dedistill.toml           # FLUX.1-dev -> dev2pro (guidance fixed at 1.0)
  dev2pro convert dev2pro.safetensors dev2pro-fp8.safetensors --dtype fp8_e4m3fn --scaling channel
  dev2pro train-lora configs/lora-24gb.toml data.dir=./my_images output.dir=./runs/my_lora
  dev2pro sample --base flux1-dev.safetensors --lora runs/my_lora/my_lora.safetensors:1.0 "a photo of ..."
  dev2pro demo                               # the whole recipe on the toy world, on a CPU, in minutes

Run `dev2pro <command> --help` for each command's options.
"""


def _load(module: str):
    return importlib.import_module(f"dev2pro.commands.{module}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dev2pro",
        description="Train FLUX.1 LoRAs that don't break: de-distill dev into a guidance-1.0 base, store it in fp8, "
        "train LoRAs on it, apply them to dev.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module in COMMANDS:
        try:
            mod = _load(module)
        except ModuleNotFoundError as e:  # a subcommand still being written; tests assert all are present
            if e.name != f"dev2pro.commands.{module}":
                raise
            continue
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from dev2pro import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    import warnings

    from dev2pro.errors import UserError

    # torch's CPU rms_norm warns on every bf16-autocast run that it cannot use its fused kernel: noise for users.
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    try:
        code = args._module.main(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"dev2pro {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Files and folders the user named: unreadable, unwritable, missing parents, full disks. One line, exit 2.
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"dev2pro {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dev2pro {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
