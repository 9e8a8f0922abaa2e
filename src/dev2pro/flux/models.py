"""The Flux model family: architecture hyperparameters as a dataclass, presets as data, and the transformer built
from diffusers' `FluxTransformer2DModel` (we keep no private copy of the architecture).

Models are built on the `meta` device so reading a 12B checkpoint's architecture allocates nothing; weights arrive
later through `load_state_dict(..., assign=True)` (see `dev2pro.flux.checkpoint`). The packing helpers follow the BFL
reference: latents `b c (h 2) (w 2) -> b (h w) (c 2 2)`, image position ids `(0, row, col)`, text ids all zero.
The model takes `t` in [0, 1] (t = 1 is noise) and the guidance value raw (3.5, not 3500); diffusers multiplies
both by 1000 inside, as BFL does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dev2pro.errors import UserError


@dataclass(frozen=True)
class FluxSpec:
    """Architecture of a Flux transformer, in BFL's vocabulary (`flux/model.py: FluxParams`)."""

    in_channels: int = 64
    vec_in_dim: int = 768  # CLIP pooled
    context_in_dim: int = 4096  # T5 hidden
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    guidance_embed: bool = True
    mlp_ratio: float = 4.0  # fixed at 4 by diffusers; kept for documentation and checks
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise UserError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if self.mlp_ratio != 4.0:
            raise UserError("diffusers' FluxTransformer2DModel fixes mlp_ratio at 4.0")

    def diffusers_config(self) -> dict:
        """kwargs of `FluxTransformer2DModel(...)`."""
        return dict(
            patch_size=1,
            in_channels=self.in_channels,
            out_channels=None,
            num_layers=self.depth,
            num_single_layers=self.depth_single_blocks,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_in_dim,
            pooled_projection_dim=self.vec_in_dim,
            guidance_embeds=self.guidance_embed,
            axes_dims_rope=tuple(self.axes_dim),
        )

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> FluxSpec:
        if cfg.get("patch_size", 1) != 1:
            raise UserError(f"unsupported patch_size {cfg.get('patch_size')} (Flux uses 1)")
        out = cfg.get("out_channels")
        if out not in (None, cfg.get("in_channels", 64)):
            raise UserError(f"unsupported out_channels {out} != in_channels")
        heads = cfg.get("num_attention_heads", 24)
        return cls(
            in_channels=cfg.get("in_channels", 64),
            vec_in_dim=cfg.get("pooled_projection_dim", 768),
            context_in_dim=cfg.get("joint_attention_dim", 4096),
            hidden_size=heads * cfg.get("attention_head_dim", 128),
            num_heads=heads,
            depth=cfg.get("num_layers", 19),
            depth_single_blocks=cfg.get("num_single_layers", 38),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
        )

    def replace(self, **changes) -> FluxSpec:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count from the formulas (no allocation)."""
        h, m = self.hidden_size, self.mlp_hidden
        lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
        mlp_embed = lambda i: lin(i, h) + lin(h, h)  # noqa: E731
        n = lin(self.in_channels, h) + lin(self.context_in_dim, h) + mlp_embed(256) + mlp_embed(self.vec_in_dim)
        n += mlp_embed(256) if self.guidance_embed else 0
        double = 2 * (lin(h, 6 * h) + lin(h, 3 * h) + lin(h, h) + 2 * self.head_dim + lin(h, m) + lin(m, h))
        single = lin(h, 3 * h + m) + lin(h + m, h) + lin(h, 3 * h) + 2 * self.head_dim
        n += self.depth * double + self.depth_single_blocks * single
        n += lin(h, 2 * h) + lin(h, self.in_channels)
        return n


# Presets are data. Real sizes from BFL's flux/util.py; small ones for tests, benchmarks and the toy world.
PRESETS: dict[str, FluxSpec] = {
    "flux-dev": FluxSpec(),
    "flux-schnell": FluxSpec(guidance_embed=False),
    # One double and one single block at the real width: what diffusers' BFL converter (hard-coded 3072) accepts.
    "flux-1block": FluxSpec(depth=1, depth_single_blocks=1, context_in_dim=64, vec_in_dim=32),
    # Mid-size (~0.2B) for memory and speed measurements on a CPU.
    "flux-mid": FluxSpec(hidden_size=768, num_heads=6, depth=4, depth_single_blocks=8, context_in_dim=512,
                         vec_in_dim=256),
    # Tiny models for unit tests: seconds on a CPU. Input dims match the toy world (dev2pro.toy.world defaults:
    # 4 * 12 latent channels per packed token, text context 64, pooled 32), so tests run them with the toy encoders.
    "tiny-dev": FluxSpec(in_channels=48, vec_in_dim=32, context_in_dim=64, hidden_size=32, num_heads=2, depth=1,
                         depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=True),
    "tiny-pro": FluxSpec(in_channels=48, vec_in_dim=32, context_in_dim=64, hidden_size=32, num_heads=2, depth=1,
                         depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=False),
    # The toy world's shipped models (dev2pro.toy, ~1.8M parameters): pro = CFG teacher, dev = distilled student.
    "toy-pro": FluxSpec(in_channels=48, vec_in_dim=32, context_in_dim=64, hidden_size=128, num_heads=4, depth=2,
                        depth_single_blocks=2, axes_dim=(8, 12, 12), guidance_embed=False),
    "toy-dev": FluxSpec(in_channels=48, vec_in_dim=32, context_in_dim=64, hidden_size=128, num_heads=4, depth=2,
                        depth_single_blocks=2, axes_dim=(8, 12, 12), guidance_embed=True),
}


def get_preset(name: str) -> FluxSpec:
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def build_transformer(spec: FluxSpec, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """A `FluxTransformer2DModel` for `spec`. On `meta` nothing is allocated; load weights with `assign=True`."""
    from diffusers import FluxTransformer2DModel

    spec.validate()
    with torch.device(device):
        model = FluxTransformer2DModel(**spec.diffusers_config())
    if dtype is not None and device != "meta" and dtype != torch.float32:
        model = model.to(dtype)
    return model


def _init_tensor(name: str, t: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    if name.endswith("bias"):
        t.zero_()
    elif t.ndim == 1:
        t.fill_(1.0)
    else:
        t.normal_(0.0, std, generator=generator)


def init_weights(model: torch.nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Initialise a (materialised) model like a trained one: linear weights normal(0, std), biases zero, norm
    scales one. Used for random presets in tests, benchmarks and the toy world before training."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            _init_tensor(name, p, std, generator)


def iter_random_weights(spec: FluxSpec, seed: int = 0, std: float = 0.02):
    """`(name, tensor)` of `random_transformer(spec, seed, std)`, drawn one tensor at a time (same values): a seeded
    preset loaded into a sharded model without materialising it whole."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in build_transformer(spec, device="meta").named_parameters():
        t = torch.empty(p.shape)
        _init_tensor(name, t, std, generator)
        yield name, t


def random_transformer(spec: FluxSpec, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32):
    """A materialised, seeded random model (CPU, float32 init then cast)."""
    model = build_transformer(spec, device="cpu")
    init_weights(model, std=std, generator=torch.Generator().manual_seed(seed))
    # diffusers warns on every `.to(dtype)` of a ModelMixin; only cast when it changes something.
    return model if dtype == torch.float32 else model.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Packing and position ids (BFL flux/sampling.py: prepare, unpack)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """`b c (h 2) (w 2) -> b (h w) (c 2 2)`."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latent height `h` and width `w`."""
    b, n, d = x.shape
    c = d // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids `(0, row, col)` for an `h x w` latent (packed tokens: h/2 x w/2), shape (h/2 * w/2, 3)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def text_ids(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(n, 3, device=device, dtype=dtype)


def has_guidance_embed(model) -> bool:
    return bool(model.config.guidance_embeds)


def predict(model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor,
            img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: float | torch.Tensor | None = None):
    """Velocity prediction `v = eps - x0` for packed tokens `x` at times `t` (shape (b,), in [0, 1]).

    `guidance` is ignored for models without a guidance embedding (pro/schnell/toy teacher) and required otherwise.
    """
    b = x.shape[0]
    g = None
    if has_guidance_embed(model):
        if guidance is None:
            raise ValueError("this model has a guidance embedding: pass a guidance value")
        g = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).expand(b) if not (
            torch.is_tensor(guidance) and guidance.ndim == 1) else guidance.to(x.device)
    return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0]
