"""`dev2pro convert`: rewrite a Flux transformer checkpoint in another layout, dtype or fp8 scaling, streaming.

The work is `dev2pro.flux.convert.convert_checkpoint` (one tensor group in memory at a time); this module adds the
arguments, the model-output check and the printed summary. The output check loads the source and the result one after
the other in fp32 and compares their outputs on a fixed input; it runs automatically when one fp32 copy of the model
fits in a quarter of the available RAM and the model has at most 3B parameters (so the 12B models are skipped on
ordinary machines, with a note), and can be forced or skipped.
"""

from __future__ import annotations

HELP = "convert a Flux transformer checkpoint: BFL <-> diffusers, bf16/fp16/fp32, fp8 (plain, per-tensor, per-channel)"

DESCRIPTION = """\
Convert a Flux transformer checkpoint between layouts and dtypes, one tensor group at a time (a 24 GB model
converts on a machine with far less RAM).

IN may be a BFL/ComfyUI single file (with or without the model.diffusion_model. prefix), an fp8 file (plain or
ComfyUI scaled), a diffusers folder (single or sharded) or a pipeline folder with transformer/.
OUT is a .safetensors file (--format bfl, the default) or a folder (--format diffusers, sharded above 10 GB).

--dtype keeps each tensor's dtype by default. With --dtype fp8_e4m3fn only the linear weights inside the double and
single blocks become fp8 (>99% of the parameters); embedders, final layer, biases and norm scales stay in high
precision (see docs/formats.md). --scaling picks the fp8 layout:
  none     plain cast, the layout of the published fp8 reposts (most tools read it)
  tensor   one fp32 scale per weight: ComfyUI's "scaled fp8" (scaled_fp8 marker + scale_weight)
  channel  one fp32 scale per output row: dev2pro's own layout (read by dev2pro only)

The summary shows sizes, the relative RMS error of the stored weights per tensor type, and the relative RMS error of
the model output versus the source on a fixed input.

Examples:
  dev2pro convert dev2pro.safetensors dev2pro-fp8.safetensors --dtype fp8_e4m3fn --scaling tensor
  dev2pro convert flux1-dev.safetensors ./flux-dev-diffusers --format diffusers --dtype bf16
  dev2pro convert ./FLUX.1-dev/transformer flux1-dev.safetensors
"""

OUTPUT_CHECK_MAX_PARAMS = 3_000_000_000
OUTPUT_CHECK_RAM_FRACTION = 0.25


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="checkpoint file or folder (BFL, ComfyUI, fp8, diffusers)")
    parser.add_argument("output", metavar="OUT", help="output .safetensors file (bfl) or folder (diffusers)")
    parser.add_argument("--format", choices=["bfl", "diffusers"], default="bfl",
                        help="output layout (default: bfl single file)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8_e4m3fn"], default=None,
                        help="stored dtype (default: keep each tensor's dtype)")
    parser.add_argument("--scaling", choices=["none", "tensor", "channel"], default=None,
                        help="fp8 scaling (with --dtype fp8_e4m3fn; default: none, or the input's own for fp8 input)")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--no-output-check", dest="output_check", action="store_const", const="no", default="auto",
                       help="skip the model-output comparison")
    check.add_argument("--output-check", dest="output_check", action="store_const", const="yes",
                       help="run the model-output comparison even for large models")


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes), or total physical memory elsewhere."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def output_check_decision(num_params: int, mode: str) -> tuple[bool, str]:
    """(run?, note when skipped)."""
    if mode == "no":
        return False, "skipped (--no-output-check)"
    if mode == "yes":
        return True, ""
    need, ram = 4 * num_params, available_ram()
    if num_params > OUTPUT_CHECK_MAX_PARAMS or need > OUTPUT_CHECK_RAM_FRACTION * ram:
        return False, (f"skipped: {num_params / 1e9:.2f}B parameters (an fp32 copy is {need / 1e9:.1f} GB, "
                       f"{ram / 1e9:.1f} GB RAM available); use --output-check to force it")
    return True, ""


def main(args) -> int:
    from dev2pro.flux import convert, output_check

    summary = convert.convert_checkpoint(args.input, args.output, format=args.format, dtype=args.dtype,
                                         scaling=args.scaling, progress=True)
    run, note = output_check_decision(summary.spec.num_params(), args.output_check)
    if run:
        summary.output_rel_err = output_check.model_output_error(args.input, args.output)
        summary.output_note = "fp32 compute, 1 image of 8x8 latent, t=0.6"
    else:
        summary.output_note = note
    print(summary)
    return 0
