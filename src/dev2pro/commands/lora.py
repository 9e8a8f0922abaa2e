"""`dev2pro lora convert|merge|extract|resize|inspect`: the LoRA toolbox (formats in docs/lora-formats.md)."""

from __future__ import annotations

HELP = "LoRA toolbox: convert kohya/diffusers/ComfyUI/XLabs files, merge into a base, extract, resize, inspect"

DESCRIPTION = """\
Work with Flux LoRA files. Reads kohya (lora_unet_*, what ComfyUI and Forge load), diffusers/peft
(transformer.*.lora_A/B: ai-toolkit, SimpleTuner), ComfyUI (diffusion_model.*) and XLabs (*.processor.*) files;
writes kohya or diffusers. Fused BFL layers (qkv, single-block linear1) are split and fused exactly, including kohya's
block-diagonal "split qkv" layout. See docs/lora-formats.md.

  convert IN OUT --to kohya|diffusers      change the file format (exact round trip kohya <-> diffusers)
  merge BASE OUT LORA[:strength] ...       bake LoRAs into a checkpoint, streamed tensor by tensor; an fp8 base is
                                           re-quantized (--scaling), the output keeps the base's dtypes unless --dtype
  extract A B OUT --rank R | --energy F    LoRA approximating B - A per layer (randomized SVD); prints the captured
                                           energy per layer and overall
  resize IN OUT --rank R                   lower a LoRA's rank by truncated SVD of each layer's B @ A
  inspect FILE                             format, ranks, alphas, covered layers, metadata

examples:
  dev2pro lora convert my_lora_diffusers.safetensors my_lora_comfy.safetensors --to kohya
  dev2pro lora merge flux1-dev.safetensors dev_with_style.safetensors style.safetensors:0.8 detail.safetensors:0.5
  dev2pro lora merge dev2pro-fp8.safetensors merged-fp8.safetensors style.safetensors --scaling channel
  dev2pro lora extract flux1-dev.safetensors dev2pro.safetensors dedistill_adapter.safetensors --rank 64
  dev2pro lora extract flux1-dev.safetensors dev2pro.safetensors adapter.safetensors --energy 0.9 --max-rank 128
  dev2pro lora resize style_r64.safetensors style_r16.safetensors --rank 16
  dev2pro lora inspect style.safetensors
"""

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="lora_command", metavar="<lora command>", required=True)

    p = sub.add_parser("convert", help="convert a LoRA file to kohya or diffusers keys")
    p.add_argument("input", metavar="IN", help="LoRA .safetensors (kohya, diffusers/peft, ComfyUI or XLabs)")
    p.add_argument("output", metavar="OUT", help="output .safetensors")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="output format")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="stored dtype of the factors (default fp32)")

    p = sub.add_parser("merge", help="merge LoRAs into a base checkpoint (streamed)")
    p.add_argument("base", metavar="BASE", help="checkpoint: BFL/ComfyUI/fp8 .safetensors or diffusers folder")
    p.add_argument("output", metavar="OUT", help="output .safetensors (BFL) or folder (--format diffusers)")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]", help="LoRA files, strength 1.0 by default")
    p.add_argument("--format", choices=("bfl", "diffusers"), default=None, help="output layout (default: the base's)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "fp8_e4m3fn"), default=None,
                   help="output dtype (default: keep the base's; fp8 applies to block linears)")
    p.add_argument("--scaling", choices=("none", "tensor", "channel"), default=None,
                   help="fp8 scaling of the output (default: the base's own)")

    p = sub.add_parser("extract", help="extract a LoRA approximating B - A")
    p.add_argument("a", metavar="A", help="the model the LoRA will be applied to (e.g. FLUX.1-dev)")
    p.add_argument("b", metavar="B", help="the model to approximate (e.g. dev2pro)")
    p.add_argument("output", metavar="OUT", help="output LoRA .safetensors")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank per layer")
    g.add_argument("--energy", type=float, help="smallest rank keeping this fraction of ||B - A||^2 per layer")
    p.add_argument("--max-rank", type=int, default=256, help="rank cap for --energy (default 256)")
    p.add_argument("--format", choices=("kohya", "diffusers"), default="kohya", help="output format (default kohya)")
    p.add_argument("--targets", default="all",
                   help="all (every Linear, default), all-linear (blocks only), attention, or a module regex")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="stored dtype of the factors")
    p.add_argument("--device", default=None, help="device for the SVDs (e.g. cuda; default cpu)")
    p.add_argument("--niter", type=int, default=2, help="power iterations of the randomized SVD (default 2)")
    p.add_argument("--quiet", action="store_true", help="print only the overall summary, not every layer")

    p = sub.add_parser("resize", help="reduce a LoRA's rank by SVD")
    p.add_argument("input", metavar="IN", help="LoRA .safetensors")
    p.add_argument("output", metavar="OUT", help="output .safetensors")
    p.add_argument("--rank", type=int, required=True, help="new maximum rank")
    p.add_argument("--format", choices=("kohya", "diffusers"), default=None,
                   help="output format (default: the input's; kohya resizes fused qkv/linear1 as one matrix)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="stored dtype of the factors")

    p = sub.add_parser("inspect", help="describe a LoRA file")
    p.add_argument("file", metavar="FILE", help="LoRA .safetensors")


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[name]


def _check_out(path, inputs) -> None:
    from pathlib import Path

    from dev2pro.errors import UserError

    out = Path(path)
    if any(Path(i).exists() and out.exists() and out.resolve() == Path(i).resolve() for i in inputs):
        raise UserError(f"{out}: output is one of the inputs; choose another output path")
    if out.suffix != ".safetensors" and not out.is_dir():
        raise UserError(f"{out}: LoRA output must end in .safetensors")


def main(args) -> int:
    from dev2pro.lora import files as lora_files
    from dev2pro.lora import ops as lora_ops
    from dev2pro.lora.describe import describe_lora

    cmd = args.lora_command
    if cmd == "inspect":
        print(describe_lora(args.file))
        return 0
    if cmd == "convert":
        _check_out(args.output, [args.input])
        lora = lora_files.load_lora(args.input)
        lora_files.save_lora(args.output, lora, args.to, dtype=_dtype(args.dtype))
        extra = ""
        if lora.passthrough and args.to == "diffusers":
            extra = f" ({len(lora.passthrough)} text-encoder tensors dropped: diffusers output holds the transformer)"
        print(f"converted {args.input} ({lora.source_format}, {len(lora)} modules) -> {args.output} ({args.to}){extra}")
        return 0
    if cmd == "merge":
        from dev2pro.errors import UserError
        from dev2pro.lora.apply import parse_lora_arg

        loras = [parse_lora_arg(x) for x in args.loras]
        for path, _ in loras:
            from pathlib import Path

            if not Path(path).is_file():
                raise UserError(f"LoRA file '{path}' not found")
        summary = lora_ops.merge_into_checkpoint(args.base, args.output, loras, format=args.format,
                                                 dtype=args.dtype, scaling=args.scaling)
        print(summary)
        return 0
    if cmd == "extract":
        _check_out(args.output, [args.a, args.b])
        targets = args.targets if args.targets in ("all", "all-linear", "attention") else [args.targets]
        summary = lora_ops.extract_lora(args.a, args.b, args.output, rank=args.rank, energy=args.energy,
                                        format=args.format, targets=targets, max_rank=args.max_rank,
                                        niter=args.niter, device=args.device, dtype=_dtype(args.dtype))
        print("\n".join(summary.lines(per_layer=not args.quiet)))
        return 0
    if cmd == "resize":
        _check_out(args.output, [args.input])
        summary = lora_ops.resize_lora(args.input, args.output, args.rank, format=args.format,
                                       dtype=_dtype(args.dtype))
        print(summary)
        return 0
    raise AssertionError(cmd)
