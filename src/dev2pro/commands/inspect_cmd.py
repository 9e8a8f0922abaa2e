"""`dev2pro inspect`: what a checkpoint is, read from its header (and config.json) only: nothing is allocated, so a
24 GB file is inspected in a fraction of a second.

Transformer checkpoints go through `dev2pro.flux.describe.describe_checkpoint`; LoRA files are handed to
`dev2pro.lora.describe.describe_lora` (a short generic description is printed if that module is unavailable).
"""

from __future__ import annotations

HELP = "show what a checkpoint or LoRA file is: format, architecture, dtypes, parameters, guidance embedding, fp8"

DESCRIPTION = """\
Describe a Flux transformer checkpoint (BFL/ComfyUI single file, fp8 file, diffusers folder) or a LoRA file, from
its header only (nothing is loaded into memory).

Shown for transformers: format, architecture (the matching preset, or its dimensions), parameter count, whether it
has a guidance embedding (dev: yes; schnell and de-distilled bases: usually no), dtypes (tensor counts), fp8 scaling,
size and metadata. For LoRA files: format, ranks, alphas, target modules and metadata.

Examples:
  dev2pro inspect flux1-dev.safetensors
  dev2pro inspect ./FLUX.1-dev            # a pipeline folder: its transformer/ is described
  dev2pro inspect my_lora.safetensors
"""

SCALING_NAMES = {
    None: "none (not fp8)",
    "none": "plain cast (no scales), like the published fp8 reposts",
    "tensor": "per-tensor scales (ComfyUI scaled fp8)",
    "channel": "per-output-channel scales (dev2pro)",
}
FORMAT_NAMES = {
    "bfl": "BFL single file",
    "diffusers": "diffusers",
    "fp8": "fp8 single file (BFL keys, float8_e4m3fn weights)",
    "comfy-scaled-fp8": "ComfyUI scaled fp8 single file",
    "dev2pro-channel-fp8": "dev2pro per-channel fp8 single file",
}


def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="FILE|DIR",
                        help="checkpoint file, diffusers folder, LoRA file, T5 / CLIP file or toy:NAME")


def describe_lora_fallback(path) -> str:
    """Used when dev2pro.lora.describe is unavailable: tensor count, a few keys, metadata."""
    from dev2pro.flux.safetensors_io import read_header

    h = read_header(path)
    keys = sorted(h.tensors)
    more = ", ..." if len(keys) > 4 else ""
    lines = [f"file:       {path}", f"format:     LoRA ({len(keys)} tensors)",
             "keys:       " + ", ".join(keys[:4]) + more]
    lines += [f"metadata:   {k} = {v[:100]}" for k, v in sorted(h.metadata.items())]
    return "\n".join(lines)


def describe(path) -> str:
    from dev2pro.errors import CheckpointError
    from dev2pro.flux.describe import describe_checkpoint
    from dev2pro.flux.sources import detect_format, resolve_ref

    path = resolve_ref(path)  # also toy:NAME
    try:
        fmt = detect_format(path)
    except CheckpointError:
        from dev2pro.flux.encoder_files import describe_encoder_file, encoder_kinds

        if path.is_file() and encoder_kinds(path):  # clip_l.safetensors, t5xxl_fp16.safetensors, ...
            return describe_encoder_file(path)
        raise
    if fmt == "lora":
        try:
            from dev2pro.lora.describe import describe_lora
        except ImportError:
            describe_lora = describe_lora_fallback
        return describe_lora(path)
    info = describe_checkpoint(path)
    s = info.spec
    dims = (f"hidden {s.hidden_size}, {s.num_heads} heads of {s.head_dim}, {s.depth} double + "
            f"{s.depth_single_blocks} single blocks, in {s.in_channels}, T5 {s.context_in_dim}, CLIP {s.vec_in_dim}, "
            f"RoPE axes {tuple(s.axes_dim)}")
    arch = f"{info.preset} ({dims})" if info.preset else dims
    dtypes = ", ".join(f"{k}: {v}" for k, v in sorted(info.dtypes.items(), key=lambda kv: -kv[1]))
    lines = [
        f"file:       {path}",
        f"format:     {info.format} ({FORMAT_NAMES.get(info.format, info.format)})",
        f"model:      {arch}",
        f"guidance embedding: {'yes (guidance-distilled, like FLUX.1-dev)' if s.guidance_embed else 'no'}",
        f"parameters: {info.num_params:,} ({info.num_params / 1e9:.3f} B)",
        f"dtypes:     {dtypes} (tensors)",
        f"fp8:        {SCALING_NAMES[info.fp8_scaling]}",
        f"size:       {info.nbytes / 1e9:.3f} GB" if info.nbytes >= 1e8 else f"size:       {info.nbytes / 1e6:.2f} MB",
    ]
    if info.ignored:
        lines.append(f"ignored:    {info.ignored} tensors outside the transformer (VAE, text encoders, fp8 input "
                     "scales)")
    for k, v in sorted(info.metadata.items()):
        if k != "format":
            lines.append(f"metadata:   {k} = {v[:100]}")
    return "\n".join(lines)


def main(args) -> int:
    print(describe(args.path))
    return 0
