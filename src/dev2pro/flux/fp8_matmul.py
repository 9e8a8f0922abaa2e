"""fp8 matmuls for a frozen fp8 linear in training: `torch._scaled_mm` forward, a high-precision input gradient.

What it computes. `y = x @ (w8 * s_w)^T + b` with `w8` float8_e4m3fn (frozen) and `s_w` its fp32 scale (none, per
tensor or per output row, `dev2pro.flux.fp8`). The activation is quantized on the fly to e4m3 with a dynamic amax
scale: per row of `x` (one scale per token) where the kernel takes rowwise scales, one scale for the whole tensor
otherwise. Per-row scaling matters for Flux: hidden states carry a few outlier channels ~100x larger than the rest,
and a per-tensor scale set by the largest token pushes the small tokens' values down toward e4m3's subnormals.
Rowwise scales are used on the CPU and on CUDA capability >= 9.0 (Hopper); on Ada (8.9) `_scaled_mm` takes
per-tensor scales only, so the activation scale is per tensor there (and a per-row weight scale is folded into the
output afterwards instead of into the kernel).

Backward: a LoRA on a frozen base needs only the input gradient `dX = dY @ W` (no weight gradient). Default
(`backward="dequant"`): computed in dY's dtype (bf16 under autocast) from the dequantized weight, as
`_Fp8LinearFn` does. Why not fp8 there too: the input gradient of block k is the chain through every later block,
and e5m2 (the usual gradient format, 2 mantissa bits, ~12% relative rounding) adds its error once per linear along
that chain; the LoRA gradients are what we train on, so the backward stays exact up to bf16. The speed cost is
bounded: with frozen weights a step is forward (1 matmul per linear) + dX (1 matmul), so fp8 forward alone speeds
the matmul part by at most 2/(1 + 1/2) = 1.33x on a 2x-faster fp8 kernel. `backward="e5m2"` is the faster option
(tested, numbers in tests/test_fp8_matmul.py): dY is scaled per row with the weight's per-output-row scale folded in
first (`dX = (dY * s_w) @ w8`, the scale sits on the contraction dim so it cannot be a kernel scale) and the weight
is fed transposed (a column-major view `w8.t().contiguous().t()`, one fp8 copy per call).

Gate (`scaled_mm_ok`): `torch._scaled_mm` exists, in/out features are multiples of 16 (the kernel's requirement), and
the input is on a CUDA device with capability >= 8.9 (fp8 tensor cores), or `force=True` (tests run the CPU kernel,
which torch 2.13 has, to check the numerics). Anything else falls back to the dequantize path in `Fp8Linear`.

Why not torchao's float8 training (`torchao.float8.convert_to_float8_training`): it targets training the weights
(dynamic e4m3 scaling of bf16 master weights, e5m2 gradients, dW in fp8) and is not installed here; for a frozen
weight already stored in e4m3 with our scales it would re-quantize it every step and add a dependency. What we need
is ~100 lines: quantize the activation, call the kernel, and a chosen backward.
"""

from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX, E5M2_MAX = torch.finfo(E4M3).max, torch.finfo(E5M2).max
BACKWARDS = ("dequant", "e5m2")


def scaled_mm_ok(x: torch.Tensor, weight: torch.Tensor, force: bool = False) -> bool:
    """Can `x @ weight.T` go through `torch._scaled_mm` (see the module docstring for the rule)?"""
    if not hasattr(torch, "_scaled_mm") or weight.dtype != E4M3:
        return False
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        return False
    if force:
        return True
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


def rowwise_ok(device: torch.device) -> bool:
    """Does `_scaled_mm` take one scale per row/column here? CPU: yes; CUDA: Hopper (9.0) and newer."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0))


def quantize_rows(x: torch.Tensor, fmt: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D `x` -> (`x8` in `fmt`, fp32 scale (M, 1) or ()) with `x = x8 * scale`, amax scaled to the format's max."""
    top = E4M3_MAX if fmt == E4M3 else E5M2_MAX
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()
    scale = (amax.float() / top).clamp(min=1e-12)
    return (x.float() / scale).clamp(-top, top).to(fmt), scale


def _mm(a8, sa, b8, sb, out_dtype, rowwise: bool, device) -> torch.Tensor:
    """`(a8 * sa) @ (b8 * sb)` through `_scaled_mm`. CUDA's rowwise kernel outputs bf16 only: cast afterwards."""
    kernel_dtype = torch.bfloat16 if rowwise and device.type == "cuda" else out_dtype
    return torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=kernel_dtype).to(out_dtype)


class Fp8ScaledMmFn(torch.autograd.Function):
    """`F.linear(x, dequantize(w8, s_w), bias)` with the forward matmul in fp8 (`_scaled_mm`). Saves `w8` (not a
    dequantized copy) for the input gradient."""

    @staticmethod
    def forward(ctx, x, w8, scale_w, bias, out_dtype, backward):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rowwise = rowwise_ok(x.device)
        x8, sx = quantize_rows(x2, E4M3, rowwise)
        n = w8.shape[0]
        per_row_w = scale_w is not None and scale_w.numel() > 1
        if rowwise:
            sw = (scale_w.float().reshape(1, n) if per_row_w else
                  (scale_w.float() if scale_w is not None else torch.ones((), device=x.device)).expand(1, n))
            out = _mm(x8, sx, w8.t(), sw.contiguous(), out_dtype, True, x.device)
        else:  # per-tensor kernel: a per-row weight scale multiplies the output columns afterwards
            sw = torch.ones((), device=x.device) if scale_w is None or per_row_w else scale_w.float().reshape(())
            out = _mm(x8, sx.reshape(()), w8.t(), sw, torch.float32 if per_row_w else out_dtype, False, x.device)
            if per_row_w:
                out = (out * scale_w.float()).to(out_dtype)
        if bias is not None:
            out = out + bias.to(out_dtype)
        ctx.save_for_backward(w8, scale_w)
        ctx.backward_mode, ctx.has_bias, ctx.in_dtype = backward, bias is not None, x.dtype
        return out.reshape(*shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_out):
        from dev2pro.flux.fp8 import dequantize

        w8, scale_w = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.backward_mode == "e5m2" and scaled_mm_ok(g2, w8, force=True):
                grad_x = input_grad_e5m2(g2, w8, scale_w)
            else:
                grad_x = g2 @ dequantize(w8, scale_w, g2.dtype)
            grad_x = grad_x.to(ctx.in_dtype).reshape(*grad_out.shape[:-1], w8.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g2.sum(0)
        return grad_x, None, None, grad_bias, None, None


def input_grad_e5m2(g2: torch.Tensor, w8: torch.Tensor, scale_w: torch.Tensor | None) -> torch.Tensor:
    """`dX = dY @ (w8 * s_w)` with dY in e5m2 (per-row scale, the weight scale folded in first) and w8 in e4m3."""
    if scale_w is not None:
        g2 = g2.float() * scale_w.float().reshape(1, -1)
    rowwise = rowwise_ok(g2.device)
    g8, sg = quantize_rows(g2, E5M2, rowwise)
    k = w8.shape[1]
    b = w8.t().contiguous().t()  # (N, K) column-major, as `_scaled_mm` wants its second operand
    ones = torch.ones((1, k) if rowwise else (), device=g2.device)
    return _mm(g8, sg if rowwise else sg.reshape(()), b, ones, torch.float32, rowwise, g2.device)


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale_w: torch.Tensor | None, bias: torch.Tensor | None,
               backward: str = "dequant") -> torch.Tensor:
    """The fp8-matmul linear (call `scaled_mm_ok` first). The output dtype follows autocast when it is on (as
    `F.linear` would), else the input's dtype."""
    if backward not in BACKWARDS:
        raise ValueError(f"unknown fp8 matmul backward '{backward}' (choose from {', '.join(BACKWARDS)})")
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return Fp8ScaledMmFn.apply(x, w8, scale_w, bias, out_dtype, backward)
