"""`dev2pro sample`: generate images from prompts with a base checkpoint, LoRAs and a guidance mode.

Order of work keeps peak memory low for real Flux: the text encoders embed every prompt (and the negative) and are
freed, then the transformer is loaded (fp8 files stay fp8), LoRAs are merged into it, the Euler sampler runs
(`dev2pro.flux.sampling.generate`) and the autoencoder decodes. Outputs: `p<prompt index>_s<seed>.png`, `grid.png`
(one row per prompt, one column per seed) and `settings.json` (everything needed to reproduce the images).
"""

from __future__ import annotations

HELP = "generate images with a base model and LoRAs (embedded guidance for dev, true CFG for dev2pro)"

DESCRIPTION = """\
Generate images from prompts with any supported base (BFL/ComfyUI single file, fp8 file, diffusers folder,
preset:NAME, toy:NAME), any number of LoRAs at chosen strengths, and a guidance mode:

  --guidance G           embedded guidance (FLUX.1-dev: one pass, G goes into the guidance embedding; default 3.5)
  --cfg S --negative N   true classifier-free guidance (de-distilled bases such as dev2pro: two passes,
                         v_u + S (v_c - v_u)); guidance-embedded bases then get guidance input 1.0 unless --guidance
                         is given too (both at once is allowed)

The autoencoder and text encoders (--ae, --t5, --clip) are local files/folders or hub ids; a diffusers pipeline
folder (vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/) works for all three; ComfyUI's single files
(ae.safetensors, t5xxl_fp16 / fp8 .safetensors, clip_l.safetensors) work too, with --tokenizers. With a toy or tiny
base they default to `toy`. Images are written as OUT/p<prompt>_s<seed>.png plus OUT/grid.png and settings.json.

Examples:
  # FLUX.1-dev with a LoRA trained on dev2pro (embedded guidance)
  dev2pro sample --base flux1-dev.safetensors --lora runs/my_lora/my_lora.safetensors:1.0 --guidance 3.5 \\
      --ae ae.safetensors --t5 ./FLUX.1-dev --clip ./FLUX.1-dev --seed 0 1 2 3 --out samples/dev "a photo of zxq"
  # the dev2pro base itself (true CFG with a negative prompt), fp8 file
  dev2pro sample --base dev2pro-fp8.safetensors --cfg 3.5 --negative "blurry" --ae ./FLUX.1-dev --t5 ./FLUX.1-dev \\
      --clip ./FLUX.1-dev --prompts-file prompts.txt --out samples/dev2pro
  # the toy world, on a CPU, in seconds
  dev2pro sample --base toy:dev "a red circle on a black background" --seed 0 1 2 3
  dev2pro sample --base toy:pro --cfg 3.0 "a small blue square on a white background"   # the toy teacher, CFG
"""

TOY_PREFIXES = ("toy:", "preset:tiny")
TOY_SIZE = 32


def add_arguments(parser) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts (quote each one)")
    parser.add_argument("--prompts-file", metavar="FILE", help="text file, one prompt per line (# comments skipped)")
    parser.add_argument("--base", required=True, metavar="REF",
                        help="transformer: .safetensors file (BFL, ComfyUI, fp8), diffusers folder, preset:NAME, "
                             "toy:NAME")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="LoRA to merge (kohya, diffusers/peft, ComfyUI, XLabs), strength 1.0 by default; "
                             "repeat for several")
    g = parser.add_argument_group("guidance")
    g.add_argument("--guidance", type=float, default=None,
                   help="embedded guidance value (default: 3.5 without --cfg, 1.0 with it; ignored by bases "
                        "without a guidance embedding)")
    g.add_argument("--cfg", type=float, default=1.0, help="true CFG scale (1 = off, the default)")
    g.add_argument("--negative", default="", help="negative prompt for true CFG (default: empty prompt)")
    s = parser.add_argument_group("sampling")
    s.add_argument("--steps", type=int, default=28, help="Euler steps (default 28; schnell: 4)")
    s.add_argument("--width", type=int, default=None, help="image width (default 1024; 32 for toy components)")
    s.add_argument("--height", type=int, default=None, help="image height (default 1024; 32 for toy components)")
    s.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (default 0)")
    s.add_argument("--no-shift", action="store_true", help="linear schedule (no resolution-dependent shift)")
    s.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    c = parser.add_argument_group("components")
    c.add_argument("--ae", metavar="REF", help="autoencoder: ae.safetensors, diffusers/pipeline folder, hub id, toy")
    c.add_argument("--t5", metavar="REF", help="T5: t5xxl_fp16/fp8 single file, folder, pipeline folder, hub id, toy")
    c.add_argument("--clip", metavar="REF", help="CLIP-L: clip_l.safetensors, folder, pipeline folder, hub id, toy")
    c.add_argument("--tokenizers", metavar="DIR", help="folder with tokenizer/ and tokenizer_2/ for single encoder "
                                                       "files (default: the hub's, from the HF cache)")
    c.add_argument("--t5-max-length", type=int, default=512, help="T5 tokens (512 for dev, 256 for schnell)")
    parser.add_argument("--out", default="samples", metavar="DIR", help="output folder (default ./samples)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if present")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="compute dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_prompts(args) -> list[str]:
    from pathlib import Path

    from dev2pro.errors import UserError

    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"prompts file '{path}' not found")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        prompts += [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise UserError("no prompts: give them as arguments or with --prompts-file FILE")
    return prompts


def _components(args) -> tuple[str, str, str]:
    from dev2pro.errors import UserError

    toy = args.base.startswith(TOY_PREFIXES)
    refs = [args.ae, args.t5, args.clip]
    if any(r is None for r in refs):
        if not toy:
            missing = [f"--{n}" for n, r in zip(("ae", "t5", "clip"), refs) if r is None]
            raise UserError(f"{' '.join(missing)} required for base '{args.base}' (local path, pipeline folder or "
                            "hub id; 'toy' for the toy world)")
        refs = [r or "toy" for r in refs]
    return tuple(refs)


def main(args) -> int:
    import json
    from pathlib import Path

    import torch

    from dev2pro.errors import UserError
    from dev2pro.flux import sampling
    from dev2pro.flux.autoencoder import load_autoencoder
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.encoders import free, looks_like_hub_id
    from dev2pro.flux.text_encoders import load_text_encoder
    from dev2pro.lora.apply import apply_loras, parse_lora_arg

    prompts = read_prompts(args)
    if not args.base.startswith(("preset:", "toy:")) and not Path(args.base).exists() and not looks_like_hub_id(
            args.base):
        raise UserError(f"base model '{args.base}' not found (a .safetensors file, a diffusers folder, a hub id, "
                        "preset:NAME or toy:NAME)")
    loras = [parse_lora_arg(a) for a in args.lora]
    for path, _ in loras:
        if not Path(path).is_file():
            raise UserError(f"LoRA file '{path}' not found")
    ae_ref, t5_ref, clip_ref = _components(args)
    toy_components = ae_ref == "toy"
    width = args.width or (TOY_SIZE if toy_components else 1024)
    height = args.height or (TOY_SIZE if toy_components else 1024)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU available (use --device cpu)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    use_cfg = args.cfg != 1.0
    if args.steps < 1 or args.batch_size < 1:
        raise UserError(f"--steps and --batch-size must be at least 1, got {args.steps} and {args.batch_size}")

    ae = load_autoencoder(ae_ref, device=device, dtype=dtype)  # small; loaded first to check the size early
    cell = 2 * ae.downsample
    if width % cell or height % cell or width <= 0 or height <= 0:
        raise UserError(f"--width {width} / --height {height}: each must be a positive multiple of {cell} "
                        f"(2 x the autoencoder's downsampling {ae.downsample})")
    text = load_text_encoder(t5_ref, clip_ref, device=device, dtype=dtype, max_length=args.t5_max_length,
                             tokenizers=args.tokenizers)
    embeddings = sampling.embed_prompts(text, prompts + ([args.negative] if use_cfg else []))
    free(text)
    del text

    model = load_transformer(args.base, dtype=dtype, device=device)
    apply_loras(model, loras)
    guidance = sampling.default_guidance(model, args.guidance, args.cfg)
    images = sampling.generate(model, ae, embeddings, prompts, negative=args.negative, height=height, width=width,
                               steps=args.steps, guidance=args.guidance, cfg=args.cfg, seeds=args.seed,
                               shift=not args.no_shift, batch_size=args.batch_size, progress=not args.no_progress)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k, pil in enumerate(sampling.to_pil(images)):
        i, j = divmod(k, len(args.seed))
        name = f"p{i:02d}_s{args.seed[j]}.png"
        pil.save(out / name)
        names.append(name)
    sampling.save_grid(images, out / "grid.png", ncols=len(args.seed))
    settings = dict(base=args.base, loras=[[p, s] for p, s in loras], prompts=prompts, negative=args.negative,
                    guidance=guidance, cfg=args.cfg, steps=args.steps, width=width, height=height, seeds=args.seed,
                    shift=not args.no_shift, ae=ae_ref, t5=t5_ref, clip=clip_ref, t5_max_length=args.t5_max_length,
                    dtype=str(dtype).removeprefix("torch."), files=names)
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    mode = (f"true CFG {args.cfg}" if use_cfg else "no CFG") + (f", guidance input {guidance:g}" if guidance else "")
    print(f"wrote {len(names)} images + grid.png to {out} ({mode}, {args.steps} steps, {width}x{height})")
    return 0
