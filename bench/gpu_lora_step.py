"""LoRA train-step speed, peak memory and MFU on a real-size Flux transformer on a CUDA GPU (H100/H200), no download.

The FLUX.1-dev architecture (11.9 B parameters) is built with random weights directly on the GPU in bf16 (normal,
std 0.02 like trained weights); for an fp8 base its block linears are swapped to `dev2pro.flux.fp8.Fp8Linear`
(channel scales). LoRA rank 16 on the attention targets (`dev2pro.lora.inject.add_lora`, fp32), AdamW, bf16
autocast, gradient checkpointing, batch 1, random latents and 512 T5 tokens, at 512 and 1024 px.

Variants (`--bases`, comma separated): a base, then `+` options, e.g. `fp8-mm+swap20+compile`.
- bases: `bf16`; `fp8` (dequantize + bf16 matmul); `fp8-mm` (train.fp8_matmul: `torch._scaled_mm` forward with
  per-row activation scales, input gradient in bf16 from the dequantized weight); `fp8-mm-e5m2` (the input gradient
  through `_scaled_mm` too, e5m2 gradients);
- options: `swapN` (train.blocks_to_swap = N, `dev2pro.train.block_swap`), `compile` (train.compile,
  `dev2pro.train.compile_blocks`; compile time is excluded: it happens in the warm-up steps).
For each: steps/s (median of timed steps after warm-up), `torch.cuda.max_memory_allocated`, plan-memory's estimate,
and MFU = model FLOPs per step (forward + input-gradient backward, no recompute, `step_flops`) x steps/s / the GPU's
dense bf16 peak (`--peak-tflops`, 989 for H100/H200 SXM).

    .venv/bin/python bench/gpu_lora_step.py --out docs/gpu_lora_step.md          # on the GPU machine
    .venv/bin/python bench/gpu_lora_step.py --preset tiny-dev --device cpu --steps 2   # dry run anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


DEFAULT_VARIANTS = "bf16,bf16+compile,fp8,fp8-mm,fp8-mm+compile,fp8-mm-e5m2+compile,fp8-mm+swap20"


def parse_variant(variant: str) -> tuple[str, int, bool]:
    """`base[+swapN][+compile]` -> (base, blocks to swap, compile)."""
    base, *opts = variant.split("+")
    swap, comp = 0, False
    for o in opts:
        if o == "compile":
            comp = True
        elif o.startswith("swap") and o[4:].isdigit():
            swap = int(o[4:])
        else:
            raise SystemExit(f"unknown option '{o}' in variant '{variant}' (swapN, compile)")
    if base not in ("bf16", "fp8", "fp8-mm", "fp8-mm-e5m2"):
        raise SystemExit(f"unknown base '{base}' in variant '{variant}' (bf16, fp8, fp8-mm, fp8-mm-e5m2)")
    return base, swap, comp


def build(preset: str, variant: str, device: str, seed: int = 0):
    import torch

    from dev2pro.flux import fp8, models
    from dev2pro.lora.inject import add_lora, lora_parameters

    base, swap, comp = parse_variant(variant)
    spec = models.PRESETS[preset]
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    # meta -> cast -> materialise: a 12B model never exists in fp32 on the GPU (that alone would be 47.6 GB)
    model = models.build_transformer(spec, device="meta").to(dtype).to_empty(device=device)
    models.init_weights(model, generator=torch.Generator(device=device).manual_seed(seed))
    if base.startswith("fp8"):
        fp8.swap_linears_to_fp8(model, "channel")
        if base.startswith("fp8-mm"):
            fp8.enable_fp8_matmul(model, "e5m2" if base.endswith("e5m2") else "dequant")
    add_lora(model, 16, 16, "attention", seed=seed)
    model.enable_gradient_checkpointing()
    model.train()
    if swap:
        from dev2pro.train.block_swap import BlockSwap

        BlockSwap(model, swap, device)
    if comp:
        from dev2pro.train.compile_blocks import compile_blocks

        compile_blocks(model)
    return spec, model, lora_parameters(model)


def step_flops(spec, image_tokens: int, text_tokens: int) -> float:
    """Model FLOPs of one LoRA step on a frozen base, batch 1: forward + input-gradient backward (2x the forward's
    matmuls; no weight gradients except LoRA's, negligible), without gradient-checkpointing recompute. Linears:
    2 x in x out per token of their stream (double blocks: image linears on image tokens, context linears on text
    tokens; single blocks on both); modulation linears (one token per sample) left out. Attention: QK^T and AV,
    2 x 2 N^2 h per block forward, twice that for its input gradients."""
    from dev2pro.train.memory_estimate import block_linears

    lin = block_linears(spec)
    n = image_tokens + text_tokens
    dbl = sum(2 * i * o * (text_tokens if "add_" in name or "context" in name else image_tokens)
              for name, i, o in lin["double"] if not name.startswith("norm"))
    sgl = sum(2 * i * o * n for name, i, o in lin["single"] if not name.startswith("norm"))
    linears = spec.depth * dbl + spec.depth_single_blocks * sgl
    attention = (spec.depth + spec.depth_single_blocks) * 4 * n * n * spec.hidden_size
    return 2 * linears + 3 * attention


def step_fn(spec, model, params, resolution: int, text_len: int, device: str):
    import torch

    from dev2pro.flux import models

    opt = torch.optim.AdamW(params, lr=1e-4)
    side = resolution // 8
    g = torch.Generator(device=device).manual_seed(0)
    x0 = models.pack_latents(torch.randn(1, spec.in_channels // 4, side, side, device=device, generator=g))
    txt = torch.randn(1, text_len, spec.context_in_dim, device=device, generator=g)
    pooled = torch.randn(1, spec.vec_in_dim, device=device, generator=g)
    iid, tid = models.image_ids(side, side, device=device), models.text_ids(text_len, device=device)
    autocast = torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                              enabled=device != "cpu")

    def step():
        t = torch.rand(1, device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        with autocast:
            v = models.predict(model, xt, t, txt, pooled, iid, tid, guidance=1.0)
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def measure(preset: str, variant: str, resolution: int, device: str, steps: int, warmup: int,
            peak_tflops: float = 989.0) -> dict:
    import torch

    from dev2pro.train import memory_estimate as me

    text_len = 512 if preset.startswith("flux") else 16
    base, swap, _ = parse_variant(variant)
    spec, model, params = build(preset, variant, device)
    step = step_fn(spec, model, params, resolution, text_len, device)
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    job = me.Job(spec=spec, weight_dtype="fp8" if base.startswith("fp8") else "bf16", autocast=cuda, rank=16,
                 resolution=resolution, text_len=text_len, gradient_checkpointing=True, blocks_to_swap=swap)
    est = me.estimate(job).peak
    del model, params, step
    if cuda:
        torch.cuda.empty_cache()
    sps = 1 / statistics.median(times)
    flops = step_flops(spec, (resolution // 16) ** 2, text_len)
    return {"preset": preset, "base": variant, "resolution": resolution, "steps_per_s": sps,
            "peak_bytes": peak, "estimate_bytes": est, "loss": loss, "step_tflop": flops / 1e12,
            "mfu": flops * sps / (peak_tflops * 1e12)}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux-dev")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bases", default=DEFAULT_VARIANTS, help="variants: base[+swapN][+compile] (see above)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--resolutions", default="512,1024")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="write a markdown table here (and a .json beside it)")
    a = p.parse_args(argv)
    if a.device == "cpu" and a.preset.startswith("flux-dev"):
        p.error("the real-size preset needs a GPU; use --preset tiny-dev for a CPU dry run")
    rows = []
    for base in a.bases.split(","):
        for res in (int(r) for r in a.resolutions.split(",")):
            try:
                r = measure(a.preset, base, res, a.device, a.steps, a.warmup, a.peak_tflops)
            except torch.cuda.OutOfMemoryError as e:  # recorded, not hidden
                r = {"preset": a.preset, "base": base, "resolution": res, "error": f"OOM: {str(e)[:200]}"}
                torch.cuda.empty_cache()
            except Exception as e:  # e.g. a compile failure: recorded, the other variants still run
                r = {"preset": a.preset, "base": base, "resolution": res, "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(r)
            print(json.dumps(r), flush=True)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    lines = [f"GPU LoRA step ({dev}, torch {torch.__version__}), `{' '.join(sys.argv)}`", "",
             "| variant | px | steps/s | peak allocated (GiB) | plan-memory estimate (GiB) | TFLOP/step | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['base']} | {r['resolution']} | {r['error']} | | | | |")
            continue
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] is not None else "n/a (cpu)"
        lines.append(f"| {r['base']} | {r['resolution']} | {r['steps_per_s']:.3f} | {peak} | "
                     f"{r['estimate_bytes'] / 2**30:.2f} | {r['step_tflop']:.1f} | {100 * r['mfu']:.1f}% |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
