"""fp8 weight storage for the Flux transformer: quantize, dequantize, an fp8 `nn.Linear`, and module surgery.

Recipe (float8_e4m3fn: 4 exponent bits, 3 mantissa bits, max 448, no infinities):

- `none`: a plain cast `w.to(float8_e4m3fn)` (clamped to +-448 first), the layout of the published fp8 reposts
  (Kijai's flux1-dev-fp8, the dev2pro fp8 repost). Trained Flux weights have std ~0.02, so most of them fall below
  e4m3's smallest normal number (2^-6 = 0.0156) into the subnormal range, where the spacing is a fixed 2^-9 = 0.002:
  small weights lose most of their relative precision.
- `tensor`: one fp32 scale per weight, `scale = amax(|w|) / 448`, `w8 = (w / scale).to(e4m3)`; the real weight is
  `w8 * scale` (ComfyUI's "scaled fp8": per-layer `scale_weight` plus a `scaled_fp8` marker tensor). The whole
  tensor now uses the normal range, so the error is the mantissa rounding, ~2^-4 relative.
- `channel` (ours): one fp32 scale per output row (`scale_weight` of shape (out,)). It helps when rows differ in
  magnitude (outlier channels, modulation rows for shift vs scale vs gate); on iid Gaussian weights it is close to
  `tensor` because every row has about the same amax. docs/formats.md has the measured numbers.

Rounding is round-to-nearest-even through `.to()`; scales are amax based (no clipping search).

What stays in high precision (bf16/fp32), and why: only the 2-D `weight`s of linears inside the double and single
blocks are quantized (attention qkv/proj, MLPs, modulation: >99% of the 12B parameters). Biases and norm scales are
1-D, tiny, and added/multiplied unscaled into every token. The embedders (`img_in`, `txt_in`, `time_in`, `vector_in`,
`guidance_in`) and the final layer are ~0.5% of the parameters but every token and every conditioning passes through
them once without a residual path to absorb errors; keeping them in bf16 costs ~64 MB over fp8 (64M parameters).
diffusers' layerwise fp8 casting makes a similar choice (`DEFAULT_SKIP_MODULES_PATTERN`: norms, patch/position
embeddings, the model's input and output projections).

`Fp8Linear` keeps the fp8 weight as a frozen parameter and dequantizes it to the input's dtype in `forward`
(bf16/fp32 compute). A small autograd function saves the fp8 weight, not the dequantized copy, for backward, so
training a LoRA on an fp8 base does not hold a high-precision copy of every weight until backward. On CUDA GPUs
with fp8 tensor cores (compute capability >= 8.9) it uses `torch._scaled_mm` when `use_scaled_mm` is set (inference
and training: `dev2pro.flux.fp8_matmul` has the activation scaling, the backward and the fallback rule).
peft LoRA wraps it like any `nn.Linear` (it is a subclass): peft reads `compute_dtype` (as it does for bitsandbytes
layers) to pick the adapter dtype, and we set it to float32, so LoRA weights are created in fp32 instead of being
cast to the base weight's fp8 dtype (peft casts adapters to the base dtype whenever it is a floating dtype, which
float8 is). `_apply` is overridden so `model.to(torch.bfloat16)` moves but does not upcast the fp8 storage.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from dev2pro.flux.fp8_matmul import BACKWARDS, fp8_linear, scaled_mm_ok

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALINGS = ("none", "tensor", "channel")

# Module paths whose linears are quantized: the transformer blocks, in both BFL and diffusers naming.
QUANTIZED_MODULES = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.\d+\.")


def is_quantized_key(key: str, shape) -> bool:
    """Does `convert` store this tensor in fp8? 2-D `.weight`s of linears inside the blocks (see module docstring)."""
    return key.endswith(".weight") and len(shape) == 2 and bool(QUANTIZED_MODULES.match(key))


def is_quantized_module(path: str) -> bool:
    return bool(QUANTIZED_MODULES.match(path + "."))


def quantize(w: torch.Tensor, scaling: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """`w` (out, in) -> (`w8` float8_e4m3fn, fp32 scale or None). Real weight: `dequantize(w8, scale)`.

    `scaling`: `none` (plain cast, scale None), `tensor` (scalar scale, shape ()), `channel` (shape (out,)).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown fp8 scaling '{scaling}' (choose from {', '.join(SCALINGS)})")
    if scaling == "none":
        return w.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    # aminmax: one pass and no |w| temporary (this runs over 12B weights in `convert`)
    if scaling == "tensor":
        lo, hi = torch.aminmax(w)
    else:
        lo, hi = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
    amax = torch.maximum(-lo.float(), hi.float())
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    s = scale.reshape(-1, *([1] * (w.ndim - 1))) if scale.ndim else scale
    x = w.float() / s  # a fresh fp32 tensor: the clamp below may work in place
    return x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    """`w8 * scale` in fp32, then cast to `dtype`. A 1-D scale is per output row (dim 0)."""
    w = w8.to(torch.float32)
    if scale is not None:
        s = scale.float()
        if s.ndim and s.numel() > 1:
            s = s.reshape(-1, *([1] * (w.ndim - 1)))
        w = w * s.reshape(()) if s.numel() == 1 else w * s
    return w.to(dtype)


def scaling_of(scale: torch.Tensor | None) -> str:
    if scale is None:
        return "none"
    return "tensor" if scale.numel() == 1 else "channel"


def relative_rms(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """`rms(approx - ref) / rms(ref)` in fp32 (0 when both are zero)."""
    ref = ref.float()
    err = (approx.float() - ref).pow(2).mean().sqrt()
    den = ref.pow(2).mean().sqrt()
    return float(err / den) if den > 0 else float(err)


class _Fp8LinearFn(torch.autograd.Function):
    """`F.linear(x, dequantize(w8, scale), bias)` that saves the fp8 weight for backward, not its dequantized copy:
    with plain `F.linear` autograd would keep one bf16/fp32 weight per layer alive until backward (the whole model
    in high precision when training a LoRA on an fp8 base). Backward dequantizes again (cheap next to the matmul)."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize(w8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        w8, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize(w8, scale, grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class Fp8Linear(nn.Linear):
    """An `nn.Linear` whose weight is stored in float8_e4m3fn (frozen) with an optional fp32 `scale_weight`
    (scalar or per output row). `forward` computes in the input's dtype. Build with `Fp8Linear.from_linear` or
    `swap_linears_to_fp8`; the state dict holds `weight` (fp8) and `scale_weight` (fp32, absent for plain fp8)."""

    # peft reads `compute_dtype` to choose the dtype of adapter weights (see module docstring): keep LoRA in fp32.
    compute_dtype = torch.float32

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scaling: str = "none",
                 device=None, bias_dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=bias_dtype)
        device = device or "meta"
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        if self.bias is not None and device != "meta":
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        scale_shape = {"none": None, "tensor": (), "channel": (out_features,)}[scaling]
        self.register_buffer("scale_weight", None if scale_shape is None else
                             torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.use_scaled_mm = False  # fp8 matmuls (`dev2pro.flux.fp8_matmul`) where the gate allows
        self.scaled_mm_force = False  # tests: take the `_scaled_mm` path on the CPU too
        self.scaled_mm_backward = "dequant"

    @property
    def scaling(self) -> str:
        return scaling_of(self.scale_weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: str = "none") -> Fp8Linear:
        """Quantize `linear.weight`; the new module shares `linear.bias` (same Parameter)."""
        w8, scale = quantize(linear.weight.detach(), scaling)
        return cls.from_quantized(w8, scale, linear.bias)

    @classmethod
    def from_quantized(cls, w8: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> Fp8Linear:
        """Wrap an already quantized weight (e.g. read from an fp8 file) without copying it."""
        out_f, in_f = w8.shape
        m = cls(in_f, out_f, bias=bias is not None, scaling=scaling_of(scale))
        m.weight = nn.Parameter(w8 if w8.dtype == FP8_DTYPE else w8.to(FP8_DTYPE), requires_grad=False)
        m.scale_weight = None if scale is None else scale.float().reshape(() if scale.numel() == 1 else (-1,))
        if bias is not None:
            m.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=bias.requires_grad)
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        if self.use_scaled_mm and x.dtype.is_floating_point and scaled_mm_ok(x, self.weight, self.scaled_mm_force):
            return fp8_linear(x, self.weight, self.scale_weight, self.bias, self.scaled_mm_backward)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return _Fp8LinearFn.apply(x, self.weight, self.scale_weight, bias)

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` must move the fp8 weight and fp32 scale between devices but never change their dtype.
        w, s = self._parameters.pop("weight"), self._buffers.pop("scale_weight")
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=w.device)).device
            if w.device != device:
                w.data = w.data.to(device)
            self._parameters["weight"] = w
            self._buffers["scale_weight"] = None if s is None else s.to(device)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.weight.dtype}, scaling={self.scaling}"


def _default_skip(path: str) -> bool:
    return not is_quantized_module(path)


def swap_linears_to_fp8(model: nn.Module, scaling: str = "none", skip=None) -> nn.Module:
    """Replace every `nn.Linear` inside the transformer blocks by an `Fp8Linear` (in place; returns `model`).

    `skip(path) -> bool` decides which linears stay as they are; by default everything outside the double/single
    blocks (embedders, final layer: see module docstring). The new modules are built on `meta` and take the
    quantized weight; biases are shared with the old modules, not copied.
    """
    skip = skip or _default_skip
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or skip(path):
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, Fp8Linear.from_linear(module, scaling))
    return model


def fp8_linears(model: nn.Module) -> dict[str, Fp8Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, Fp8Linear)}


def enable_fp8_matmul(model: nn.Module, backward: str = "dequant", force: bool = False) -> int:
    """Switch every `Fp8Linear` of `model` to fp8 matmuls (`train.fp8_matmul`); returns how many. Each layer still
    falls back to the dequantize path where `fp8_matmul.scaled_mm_ok` says no (CPU without `force`, old GPUs, shapes
    that are not multiples of 16)."""
    if backward not in BACKWARDS:
        raise ValueError(f"unknown fp8 matmul backward '{backward}' (choose from {', '.join(BACKWARDS)})")
    layers = fp8_linears(model).values()
    for lin in layers:
        lin.use_scaled_mm, lin.scaled_mm_force, lin.scaled_mm_backward = True, force, backward
    return len(layers)
