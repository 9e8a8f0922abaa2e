"""The two interfaces the transformer's neighbours implement, and the helpers both real implementations share.

Every recipe, cache and command talks to these interfaces (duck-typed; any object with these members works):

    Autoencoder
        identity: str           stable fingerprint of class + weights + scaling (part of latent cache keys)
        latent_channels: int    16 for Flux
        downsample: int         8 for Flux (pixels per latent cell)
        encode(images) -> latents   images (b, 3, H, W) float in [-1, 1]; latents (b, C, H/d, W/d) float32,
                                    normalised (Flux: z = 0.3611 * (mean - 0.1159), the distribution *mean*)
        decode(latents) -> images   inverse scaling first, images float32 in [-1, 1]

    TextEncoder
        identity: str; context_dim: int (T5 width, 4096); pooled_dim: int (CLIP-L, 768); max_length: int
        encode(prompts: list[str]) -> (txt (b, max_length, context_dim) float32, pooled (b, pooled_dim) float32)

Real implementations: `dev2pro.flux.autoencoder` (`load_autoencoder`) and `dev2pro.flux.text_encoders`
(`load_text_encoder`); `"toy"` resolves to the toy world's components through `dev2pro.flux.providers`.

Freeing: trainers call `free(encoder)` after caching; it moves the weights to the `meta` device (memory returns even
if some reference survives) and empties the CUDA cache.
"""

from __future__ import annotations

import gc
import hashlib
import re
from typing import Protocol, runtime_checkable

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@runtime_checkable
class Autoencoder(Protocol):
    identity: str
    latent_channels: int
    downsample: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextEncoder(Protocol):
    identity: str
    context_dim: int
    pooled_dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def weights_fingerprint(*modules: torch.nn.Module, samples: int = 64) -> str:
    """A stable hash of the weights (names, shapes, dtypes and a strided sample of each tensor's values), independent
    of the file format the weights came from. Cheap even for T5-XXL: a few values per tensor leave the device."""
    h = hashlib.sha256()
    for module in modules:
        for name, p in module.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            if p.device.type == "meta" or p.numel() == 0:
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def free(obj) -> None:
    """Release an encoder's memory: its weights move to `meta`, which drops their storage at once (usable references
    die with them). Use after caching: `free(text_encoder); del text_encoder`.

    Only when CUDA is in use are the Python and CUDA caches emptied as well (`gc.collect()` so that blocks held by
    reference cycles return to the caching allocator, then `empty_cache()`): a collection walks the whole heap, about
    0.25 s in a large process, which was most of a tiny CPU run's fixed cost (bench/train_vs_diffusers.py) and frees
    nothing a CPU run needs."""
    if obj is None:
        return
    if hasattr(obj, "release"):
        obj.release()
    elif isinstance(obj, torch.nn.Module):
        obj.to("meta")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def looks_like_hub_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", ref)) and not ref.endswith((".safetensors",) + PICKLE_SUFFIXES)


def one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

