"""Comparing two transformer checkpoints by their outputs: a fixed, seeded input and the relative RMS difference of
the two models' velocities on it (what `dev2pro convert`'s output check and the fp8 benchmark report).

One model is in memory at a time; fp8 weights are dequantized to `dtype` on the fly. The numbers depend on the seed
and input size only through the input: keep `fixed_inputs`' defaults to compare with docs/formats.md.
"""

from __future__ import annotations

import torch

from dev2pro.flux import fp8 as fp8lib
from dev2pro.flux.checkpoint import load_transformer
from dev2pro.flux.models import FluxSpec


def fixed_inputs(spec: FluxSpec, seed: int = 0, latent: int = 8, txt_len: int = 8, dtype=torch.float32):
    """A fixed, seeded input for comparing two models: packed latents of a `latent x latent` latent, `txt_len` text
    tokens, t = 0.6, guidance 3.5 (ignored without a guidance embedding)."""
    from dev2pro.flux.models import image_ids, text_ids

    g = torch.Generator().manual_seed(seed)
    n = (latent // 2) ** 2
    return dict(
        x=torch.randn(1, n, spec.in_channels, generator=g).to(dtype),
        t=torch.full((1,), 0.6),
        txt=torch.randn(1, txt_len, spec.context_in_dim, generator=g).to(dtype),
        pooled=torch.randn(1, spec.vec_in_dim, generator=g).to(dtype),
        img_ids=image_ids(latent, latent), txt_ids=text_ids(txt_len), guidance=3.5,
    )


@torch.no_grad()
def model_output(model, inputs: dict) -> torch.Tensor:
    """The model's velocity on `fixed_inputs`, with the inputs cast to the model's (input embedder's) dtype."""
    from dev2pro.flux.models import predict

    dt = model.x_embedder.weight.dtype
    return predict(model, inputs["x"].to(dt), inputs["t"], inputs["txt"].to(dt), inputs["pooled"].to(dt),
                   inputs["img_ids"], inputs["txt_ids"], inputs["guidance"])


def model_output_error(ref_a, ref_b, *, seed: int = 0, dtype=torch.float32) -> float:
    """Relative RMS difference of two checkpoints' outputs on `fixed_inputs` (fp8 weights dequantized to `dtype`
    on the fly; one model in memory at a time)."""
    a = load_transformer(ref_a, dtype=dtype)
    spec = FluxSpec.from_diffusers_config(dict(a.config))
    inputs = fixed_inputs(spec, seed, dtype=dtype)
    out_a = model_output(a, inputs).float()
    del a
    b = load_transformer(ref_b, dtype=dtype)
    out_b = model_output(b, inputs).float()
    return fp8lib.relative_rms(out_b, out_a)
