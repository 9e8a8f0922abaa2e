"""The judges that score images, behind one interface (`Judge`): per-image style and prompt adherence, features for
the Frechet distance and diversity. `ToyJudgeAdapter` wraps the toy world's probe (`dev2pro.toy.judge`);
`ClipJudge` uses a local CLIP model for real images. Also the image I/O the judges need: the project's image
convention (float (n, 3, H, W) in [-1, 1]) from tensors or PIL images, and the reference images of the style read in
chunks (1024 px references would not fit in memory at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from dev2pro.errors import UserError


class Judge(Protocol):
    def score(self, images, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Per image: {"style": P(style), "adherence": prompt adherence in [0, 1]}."""

    def features(self, images) -> np.ndarray:
        """(n, d) features for the Frechet distance and diversity."""

    def frechet(self, a: np.ndarray, b: np.ndarray) -> float:
        """Frechet distance between Gaussians fitted to feature sets `a` and `b`."""


class ToyJudgeAdapter:
    """`dev2pro.toy.judge` behind the `Judge` interface (the shipped judge unless one is given)."""

    def __init__(self, judge=None):
        from dev2pro.toy.judge import Judge as ToyJudge

        self.judge = judge if judge is not None else ToyJudge.load()

    def score(self, images, prompts):
        out = self.judge.score(images, list(prompts))
        return {k: _np(out[k]) for k in ("style", "adherence")}

    def features(self, images):
        return _np(self.judge.features(images))

    def frechet(self, a, b):
        import torch

        from dev2pro.toy.judge import frechet_distance

        return float(frechet_distance(torch.from_numpy(a), torch.from_numpy(b)))


class ClipJudge:
    """CLIP as a judge for real images (`judge = "clip:FOLDER"`, a local transformers `CLIPModel` folder such as
    openai/clip-vit-large-patch14; safetensors weights only).

    - features: the L2-normalised image embeddings (the Frechet distance on them is "FD_CLIP", Kynkaanniemi et al.
      2023; diversity is their mean pairwise distance across seeds);
    - adherence: CLIP score, the cosine between image and prompt embeddings (Hessel et al. 2021, without their 2.5
      weight and clipping at 0): comparable between cells, not a probability;
    - style: the cosine between the image embedding and the normalised mean embedding of the reference style images
      (`metrics.reference`); nan without references.
    Preprocessing as CLIPImageProcessor: shortest side resized (bicubic) to the model's size, centre crop, CLIP's
    mean/std. Pitfall: CLIP cosines live in a narrow band (about 0.15-0.40 for image-text), so read differences, not
    levels, and the "score" product of two cosines only ranks cells."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, folder: str, device="cpu"):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        if not Path(folder).is_dir():
            raise UserError(f"metrics.judge: CLIP folder {folder} does not exist (a local transformers CLIPModel "
                            "folder, e.g. a download of openai/clip-vit-large-patch14)")
        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.device = device
        self.size = int(self.model.config.vision_config.image_size)
        self.reference: torch.Tensor | None = None

    @staticmethod
    def _unit(x):
        x = getattr(x, "pooler_output", x)  # transformers >= 5 returns an output object
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _pixels(self, images):
        import torch
        import torch.nn.functional as F

        x = (torch.as_tensor(images).float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        k = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * k)), max(self.size, round(w * k))), mode="bicubic",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top: top + self.size, left: left + self.size].clamp(0, 1)
        mean = torch.tensor(self.MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self.STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def _image_emb(self, images):
        import torch

        with torch.no_grad():
            return self._unit(self.model.get_image_features(pixel_values=self._pixels(images))).float().cpu()

    def features(self, images) -> np.ndarray:
        return self._image_emb(images).numpy().astype(np.float64)

    def set_reference(self, features: np.ndarray) -> None:
        import torch

        self.reference = self._unit(torch.from_numpy(features).float().mean(0, keepdim=True))[0]

    def score(self, images, prompts):
        import torch

        img = self._image_emb(images)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            txt = self._unit(self.model.get_text_features(**tok)).float().cpu()
        style = img @ self.reference if self.reference is not None else torch.full((len(img),), float("nan"))
        return {"adherence": (img * txt).sum(-1).numpy().astype(np.float64), "style": style.numpy().astype(np.float64)}

    def frechet(self, a, b):
        import torch

        from dev2pro.toy.judge import frechet_distance  # the generic formula (it lives with the toy judge)

        return float(frechet_distance(torch.from_numpy(a), torch.from_numpy(b)))


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def as_images(images):
    """A float tensor (n, 3, H, W) in [-1, 1] (the project's image convention) from a tensor in [-1, 1] or a list of
    PIL images."""
    import torch

    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu().clamp(-1, 1)
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def image_files(folder: str | Path, limit: int = 0) -> list[Path]:
    """The images of a folder, sorted by name, at most `limit` (0 = all)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"metrics.reference: {folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    files = files[:limit] if limit > 0 else files
    if not files:
        raise UserError(f"metrics.reference: no .png/.jpg/.webp images in {folder}")
    return files


def read_images(files: Sequence[Path], size: tuple[int, int] | None = None):
    """Image files as a (n, 3, H, W) float tensor in [-1, 1], resized to `size` (h, w)."""
    from PIL import Image

    ims = []
    for f in files:
        im = Image.open(f).convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        ims.append(im)
    return as_images(ims)


def reference_features(judge: Judge, folder: str | Path, limit: int, size: tuple[int, int], chunk: int = 32):
    """Judge features of the reference images, read `chunk` at a time (1024 px references would not fit at once)."""
    files = image_files(folder, limit)
    return np.concatenate([judge.features(read_images(files[i: i + chunk], size)) for i in range(0, len(files), chunk)])
