"""The toy world: a procedural image-caption generator and exact stand-ins for the Flux autoencoder and text encoders.

What: small RGB images of one shape (circle, square, triangle, cross) in a colour, on a plain background, at one of
five positions and two sizes, with a caption from a fixed grammar ("a small red circle on a black background, top
left"). A held-out *style* ("zxq style": the shape filled with horizontal stripes, white, or black on white) is
never part of base training data; it is the concept the LoRA experiment teaches. Everything is deterministic from a
seed: sample `i` of seed `s` uses its own numpy generator seeded with `(s, i)`, so datasets are reproducible item by
item.

Why: real Flux weights cannot be downloaded here, yet the recipes must run unchanged. `ToyAutoencoder` (exact
pixel-unshuffle with a fixed affine normalisation, nothing learned) and `ToyTextEncoder` (fixed word embeddings plus
a position code; a pooled summary) expose the interfaces of the Flux VAE and the T5/CLIP pair, so recipe code has no
toy-only branches. `dev2pro.flux.autoencoder.load_autoencoder("toy")` /
`dev2pro.flux.text_encoders.load_text_encoder("toy", "toy")` build them with default arguments: the defaults below ARE
the toy world's settings (changing them invalidates the shipped models).

Pitfalls: text tokens get no RoPE position in Flux (txt ids are zero), so the text encoder itself must encode word
order, or "red circle on a blue background" and "blue circle on a red background" would look the same; a position
code is added to every token. Shapes are rendered with 4x supersampling (anti-aliased) so small sizes stay
recognisable. Images are uint8 HWC when rendered, float (b, 3, H, W) in [-1, 1] when batched.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------------------
# The world's vocabulary: attribute tables are data.

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # foreground colours, RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 205, 40),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
}
SIZES = {"small": 0.21, "large": 0.32}  # radius as a fraction of the image side
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
TRIGGER = "zxq"  # the held-out style's trigger word ("in zxq style")
STRIPE = {"white": (20, 20, 20)}  # colour of the style's stripes per background; white stripes otherwise
ATTRIBUTES = ("shape", "colour", "background", "size", "position")


@dataclass(frozen=True)
class Scene:
    """One image's attributes; `caption()` renders it in the grammar."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    style: bool = False
    jitter: tuple[float, float] = (0.0, 0.0)  # sub-position offset, fraction of the side

    def caption(self) -> str:
        text = f"a {self.size} {self.colour} {self.shape} on a {self.background} background, {self.position}"
        return text + (f", in {TRIGGER} style" if self.style else "")

    def labels(self) -> dict[str, int]:
        """Class indices of each attribute plus style (0/1), for the judge."""
        return {
            "shape": SHAPES.index(self.shape),
            "colour": list(COLOURS).index(self.colour),
            "background": list(BACKGROUNDS).index(self.background),
            "size": list(SIZES).index(self.size),
            "position": POSITIONS.index(self.position),
            "style": int(self.style),
        }


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption names (only those it names); the inverse of `Scene.caption` for judging prompts."""
    words = caption.lower()
    out: dict[str, str] = {}
    m = re.search(r"\b(small|large)?\s*(red|green|blue|yellow)?\s*(circle|square|triangle|cross)\b", words)
    if m:
        if m.group(1):
            out["size"] = m.group(1)
        if m.group(2):
            out["colour"] = m.group(2)
        out["shape"] = m.group(3)
    m = re.search(r"\bon an? (\w+) background", words)
    if m and m.group(1) in BACKGROUNDS:
        out["background"] = m.group(1)
    for pos in sorted(POSITIONS, key=len, reverse=True):
        if re.search(rf"\b{pos}\b", words):
            out["position"] = pos
            break
    return out


def scene(seed: int, index: int, style: bool = False) -> Scene:
    """Scene `index` of the stream `seed` (independent of how many others are drawn)."""
    rng = np.random.default_rng([seed, index, int(style)])
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        size=list(SIZES)[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        style=style,
        jitter=tuple(float(v) for v in rng.uniform(-0.03, 0.03, size=2)),
    )


def scenes(n: int, seed: int, style: bool = False, start: int = 0) -> list[Scene]:
    return [scene(seed, i, style) for i in range(start, start + n)]


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _centre(s: Scene) -> tuple[float, float]:
    """Shape centre (x, y) as fractions of the side: corners sit as far out as the radius allows, with a margin."""
    r = SIZES[s.size]
    off = 0.5 - r - 0.04
    dx = -off if "left" in s.position else off if "right" in s.position else 0.0
    dy = -off if "top" in s.position else off if "bottom" in s.position else 0.0
    return 0.5 + dx + s.jitter[0], 0.5 + dy + s.jitter[1]


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test in coordinates relative to the centre (y grows downwards), `r` the nominal radius."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base below the centre
        u = (dy + r) / (1.9 * r)
        return (u >= 0) & (u <= 1) & (np.abs(dx) <= u * 1.05 * r)
    if shape == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape '{shape}' (known: {', '.join(SHAPES)})")


def render(s: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """The scene as a uint8 (size, size, 3) image, anti-aliased by `supersample`^2 samples per pixel."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords, indexing="xy")
    cx, cy = _centre(s)
    inside = _mask(s.shape, x - cx, y - cy, SIZES[s.size]).astype(np.float32)[..., None]
    fg = np.broadcast_to(np.asarray(COLOURS[s.colour], np.float32), (n, n, 3))
    if s.style:  # horizontal stripes, period 1/8 of the side: half fg, half white
        stripe = (np.floor(y * 16) % 2 == 1)[..., None]
        fg = np.where(stripe, np.asarray(STRIPE.get(s.background, (250, 250, 250)), np.float32), fg)
    bg = np.asarray(BACKGROUNDS[s.background], np.float32)
    img = inside * fg + (1 - inside) * bg
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 HWC images -> float32 (b, 3, H, W) in [-1, 1]."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (b, 3, H, W) in [-1, 1] -> uint8 (b, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_batch(n: int, seed: int, style: bool = False, start: int = 0, size: int = IMAGE_SIZE):
    """(images (n, 3, size, size) in [-1, 1], captions, scenes)."""
    sc = scenes(n, seed, style, start)
    return to_tensor([render(s, size) for s in sc]), [s.caption() for s in sc], sc


def write_dataset(out_dir: str | Path, n: int, seed: int, style: bool = False, size: int = IMAGE_SIZE) -> Path:
    """Write `n` PNGs with same-name .txt captions (the normal data-folder layout) into `out_dir`."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes(n, seed, style)):
        Image.fromarray(render(s, size)).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(s.caption() + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Toy autoencoder: exact pixel-unshuffle, nothing learned.

# Measured on 4096 generator images (scripted in tests): pixel mean about 0.0 and std about 0.70 in [-1, 1] units.
AE_SHIFT = 0.0
AE_SCALE = 0.7


class ToyAutoencoder:
    """`encode`: (b, 3, H, W) in [-1, 1] -> (b, 3 f^2, H/f, W/f), `(pixel_unshuffle(x, f) - shift) / scale`;
    `decode` is the exact inverse. Same interface as the Flux VAE wrapper (`identity`, `latent_channels`,
    `downsample`, `encode`, `decode`)."""

    def __init__(self, factor: int = 2, shift: float = AE_SHIFT, scale: float = AE_SCALE):
        self.factor, self.shift, self.scale = factor, shift, scale
        self.latent_channels = 3 * factor * factor
        self.downsample = factor
        self.identity = f"toy-ae:unshuffle{factor}:shift{shift:g}:scale{scale:g}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (b, 3, H, W), got {tuple(images.shape)}")
        f = self.factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the factor {f}")
        z = torch.nn.functional.pixel_unshuffle(images.float(), f) if f > 1 else images.float()
        return (z - self.shift) / self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.scale + self.shift
        return torch.nn.functional.pixel_shuffle(z, self.factor) if self.factor > 1 else z

    def to(self, *args, **kwargs) -> ToyAutoencoder:  # nothing to move: lets callers treat it like a module
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Toy text encoder: fixed word embeddings + position code; pooled = fixed projection of the mean.

PAD = "<pad>"
VOCAB: tuple[str, ...] = tuple(
    [PAD, "a", "an", "on", "in", "background", "style", "small", "large", "center", "top", "bottom", "left", "right"]
    + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS)
)


def tokenize(text: str) -> list[str]:
    """Lower-case words (letters and digits); punctuation is dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _hashed_vector(word: str, dim: int, seed: int) -> torch.Tensor:
    digest = hashlib.blake2b(f"{seed}:{word}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randn(dim, generator=g)


class ToyTextEncoder:
    """Deterministic stand-in for T5 + CLIP. `encode(prompts) -> (txt (b, max_length, context_dim),
    pooled (b, pooled_dim))`, float32.

    Token `i` is `emb(word_i) + pos_i` (a fixed sinusoidal code, so word order matters); prompts are truncated or
    padded with the `<pad>` embedding to `max_length`. The pooled vector is a fixed random projection of the mean of
    the word embeddings (excluding padding) plus a fixed bias. The empty prompt is all padding and pools to the bias
    alone: a well-defined unconditional embedding. Known words come from a seeded table over the grammar's vocabulary,
    unknown words (the trigger "zxq", typos) from a hash of the word, so every string has a stable embedding."""

    def __init__(self, context_dim: int = 64, pooled_dim: int = 32, max_length: int = 16, seed: int = 1234):
        self.context_dim, self.pooled_dim, self.max_length, self.seed = context_dim, pooled_dim, max_length, seed
        self.identity = f"toy-text:d{context_dim}:p{pooled_dim}:n{max_length}:s{seed}"
        g = torch.Generator().manual_seed(seed)
        self.table = {w: v for w, v in zip(VOCAB, torch.randn(len(VOCAB), context_dim, generator=g))}
        self.proj = torch.randn(context_dim, pooled_dim, generator=g) / context_dim**0.5
        self.pooled_bias = torch.randn(pooled_dim, generator=g) * 0.5
        pos = torch.arange(max_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-torch.arange(0, context_dim, 2, dtype=torch.float32) / context_dim * np.log(100.0))
        self.positions = torch.zeros(max_length, context_dim)
        self.positions[:, 0::2] = torch.sin(pos * freq)
        self.positions[:, 1::2] = torch.cos(pos * freq)

    def embed_word(self, word: str) -> torch.Tensor:
        return self.table[word] if word in self.table else _hashed_vector(word, self.context_dim, self.seed)

    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        txt = torch.empty(len(prompts), self.max_length, self.context_dim)
        pooled = torch.empty(len(prompts), self.pooled_dim)
        for b, prompt in enumerate(prompts):
            words = tokenize(prompt)[: self.max_length]
            vecs = [self.embed_word(w) for w in words]
            mean = torch.stack(vecs).mean(0) if vecs else torch.zeros(self.context_dim)
            pooled[b] = mean @ self.proj + self.pooled_bias
            vecs += [self.table[PAD]] * (self.max_length - len(vecs))
            txt[b] = torch.stack(vecs) + self.positions
        return txt, pooled

    def to(self, *args, **kwargs) -> ToyTextEncoder:
        return self
