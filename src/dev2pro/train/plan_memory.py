"""Peak-memory planner for LoRA and full (de-distillation) training of Flux, as users see it (`dev2pro plan-memory`).

What: `fits(job)` says which settings (weight dtype, gradient checkpointing, block swap) fit which GPU sizes, fastest
first; `report(job)` is the text the command prints; `job_from_config` builds the `Job` from a recipe's TOML;
`measure_peak_cpu` runs a job on the CPU in a subprocess and measures its peak, which is how the formulas are validated
(tests/test_plan_memory.py at a small size, bench/plan_memory_validation.py at a mid size). The estimate itself,
`estimate(job)` with every term written out, is `dev2pro.train.memory_estimate`.

Measuring on a CPU (`measure_peak_cpu`): torch's CPU allocations are not seen by tracemalloc and torch has no CPU
peak counter, so the job runs in a fresh subprocess with `MALLOC_MMAP_THRESHOLD_=65536` (every tensor above 64 KiB is
its own mmap, returned to the OS when freed, so the resident set follows the live tensors), the peak resident set
(`VmHWM`) is reset through `/proc/self/clear_refs` after imports, a warm-up on a throwaway model and building the
model (it is initialised in fp32 and then cast), and the reported peak is `VmHWM` over two training steps (the second
has AdamW state) minus `VmRSS` before the model was built. With block swap both devices are the CPU: the swapped
blocks' master copies (host memory on a GPU machine) are subtracted, what remains is what a GPU would hold. oneDNN
is switched off in that process: for bf16 it keeps a persistent cache on the CPU (~30 MB at hidden 256) that has no
GPU counterpart. Linux only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from dev2pro.flux.models import PRESETS, FluxSpec, get_preset
from dev2pro.train.memory_estimate import Breakdown, GiB, Job, estimate, fp8_saves_dequantized_weight

GPU_SIZES_GB = (12, 16, 24, 80)


def settings_grid(job: Job) -> list[Job]:
    """Variations a user can switch to: weight dtype, gradient checkpointing, block swap (LoRA only)."""
    nblocks = job.spec.depth + job.spec.depth_single_blocks
    dtypes = ("bf16", "fp8") if job.method == "lora" else ("bf16",)
    swaps = sorted({0, job.blocks_to_swap} | ({nblocks // 3, nblocks // 2} if job.method == "lora" else set()))
    out = []
    for dt in dtypes:
        for gc in (False, True):
            for sw in swaps:
                out.append(dataclasses.replace(job, weight_dtype=dt, gradient_checkpointing=gc, blocks_to_swap=sw))
    return out


def describe(job: Job) -> str:
    return (f"{job.method}, {job.weight_dtype} base, ckpt={'on' if job.gradient_checkpointing else 'off'}, "
            f"swap={job.blocks_to_swap}")


def fits(job: Job, fp8_weight_copies: bool | None = None) -> dict[int, list[tuple[Job, Breakdown]]]:
    """For each GPU size (GB), the settings from `settings_grid` whose GPU total fits, fastest first (fewest swapped
    blocks, then no recomputation, then bf16 before fp8, which dequantizes every weight at every step)."""
    rows = [(j, estimate(j, fp8_weight_copies)) for j in settings_grid(job)]
    speed = lambda r: (r[0].blocks_to_swap, r[0].gradient_checkpointing, r[0].weight_dtype != "bf16")  # noqa: E731
    return {gb: sorted([(j, b) for j, b in rows if b.gpu_total <= gb * GiB], key=speed) for gb in GPU_SIZES_GB}


def report(job: Job) -> str:
    """The text `dev2pro plan-memory` prints."""
    fp8_copies = fp8_saves_dequantized_weight() if any(j.weight_dtype == "fp8" for j in settings_grid(job)) else False
    b = estimate(job, fp8_copies)
    s = job.spec
    lines = [f"job: {describe(job)}, {s.num_params() / 1e9:.2f} B params (hidden {s.hidden_size}, "
             f"{s.depth}+{s.depth_single_blocks} blocks), rank {job.rank} {job.targets}, batch {job.batch_size}, "
             f"{job.resolution}px ({job.image_tokens} image + {job.text_len} text tokens), compute "
             f"{'bf16 autocast' if job.autocast else 'plain'}",
             ""]
    for name, v in b.rows():
        lines.append(f"  {name:<28s}{v / GiB:9.2f} GiB")
    lines += [f"  note: {n}" for n in b.notes]
    lines.append("")
    lines.append("settings that fit (GPU total in GiB, fastest first):")
    for gb, rows in fits(job, fp8_copies).items():
        txt = "; ".join(f"{describe(j).split(', ', 1)[1]} -> {bb.gpu_total / GiB:.1f}" for j, bb in rows[:3])
        lines.append(f"  {gb:>3d} GB: {txt or 'nothing in this grid fits'}")
    lines.append("  (swap=N: train.blocks_to_swap = N, N blocks held in CPU memory and streamed to the GPU as they "
                 "run)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Building a Job from a train-lora / dedistill TOML (the recipes' own schema) or from flags


def spec_from_base(base: str) -> FluxSpec:
    """The architecture named by `model.base`: `preset:NAME[@seed]`, a preset name, or a checkpoint file/folder
    (read through `dev2pro.flux.describe` when it is available, header only)."""
    name = base.split(":", 1)[1] if base.startswith("preset:") else base
    name = name.split("@", 1)[0]
    if name in PRESETS:
        return PRESETS[name]
    if not base.startswith(("toy:", "preset:")) and not Path(base).exists():
        # Planning happens before the download: example configs carry placeholder paths.
        print(f"note: model.base {base} does not exist here; planning for flux-dev (pass --preset to choose)",
              file=sys.stderr)
        return PRESETS["flux-dev"]
    try:
        from dev2pro.flux import describe
    except ImportError:
        return PRESETS["flux-dev"]
    reader = getattr(describe, "read_spec", None) or getattr(describe, "inspect_spec", None)
    if reader is None:
        return PRESETS["flux-dev"]
    return reader(base)


def _is_fp8_file(base: str) -> bool:
    if base.startswith(("toy:", "preset:")) or not Path(base).exists():
        return "fp8" in Path(base).name.lower()  # placeholder paths: the usual file names say it
    from dev2pro.flux.sources import detect_format

    return "fp8" in detect_format(base)


def job_from_config(data: dict, **overrides) -> Job:
    """A `Job` from a parsed recipe TOML (`[model]`, `[data]`, `[train]`, optional `[lora]`). Keys this planner does
    not need are ignored here; `dev2pro.commands.plan_memory` checks the file against the recipe's schema first."""
    model, train, lora, data_cfg = (data.get(k, {}) for k in ("model", "train", "lora", "data"))
    spec = spec_from_base(str(model.get("base", "flux-dev")))
    method = "lora" if "lora" in data else "full"
    dtype = {"auto": "bf16", "fp8": "fp8", "bf16": "bf16", "fp32": "fp32"}[model.get("dtype", "auto")]
    if model.get("dtype", "auto") == "auto" and _is_fp8_file(str(model.get("base", ""))):
        dtype = "fp8"  # "auto" keeps the file's storage: an fp8 file trains on an fp8 base
    autocast = train.get("mixed_precision", "no") == "bf16"
    kw = dict(spec=spec, method=method, weight_dtype=dtype, autocast=autocast,
              rank=int(lora.get("rank", 16)), targets=lora.get("targets", "attention"),
              batch_size=int(train.get("batch_size", 1)), resolution=int(data_cfg.get("resolution", 512)),
              text_len=512 if spec.guidance_embed else 256,
              gradient_checkpointing=bool(train.get("gradient_checkpointing", False)),
              blocks_to_swap=int(train.get("blocks_to_swap", 0)))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return Job(**kw)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring on the CPU (validation)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(args: dict) -> list[int]:
    """Runs inside the measuring subprocess: for each job, build its model, run training steps, record the peak."""
    import gc

    import torch

    from dev2pro.flux import models

    torch.set_num_threads(int(args.get("threads", 1)))
    # oneDNN keeps a persistent per-process cache for bf16 matmuls on CPU (~30 MB at hidden 256) that a GPU run has
    # no equivalent of; the native CPU kernels keep nothing between calls.
    torch.backends.mkldnn.enabled = False

    def build(job, spec):
        wdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float32}[job.weight_dtype]
        model = models.random_transformer(spec, seed=0, dtype=wdt)
        if job.weight_dtype == "fp8":
            from dev2pro.flux.fp8 import swap_linears_to_fp8

            swap_linears_to_fp8(model, "tensor")
            if job.autocast:  # high-precision leftovers in bf16, as on a GPU
                for p in model.parameters():
                    if p.dtype == torch.float32:
                        p.data = p.data.to(torch.bfloat16)
        if job.method == "lora":
            from dev2pro.lora.inject import add_lora, lora_parameters

            add_lora(model, job.rank, job.rank, job.targets, seed=0)
            params = lora_parameters(model)
        else:
            params = list(model.parameters())
        if job.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model, params, torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def inputs(job, spec, side, n_txt):
        comp = torch.bfloat16 if job.autocast else {"bf16": torch.bfloat16}.get(job.weight_dtype, torch.float32)
        g = torch.Generator().manual_seed(0)
        lat = torch.randn(job.batch_size, spec.in_channels // 4, 2 * side, 2 * side, generator=g)
        x = models.pack_latents(lat).to(comp)
        txt = torch.randn(job.batch_size, n_txt, spec.context_in_dim, generator=g).to(comp)
        pooled = torch.randn(job.batch_size, spec.vec_in_dim, generator=g).to(comp)
        return x, txt, pooled, models.image_ids(2 * side, 2 * side), models.text_ids(n_txt)

    def step(job, model, opt, batch):
        x, txt, pooled, iid, tid = batch
        t = torch.full((x.shape[0],), 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=job.autocast):
            v = models.predict(model, x, t, txt, pooled, iid, tid, guidance=1.0)
            loss = torch.nn.functional.mse_loss(v.float(), x.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peaks = []
    for jd in args["jobs"]:
        spec = FluxSpec(**{**jd["spec"], "axes_dim": tuple(jd["spec"]["axes_dim"])})
        job = Job(spec=spec, **{k: v for k, v in jd.items() if k != "spec"})
        # Warm-up on a throwaway 1-block model: oneDNN/autograd/optimizer first-use allocations happen here.
        warm_spec = dataclasses.replace(spec, depth=1, depth_single_blocks=1)
        warm = build(job, warm_spec)
        step(job, warm[0], warm[2], inputs(job, warm_spec, 2, 4))
        del warm
        gc.collect()
        base = _status_kib("VmRSS")
        model, params, opt = build(job, spec)  # built in fp32 then cast: reset the high-water mark after it
        offloaded = 0
        if job.blocks_to_swap:  # the trainer's block swap with "cpu" as both devices; the offloaded copies (the
            from dev2pro.train.block_swap import BlockSwap  # original tensors) are host memory: not counted

            swap = BlockSwap(model, job.blocks_to_swap, "cpu")
            offloaded = sum(h.numel() * h.element_size() for hs in swap.host.values() for h in hs)
        batch = inputs(job, spec, job.resolution // 16, job.text_len)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        for _ in range(int(args.get("steps", 2))):
            step(job, model, opt, batch)
        peaks.append((_status_kib("VmHWM") - base) * 1024 - offloaded)
        del model, params, opt, batch
        gc.collect()
    return peaks


def measure_peak_cpu(jobs: Job | list[Job], steps: int = 2, threads: int = 1, timeout: float = 900):
    """Measured peak bytes of `steps` training steps of each job on this CPU, in a fresh
    subprocess each (see the module docstring for the method). Returns an int for one job, a list for a list."""
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("measure_peak_cpu needs Linux /proc (clear_refs, VmHWM)")
    single = isinstance(jobs, Job)
    jobs = [jobs] if single else list(jobs)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = ("import json, sys; from dev2pro.train.plan_memory import _child; "
            "print('RESULT', json.dumps(_child(json.loads(sys.argv[1]))))")
    peaks = []
    for job in jobs:  # one process per job: freed small heap blocks of an earlier job would hide part of the next
        args = {"jobs": [dataclasses.asdict(job)], "steps": steps, "threads": threads}
        out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                             env=env, timeout=timeout)
        result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not result:
            raise RuntimeError(f"measuring subprocess failed:\n{out.stderr[-3000:]}")
        peaks.append(int(json.loads(result[0][7:])[0]))
    return peaks[0] if single else peaks


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured else math.inf


def get_spec(name: str) -> FluxSpec:
    return get_preset(name)
