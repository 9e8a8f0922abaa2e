"""The toy world's automatic judge: a small CNN probe trained on generator images, plus the distribution metrics.

What: `JudgeNet` reads a (b, 3, 32, 32) image in [-1, 1] and predicts each scene attribute (`world.ATTRIBUTES`: each
object's colour and size, object 1 being the left or top one, and their relation) and whether the image is in the
held-out "zxq" style; its penultimate layer gives `features` for a Frechet distance (FID's formula on our own features)
and a diversity score (mean pairwise feature distance). `Judge.score(images, captions)` turns those into per-image
prompt adherence (fraction of the attributes the caption names that the probe recovers) and style probability. The
shipped weights (`assets/toy/judge.safetensors`) are trained by `train_judge` (also `dev2pro toy judge`) on styled and
plain images, so attributes are read through the style too.

Reference: Heusel et al. 2017 (FID): d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)); the trace of the
matrix square root is computed as sum(sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))), symmetric and stable, in float64.
Pitfalls: Frechet distances from few samples are biased upwards (compare only equal sample counts); the judge is
trained with light noise and blur so slightly imperfect model samples are still read, but it is a probe of this
world only, not a perceptual metric.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dev2pro.toy import world

CLASS_NAMES: dict[str, tuple[str, ...]] = {**world.VALUES, "style": ("plain", "styled")}
HEADS: dict[str, int] = {k: len(v) for k, v in CLASS_NAMES.items()}
FEATURE_DIM = 64


class JudgeNet(nn.Module):
    """conv(16) -> conv(24) -> pool -> conv(48) -> pool -> conv(64) -> pool -> linear(64) features -> one linear
    head per attribute (about 9M multiply-adds per image: cheap on a CPU). Spatial layout is kept until the linear
    layer, so position is readable."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(),
            nn.Conv2d(16, 24, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(24, 48, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),  # 8x8
            nn.Conv2d(48, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(64 * 16, feature_dim), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = self.body(images)
        return f, {k: head(f) for k, head in self.heads.items()}


def _prepare(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (b, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    x = images.detach().float().clamp(-1, 1)
    if x.shape[-2:] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        x = nn.functional.interpolate(x, size=(world.IMAGE_SIZE, world.IMAGE_SIZE), mode="area")
    return x


@dataclass
class Judge:
    """A trained `JudgeNet` with the scoring API used by `dev2pro compare` and the demo."""

    net: JudgeNet

    @classmethod
    def load(cls, path: str | Path | None = None) -> Judge:
        """The shipped judge (or weights at `path`)."""
        from safetensors.torch import load_file

        from dev2pro.toy.assets import asset_path

        p = Path(path) if path is not None else asset_path("judge.safetensors")
        net = JudgeNet()
        net.load_state_dict(load_file(str(p)), strict=True)
        return cls(net.eval())

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().float().contiguous() for k, v in self.net.state_dict().items()}
        save_file(tensors, str(path), metadata={"dev2pro": json.dumps(meta or {})})

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(features (b, 64), {attribute: probabilities (b, classes)})."""
        x = _prepare(images)
        feats, probs = [], {k: [] for k in HEADS}
        for i in range(0, x.shape[0], batch):
            f, logits = self.net(x[i : i + batch])
            feats.append(f)
            for k, v in logits.items():
                probs[k].append(v.softmax(-1))
        return torch.cat(feats), {k: torch.cat(v) for k, v in probs.items()}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)[0]

    def score(self, images: torch.Tensor, captions: list[str]) -> dict:
        """Per-image scores: `adherence` (b,) fraction of the caption's attributes recovered (NaN when the caption
        names none), `style` (b,) probability of the zxq style, `correct` {attribute: (b,) 1/0 or NaN when not named},
        `predicted` {attribute: list of class names}, `features` (b, 64)."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        feats, probs = self.predict(images)
        pred = {k: v.argmax(-1) for k, v in probs.items()}
        wanted = [world.parse_caption(c) for c in captions]
        correct = {}
        for k in world.ATTRIBUTES:
            col = torch.full((len(captions),), float("nan"))
            for i, w in enumerate(wanted):
                if k in w:
                    col[i] = float(CLASS_NAMES[k][int(pred[k][i])] == w[k])
            correct[k] = col
        stacked = torch.stack([correct[k] for k in world.ATTRIBUTES], 1)
        named = (~stacked.isnan()).sum(1)
        adherence = torch.where(named > 0, stacked.nan_to_num(0.0).sum(1) / named.clamp_min(1), float("nan"))
        return {
            "adherence": adherence,
            "style": probs["style"][:, 1],
            "correct": correct,
            "predicted": {k: [CLASS_NAMES[k][int(j)] for j in v] for k, v in pred.items()},
            "features": feats,
        }

    def accuracy(self, images: torch.Tensor, scenes: list[world.Scene]) -> dict[str, float]:
        """Per-attribute accuracy against the true scenes (used to validate the judge)."""
        _, probs = self.predict(images)
        out = {}
        for k in HEADS:
            truth = torch.tensor([s.labels()[k] for s in scenes])
            out[k] = float((probs[k].argmax(-1) == truth).float().mean())
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Distribution metrics on judge features


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID's formula on two feature sets (n, d): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), float64."""
    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    s = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(s @ cov_b @ s).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def diversity(feats: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance between feature vectors (0 for identical samples)."""
    f = feats.double()
    n = f.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(f, f)
    return float(d.sum() / (n * (n - 1)))


# ---------------------------------------------------------------------------------------------------------------------
# Training (our own code: the judge is part of the toy world, not a downloaded model)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light Gaussian noise and random 3x3 blur, so imperfect model samples are still read."""
    b = x.shape[0]
    noise = torch.rand(b, 1, 1, 1, generator=generator) * 0.15
    x = x + noise * torch.randn(x.shape, generator=generator)
    blur = torch.rand(b, generator=generator) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = nn.functional.conv2d(nn.functional.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    return x.clamp(-1, 1)


def _labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([s.labels()[k] for s in scenes]) for k in HEADS}


def train_judge(n_images: int = 8192, steps: int = 2000, batch: int = 64, lr: float = 3e-3, seed: int = 7,
                progress: bool = True) -> Judge:
    """Train a judge on `n_images` generator images (half styled) from stream `seed`."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    half = n_images // 2
    x_plain, _, sc_plain = world.make_batch(half, seed)
    x_style, _, sc_style = world.make_batch(n_images - half, seed, style=True)
    x = torch.cat([x_plain, x_style])
    labels = _labels(sc_plain + sc_style)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        _, logits = net(augment(x[idx].clone(), g))
        loss = sum(nn.functional.cross_entropy(logits[k], labels[k][idx]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return Judge(net.eval())


def validate(judge: Judge, n: int = 1024, seed: int = 2024) -> dict[str, float]:
    """Accuracy per attribute on fresh plain and styled images (a stream the judge never saw)."""
    xp, _, sp = world.make_batch(n // 2, seed)
    xs, _, ss = world.make_batch(n - n // 2, seed, style=True)
    return judge.accuracy(torch.cat([xp, xs]), sp + ss)
