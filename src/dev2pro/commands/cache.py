"""`dev2pro cache DATA OUT`: precompute latents and text embeddings into shards for large-scale training."""

from __future__ import annotations

HELP = "precompute latents and text embeddings of an image folder into shards (for large datasets)"
DESCRIPTION = """\
Scan DATA (images with same-name .txt captions, subfolders included), encode every image with the autoencoder and
every caption with the text encoders, and write the results to OUT as shards: shard-NNNNNN.safetensors (latents,
T5 sequence, CLIP pooled) with a shard-NNNNNN.json manifest each, plus OUT/dataset.json listing the shards. Each shard
holds one aspect-ratio bucket. Trainers stream the shards rank by rank without loading a global index; a rerun keeps
the shards that are already complete, so an interrupted run can simply be started again.

Skipped or converted files (corrupt, too small, not UTF-8, ...) are listed before encoding starts. WebDataset tar
shards are not read here: trainers stream them directly (data.dir = the tar folder or pattern, docs/training.md).

Parallel encoding, one slice per process: under torchrun (RANK / WORLD_SIZE set) process I of N encodes shards I,
I+N, I+2N, ... on its own GPU (cuda:LOCAL_RANK with --device auto or cuda) and process 0 writes dataset.json after
all are done. Without torchrun, --process-index I --num-processes N does the same from separate launches (other
machines sharing OUT, a job array): each process writes its shards, and the last one to finish writes dataset.json
(a rerun with --num-processes 1 also completes it, encoding only what is missing). The shard files are identical to
a one-process run. Every process scans the whole folder (the plan is a pure function of it).

The encoders are never guessed: give --path (a FLUX.1 folder with vae/, text_encoder/, text_encoder_2/, tokenizers)
or --ae, --t5 and --clip (single files such as ComfyUI's ae.safetensors, t5xxl_fp16.safetensors, clip_l.safetensors,
folders, hub ids, or 'toy'); single encoder files take their tokenizers from --tokenizers (a folder with tokenizer/
and tokenizer_2/), --path, or the hub defaults. Every path is checked before encoding starts.

examples:
  dev2pro cache ./toy_images ./toy_shards --ae toy --t5 toy --resolution 32     # toy encoders, toy-world images
  dev2pro cache ./images ./shards --path /models/FLUX.1-dev --resolution 1024 --device cuda --dtype bf16
  dev2pro cache ./images ./shards --ae ComfyUI/models/vae/ae.safetensors \\
      --t5 ComfyUI/models/clip/t5xxl_fp8_e4m3fn.safetensors --clip ComfyUI/models/clip/clip_l.safetensors \\
      --tokenizers /models/flux-tokenizers --resolution 1024 --device cuda --dtype bf16
  torchrun --nproc-per-node 8 -m dev2pro.cli cache ./images ./shards --path /models/FLUX.1-dev --resolution 1024 \
      --dtype bf16                                                             # 8 GPUs, one slice each
  dev2pro cache ./images ./shards --ae toy --t5 toy --process-index 1 --num-processes 4   # slice 1 of 4
"""

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(parser) -> None:
    parser.add_argument("data", help="folder of images with same-name .txt captions")
    parser.add_argument("out", help="output folder for the shards")
    parser.add_argument("--path", default=None, help="a FLUX.1 folder (HF snapshot layout) giving every part not set")
    parser.add_argument("--ae", default=None, help="autoencoder: BFL ae.safetensors, diffusers folder, hub id or 'toy'")
    parser.add_argument("--t5", default=None, help="T5: single file (fp16/fp8), folder, hub id or 'toy'")
    parser.add_argument("--clip", default=None, help="CLIP-L: single file, folder, pipeline folder; default: --t5")
    parser.add_argument("--tokenizers", default=None, help="folder with tokenizer/ and tokenizer_2/ (single files)")
    parser.add_argument("--max-length", type=int, default=512, help="T5 tokens (512 for dev, 256 for schnell)")
    parser.add_argument("--resolution", type=int, default=512, help="target side: pixel area = resolution^2")
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="encoder batch size")
    parser.add_argument("--trigger", default="", help="trigger word prepended to captions (or replacing [trigger])")
    parser.add_argument("--default-caption", default="", help="caption for images without a .txt file")
    parser.add_argument("--crop", choices=["center", "random"], default="center", help="crop into the bucket")
    parser.add_argument("--upscale", action="store_true", help="upscale small images instead of skipping them")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="encoder compute dtype")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--process-index", type=int, default=None,
                        help="this process's slice I (with --num-processes N): writes shards I, I+N, ...")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="number of slices N; the last process to finish writes dataset.json (under torchrun "
                             "both come from RANK / WORLD_SIZE instead)")


def process_slice(args, env) -> tuple[int, int, bool]:
    """(index, count, under torchrun) from --process-index / --num-processes or torchrun's RANK / WORLD_SIZE."""
    from dev2pro.errors import ConfigError

    world = int(env.get("WORLD_SIZE", "1"))
    flags = args.process_index is not None or args.num_processes is not None
    if flags:
        if world > 1:
            raise ConfigError("--process-index/--num-processes under torchrun (WORLD_SIZE="
                              f"{world}): torchrun already gives each process its slice: drop the flags")
        if args.process_index is None or args.num_processes is None:
            raise ConfigError("give both --process-index I and --num-processes N (or neither)")
        if args.num_processes < 1 or not 0 <= args.process_index < args.num_processes:
            raise ConfigError(f"--process-index {args.process_index} --num-processes {args.num_processes}: the "
                              f"index must be in 0..{args.num_processes - 1}")
        return args.process_index, args.num_processes, False
    return int(env.get("RANK", "0")), world, world > 1


def main(args) -> int:
    import os

    import torch

    from dev2pro.data.config import DataConfig
    from dev2pro.data.folders import scan_dataset
    from dev2pro.data.shards import write_shards
    from dev2pro.data.tars import is_tar_source
    from dev2pro.errors import ConfigError
    from dev2pro.flux.autoencoder import load_autoencoder
    from dev2pro.flux.model_folder import fill_from_path, preflight
    from dev2pro.flux.text_encoders import load_text_encoder

    if is_tar_source(args.data):
        raise ConfigError(f"{args.data}: tar shards: dev2pro cache reads image folders; train from the tars directly "
                          f"(data.dir = \"{args.data}\", encoded on the fly) or extract them into a folder first")
    rank, world, torchrun = process_slice(args, os.environ)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torchrun and device == "cuda":  # one GPU per process
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    dtype = getattr(torch, DTYPES[args.dtype])
    cfg = DataConfig(
        dir=args.data,
        trigger=args.trigger,
        default_caption=args.default_caption,
        resolution=args.resolution,
        crop=args.crop,
        upscale=args.upscale,
    )
    cfg.validate()
    parts = fill_from_path(args.path, t5=args.t5, clip=args.clip or (args.t5 if args.path is None else None),
                           autoencoder=args.ae, tokenizers=args.tokenizers)
    for key, flag in (("autoencoder", "--ae"), ("t5", "--t5"), ("clip", "--clip")):
        if not getattr(parts, key):
            raise ConfigError(f"{flag} is unset: give {flag} (a file, folder, hub id, or 'toy') or --path (a FLUX.1 "
                              "folder)")
    preflight(parts, model_path=args.path)
    ae = load_autoencoder(parts.autoencoder, device=device, dtype=dtype)
    index = scan_dataset(cfg, 2 * ae.downsample, progress=not args.quiet and rank == 0)
    if rank == 0:
        print(index.report.summary())
    text = load_text_encoder(parts.t5, parts.clip, device=device, dtype=dtype, max_length=args.max_length,
                             tokenizers=parts.tokenizers, model_path=args.path)
    barrier = None
    if torchrun:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # only for the barrier: the encoders never communicate
        barrier = dist.barrier
    try:
        info = write_shards(
            index, ae, text, args.out, shard_size=args.shard_size, device=device, dtype=dtype,
            batch_size=args.batch_size, progress=not args.quiet, process_index=rank, num_processes=world,
            barrier=barrier,
        )
    finally:
        if torchrun:
            dist.destroy_process_group()
    who = f"process {rank} of {world}: " if world > 1 else ""
    print(f"{args.out}: {who}{len(info['shards'])} shards ({info['written']} written, {info['kept']} already "
          f"complete), {info['items']} images")
    if world > 1 and not torchrun:
        print(f"{args.out}/dataset.json: " + ("written (every shard is complete)" if info["complete"] else
              "not yet: the last process to finish writes it (or rerun with --num-processes 1)"))
    return 0
