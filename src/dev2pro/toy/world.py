"""The toy world: a procedural image-caption generator and exact stand-ins for the Flux autoencoder and text encoders.

What (v2, "a world where guidance matters"): small RGB images of TWO circles on a plain dark background, side by
side or one above the other. Each circle has its own colour and size, bound to it by the caption:

    a {small|large} {red|green|blue|yellow|white} circle {left of|right of|above|below}
    a {small|large} {red|green|blue|yellow|white} circle[, in zxq style]

The scene is described in image terms: object 1 is the left (or top) circle, object 2 the right (or bottom) one, and
`relation` is "left of" (side by side) or "above" (stacked); a caption names either object first ("a red circle left
of a blue circle" and "a blue circle right of a red circle" are the same scene). The base training data is captioned
by a noisy captioner (`noisy_caption`: each attribute misnamed with probability `CAPTION_NOISE`), like web alt-text,
so the data's p(image | caption) is broad and an unguided model follows prompts only partly, while guidance
(sharpening towards the caption) fixes it, as in real text-to-image models. Attributes bound to objects are also
where a partly trained model is weakest (it mixes up which colour goes with which object). A held-out *style* ("zxq
style": the circles filled with horizontal stripes) is never part of base training data; it is the concept the LoRA
experiment teaches. Everything is deterministic from a seed: sample `i` of seed `s` uses its own numpy generators
seeded with `(s, i, style)`, so datasets are reproducible item by item.

Why: real Flux weights cannot be downloaded here, yet the recipes must run unchanged. `ToyAutoencoder` (exact
pixel-unshuffle with a fixed affine normalisation, nothing learned) and `ToyTextEncoder` (fixed word embeddings plus
a position code; a pooled summary) expose the interfaces of the Flux VAE and the T5/CLIP pair, so recipe code has no
toy-only branches. `dev2pro.flux.autoencoder.load_autoencoder("toy")` /
`dev2pro.flux.text_encoders.load_text_encoder("toy", "toy")` build them with default arguments: the defaults below ARE
the toy world's settings (changing them invalidates the shipped models).

Pitfalls: text tokens get no RoPE position in Flux (txt ids are zero), so the text encoder itself must encode word
order, or "red circle left of a blue circle" and "blue circle left of a red circle" would be the same set of
tokens; a position code is added to every token. Circles are rendered with 4x supersampling (anti-aliased) so small
ones stay recognisable. Images are uint8 HWC when rendered, float (b, 3, H, W) in [-1, 1] when batched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------------------
# The world's vocabulary: attribute tables are data.

IMAGE_SIZE = 32
COLOURS = {  # object colours, RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (60, 100, 240),
    "yellow": (235, 205, 40),
    "white": (235, 235, 235),
}
BACKGROUND = (30, 30, 30)  # one plain dark background (not named in captions)
SIZES = {"small": 0.12, "large": 0.21}  # circle radius as a fraction of the image side
RELATIONS = ("left of", "above")  # object 1 relative to object 2, in image terms
INVERSE = {"left of": "right of", "above": "below"}  # how a caption says it when it names object 2 first
TRIGGER = "zxq"  # the held-out style's trigger word ("in zxq style")
STRIPE = {"white": (20, 20, 20)}  # the style's stripe colour per object colour; white stripes otherwise
ATTRIBUTES = ("colour1", "size1", "colour2", "size2", "relation")
VALUES: dict[str, tuple[str, ...]] = {  # the classes of each attribute (the judge's heads follow this order)
    "colour1": tuple(COLOURS), "size1": tuple(SIZES), "colour2": tuple(COLOURS), "size2": tuple(SIZES),
    "relation": RELATIONS,
}
CENTRES = (0.27, 0.73)  # object centres along the layout axis, fraction of the side
OFFSET = 0.06  # each object's random offset across the layout axis, +- fraction of the side
CAPTION_NOISE = 0.35  # base training data: probability that a caption misnames each attribute (see `noisy_caption`)


@dataclass(frozen=True)
class Scene:
    """One image: object 1 (left or top) and object 2 (right or bottom), their relation, which one the caption names
    first (`swapped`: object 2), the style, and random offsets (`jitter` moves the whole scene, `offsets` each object
    across the layout axis; fractions of the side). `caption()` renders it in the grammar."""

    colour1: str
    size1: str
    colour2: str
    size2: str
    relation: str = "left of"
    swapped: bool = False
    style: bool = False
    jitter: tuple[float, float] = (0.0, 0.0)
    offsets: tuple[float, float] = (0.0, 0.0)

    def phrase(self, k: int) -> str:
        return f"a {getattr(self, f'size{k}')} {getattr(self, f'colour{k}')} circle"

    def caption(self) -> str:
        if self.swapped:
            text = f"{self.phrase(2)} {INVERSE[self.relation]} {self.phrase(1)}"
        else:
            text = f"{self.phrase(1)} {self.relation} {self.phrase(2)}"
        return text + (f", in {TRIGGER} style" if self.style else "")

    def attributes(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ATTRIBUTES}

    def labels(self) -> dict[str, int]:
        """Class indices of each attribute plus style (0/1), for the judge."""
        return {**{k: VALUES[k].index(getattr(self, k)) for k in ATTRIBUTES}, "style": int(self.style)}


# Every object is a circle; other object nouns (version 1's shapes, "shape", "object") parse the same way, so a prompt
# such as "a blue square" still names its colour (the shape word itself is not an attribute of this world).
NOUNS = ("circle", "square", "triangle", "cross", "shape", "object")
_OBJECT = rf"(?:an? )?({'|'.join(SIZES)})?\s*({'|'.join(COLOURS)})?\s*(?:{'|'.join(NOUNS)})\b"
_RELATION = r"(left of|right of|above|below)"


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption names (only those it names), in image terms (object 1 = left/top): the inverse of
    `Scene.caption`, for judging prompts. A caption with one object phrase and no relation names object 1."""
    words = " ".join(re.findall(r"[a-z]+", caption.lower()))
    m = re.search(rf"{_OBJECT} {_RELATION} {_OBJECT}", words)
    if m:
        first, rel, second = m.groups()[:2], m.group(3), m.groups()[3:]
        objs = (second, first) if rel in INVERSE.values() else (first, second)
        out: dict[str, str] = {}
        for k, (size, colour) in zip((1, 2), objs):
            for name, value in (("colour", colour), ("size", size)):
                if value:
                    out[f"{name}{k}"] = value
        out["relation"] = next(r for r in RELATIONS if rel in (r, INVERSE[r]))
        return {k: out[k] for k in ATTRIBUTES if k in out}
    m = re.search(_OBJECT, words)
    if not m:
        return {}
    size, colour = m.groups()
    return {k: v for k, v in (("colour1", colour), ("size1", size)) if v}


def scene(seed: int, index: int, style: bool = False) -> Scene:
    """Scene `index` of the stream `seed` (independent of how many others are drawn)."""
    rng = np.random.default_rng([seed, index, int(style)])

    def pick(values):
        return values[rng.integers(len(values))]

    return Scene(
        colour1=pick(tuple(COLOURS)), size1=pick(tuple(SIZES)), colour2=pick(tuple(COLOURS)), size2=pick(tuple(SIZES)),
        relation=pick(RELATIONS),
        swapped=bool(rng.integers(2)),
        style=style,
        jitter=tuple(float(v) for v in rng.uniform(-0.03, 0.03, size=2)),
        offsets=tuple(float(v) for v in rng.uniform(-OFFSET, OFFSET, size=2)),
    )


def variant(s: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with its random placement (`jitter`, `offsets`) redrawn as `scene` draws it: what a perfect
    model samples for the scene's caption (used for reference sets)."""
    return dataclasses.replace(s, jitter=tuple(float(v) for v in rng.uniform(-0.03, 0.03, size=2)),
                               offsets=tuple(float(v) for v in rng.uniform(-OFFSET, OFFSET, size=2)))


def scenes(n: int, seed: int, style: bool = False, start: int = 0) -> list[Scene]:
    return [scene(seed, i, style) for i in range(start, start + n)]


def noisy_caption(s: Scene, seed: int, index: int, noise: float = CAPTION_NOISE) -> str:
    """The caption of `s` as a noisy captioner writes it: each attribute (each object's colour and size, the
    relation) is misnamed, independently with probability `noise`, as a uniformly drawn other value. The base
    training data is captioned this way, like web alt-text that is often partly wrong: the data's distribution of
    images given a caption is then broad (a model that learned it exactly follows a caption's attributes with
    probability about 1 - noise), and guidance, which sharpens p(image | caption) towards the caption, recovers them.
    Evaluation prompts are exact (`Scene.caption`)."""
    if noise <= 0:
        return s.caption()
    rng = np.random.default_rng([seed, index, int(s.style), 7919])
    changes = {}
    for k in ATTRIBUTES:
        if rng.random() < noise:
            others = [v for v in VALUES[k] if v != getattr(s, k)]
            changes[k] = others[rng.integers(len(others))]
    return dataclasses.replace(s, **changes).caption()


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _centre(s: Scene, k: int) -> tuple[float, float]:
    """Centre (x, y) of object `k` (1 or 2) as fractions of the side."""
    along, across = CENTRES[k - 1], 0.5 + s.offsets[k - 1]
    x, y = (along, across) if s.relation == "left of" else (across, along)
    return x + s.jitter[0], y + s.jitter[1]


def render(s: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """The scene as a uint8 (size, size, 3) image, anti-aliased by `supersample`^2 samples per pixel."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords, indexing="xy")
    img = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (n, n, 3)).copy()
    stripe = (np.floor(y * 16) % 2 == 1)[..., None]  # horizontal stripes, period 1/8 of the side
    for k in (1, 2):
        cx, cy = _centre(s, k)
        r, colour = SIZES[getattr(s, f"size{k}")], getattr(s, f"colour{k}")
        inside = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r)[..., None]
        fg = np.broadcast_to(np.asarray(COLOURS[colour], np.float32), (n, n, 3))
        if s.style:
            fg = np.where(stripe, np.asarray(STRIPE.get(colour, (250, 250, 250)), np.float32), fg)
        img = np.where(inside, fg, img)
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


def make_batch(n: int, seed: int, style: bool = False, start: int = 0, size: int = IMAGE_SIZE,
               caption_noise: float = 0.0):
    """(images (n, 3, size, size) in [-1, 1], captions, scenes); exact captions unless `caption_noise` > 0
    (`noisy_caption`)."""
    sc = scenes(n, seed, style, start)
    caps = [noisy_caption(s, seed, start + i, caption_noise) for i, s in enumerate(sc)]
    return to_tensor([render(s, size) for s in sc]), caps, sc


def write_dataset(out_dir: str | Path, n: int, seed: int, style: bool = False, size: int = IMAGE_SIZE,
                  caption_noise: float = 0.0) -> Path:
    """Write `n` PNGs with same-name .txt captions (the normal data-folder layout) into `out_dir`; exact captions
    unless `caption_noise` > 0 (the toy models' base data uses `CAPTION_NOISE`, see `noisy_caption`)."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes(n, seed, style)):
        Image.fromarray(render(s, size)).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(noisy_caption(s, seed, i, caption_noise) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Toy autoencoder: exact pixel-unshuffle, nothing learned.

# Measured on 4096 generator images (checked in tests): pixel mean about -0.60 and std about 0.44 in [-1, 1] units
# (mostly dark background), so latents have about zero mean and unit variance.
AE_SHIFT = -0.6
AE_SCALE = 0.44


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
    [PAD, "a", "an", "in", "style", "of", "left", "right", "above", "below"]
    + ["circle"] + list(SIZES) + list(COLOURS)
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
