"""Image-caption folders: scanning, captions, repeats, aspect-ratio buckets, image loading.

What: `scan_dataset(cfg, bucket_step)` walks `data.dir` (recursively) for jpg/jpeg/png/webp images with same-name
`.txt` captions and returns a `DatasetIndex`: one `DataItem` per usable image (path, caption, bucket, repeats, sha256
of the file bytes) plus a `ScanReport` of everything that was skipped, converted or defaulted, with file names.
`load_image(item, bucket, crop, rng)` decodes one image into a (3, H, W) float tensor in [-1, 1] at its bucket.

Conventions (the ones kohya sd-scripts, ai-toolkit and SimpleTuner share; see docs/data.md):
- captions: `photo.jpg` + `photo.txt`, UTF-8 (a BOM is ignored); whitespace and line breaks collapse to single spaces.
  A file that is not valid UTF-8 is decoded as Windows-1252 (what Notepad writes) and counted in the report.
- trigger: replaces every `[trigger]` in a caption, else is prepended as `"trigger, caption"`.
- repeats: a folder named `N_name` (kohya) repeats every image below it N times; else `data.repeats`.
- buckets: sides are multiples of `bucket_step` (2 x autoencoder downsample, 16 for Flux), area <= resolution^2, the
  bucket with the closest aspect ratio is chosen, the image is resized to cover it and cropped. Images are never
  upscaled unless `data.upscale`: an image smaller than the target area gets a bucket of its own size (sides floored
  to the step), and one whose short side is below `min_bucket_side` is skipped and counted.
Reference: kohya sd-scripts `library/model_util.make_bucket_resolutions` and `BucketManager` (no-upscale mode).
Pitfalls: PIL decodes lazily, so a truncated file only fails on `load()` (done at scan time); 16-bit PNGs open in
mode "I;16", which `convert("RGB")` clips to white (scaled here instead); EXIF orientation swaps width and height;
transparent images are composited over white, not black; PIL's decompression-bomb check must not be disabled globally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import random
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from dev2pro.data.config import IMAGE_EXTS, REPEATS_DIR, DataConfig
from dev2pro.errors import DataError

log = logging.getLogger(__name__)

TRIGGER_TOKEN = "[trigger]"
EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------------------------------------------------------------
# Buckets: pure functions of (image size, resolution, step, side limits).


def bucket_limits(cfg: DataConfig, step: int) -> tuple[int, int]:
    """(min_side, max_side), multiples of `step`, derived from the resolution where the config says 0."""
    lo = cfg.min_bucket_side or cfg.resolution // 2
    hi = cfg.max_bucket_side or cfg.resolution * 2
    lo = max(step, math.ceil(lo / step) * step)
    hi = max(lo, hi // step * step)
    return lo, hi


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """Buckets (W, H) at area <= resolution^2: for each width, the largest height (multiple of `step`) that fits."""
    area = resolution * resolution
    out = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            out.add((w, h))
    if not out:
        raise DataError(
            f"no bucket fits resolution {resolution} with sides {min_side}..{max_side} in steps of {step}: "
            "raise data.resolution or lower data.min_bucket_side"
        )
    return sorted(out)


def _aspect_distance(a: tuple[int, int], b: tuple[int, int]) -> float:
    return abs(math.log(a[0] / a[1]) - math.log(b[0] / b[1]))


def choose_bucket(
    size: tuple[int, int],
    buckets: list[tuple[int, int]],
    *,
    resolution: int,
    step: int,
    min_side: int,
    max_side: int,
    upscale: bool,
) -> tuple[int, int] | None:
    """The bucket (W, H) for an image of `size` (W, H), or None when it is too small to use without upscaling.

    The closest-aspect bucket is used when the image covers it without upscaling (or `upscale` is set). Otherwise the
    image keeps its own size (shrunk to the target area if larger), sides floored to `step` and capped at `max_side`.
    """
    best = min(buckets, key=lambda b: (_aspect_distance(b, size), -b[0] * b[1]))
    if upscale or (best[0] <= size[0] and best[1] <= size[1]):
        return best
    s = min(1.0, math.sqrt(resolution * resolution / (size[0] * size[1])))
    w = min(max_side, int(size[0] * s) // step * step)
    h = min(max_side, int(size[1] * s) // step * step)
    if w < min_side or h < min_side:
        return None
    return w, h


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """Smallest size with the image's aspect ratio that covers `bucket` (the resize target before cropping)."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


# ---------------------------------------------------------------------------------------------------------------------
# Captions


def read_caption(path: Path) -> tuple[str, bool]:
    """(caption, was_utf8). Whitespace and line breaks collapse to single spaces."""
    raw = path.read_bytes()
    try:
        text, ok = raw.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        text, ok = raw.decode("cp1252", errors="replace"), False
    return " ".join(text.split()), ok


def apply_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return " ".join(caption.replace(TRIGGER_TOKEN, "").split()).strip(" ,")
    if TRIGGER_TOKEN in caption:
        return caption.replace(TRIGGER_TOKEN, trigger)
    return f"{trigger}, {caption}" if caption else trigger


def folder_repeats(rel: Path, default: int) -> int:
    """Repeats of an image at `rel` (relative to data.dir): the nearest `N_name` folder above it, else `default`."""
    for part in reversed(rel.parent.parts):
        m = REPEATS_DIR.match(part)
        if m:
            return max(1, int(m.group(1)))
    return default


# ---------------------------------------------------------------------------------------------------------------------
# Images


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit grayscale is rescaled, transparency is composited over white."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and ("transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if mode != "RGB" else img


def open_image(data: bytes) -> Image.Image:
    """Decode fully (so truncation shows here). Raises for anything PIL cannot use, bombs included."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
        img.load()
    return img


@dataclass(frozen=True)
class DataItem:
    path: Path
    caption: str
    size: tuple[int, int]  # (W, H) after EXIF orientation
    bucket: tuple[int, int]  # (W, H)
    repeats: int
    hash: str  # sha256 of the image file bytes


def load_image(
    item: DataItem | str | Path,
    bucket: tuple[int, int] | None = None,
    crop: str = "center",
    rng: random.Random | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Decode, orient, convert to RGB, resize to cover `bucket` (W, H), crop; (3, H, W) float32 in [-1, 1]."""
    path = item.path if isinstance(item, DataItem) else Path(item)
    if bucket is None:
        if not isinstance(item, DataItem):
            raise ValueError("load_image needs a bucket for a bare path")
        bucket = item.bucket
    return prepare_image(path.read_bytes(), bucket, crop, rng, flip)


def prepare_image(
    data: bytes, bucket: tuple[int, int], crop: str = "center", rng: random.Random | None = None, flip: bool = False
) -> torch.Tensor:
    """`load_image` for bytes already read (a member of a tar shard): (3, H, W) float32 in [-1, 1] at `bucket`."""
    img = to_rgb(ImageOps.exif_transpose(open_image(data)))
    size = cover_size(img.size, bucket)
    if size != img.size:
        shrink = size[0] <= img.size[0]
        img = img.resize(size, Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC)
    dx, dy = size[0] - bucket[0], size[1] - bucket[1]
    if crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    elif crop == "center":
        left, top = dx // 2, dy // 2
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Scanning


@dataclass
class ScanReport:
    """What the scan found. File lists are paths relative to data.dir."""

    folder: str = ""
    images_found: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files
    default_captions: list[str] = field(default_factory=list)  # image had no caption file
    empty_captions: list[str] = field(default_factory=list)
    non_utf8_captions: list[str] = field(default_factory=list)  # decoded as Windows-1252
    orphan_captions: list[str] = field(default_factory=list)  # caption files without an image
    converted: Counter = field(default_factory=Counter)  # source mode -> count (CMYK, I;16, P, RGBA, ...)
    rotated: int = 0  # EXIF orientation applied
    buckets: Counter = field(default_factory=Counter)  # (W, H) -> images
    items: int = 0  # images x repeats

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def images_used(self) -> int:
        return self.images_found - self.num_skipped

    def summary(self, max_names: int = 20) -> str:
        def names(files: list[str]) -> str:
            shown = ", ".join(files[:max_names])
            return shown + (f", ... and {len(files) - max_names} more" if len(files) > max_names else "")

        lines = [
            f"{self.folder}: {self.images_used} images used of {self.images_found} found, "
            f"{self.items} items with repeats, {len(self.buckets)} buckets"
        ]
        for reason, files in sorted(self.skipped.items()):
            lines.append(f"  skipped {len(files)} ({reason}): {names(files)}")
        for label, files in (
            ("no caption file, default caption used", self.default_captions),
            ("empty caption", self.empty_captions),
            ("caption not UTF-8, read as Windows-1252", self.non_utf8_captions),
            ("caption without an image, ignored", self.orphan_captions),
        ):
            if files:
                lines.append(f"  {label}: {len(files)}: {names(files)}")
        if self.converted:
            lines.append("  converted to RGB: " + ", ".join(f"{m} {n}" for m, n in sorted(self.converted.items())))
        if self.rotated:
            lines.append(f"  EXIF orientation applied: {self.rotated}")
        if self.buckets:
            top = sorted(self.buckets.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("  buckets (WxH: images): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in top))
        return "\n".join(lines)


@dataclass(frozen=True)
class DatasetIndex:
    cfg: DataConfig
    bucket_step: int
    items: tuple[DataItem, ...]
    report: ScanReport

    def __len__(self) -> int:
        return len(self.items)


def _walk(root: Path, skip_dirs: set[Path]) -> tuple[list[Path], list[Path]]:
    """(images, other files) below root, sorted; hidden files and folders (the cache among them) are left out."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n).resolve() not in skip_dirs)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            (images if Path(name).suffix.lower() in IMAGE_EXTS else others).append(d / name)
    return images, others


def _inspect(path: Path) -> tuple[str, tuple[int, int], str, bool]:
    """(sha256, oriented size, source mode, rotated) of a usable image; raises ValueError(reason) otherwise.

    Decodes, orients and converts exactly as `load_image` will, so nothing fails later in the middle of caching.
    """
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file")
    try:
        img = open_image(data)
        mode = img.mode
        rotated = img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
        img = to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"larger than PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise ValueError("not an image") from None
    except Exception as e:  # a damaged file can raise anything from inside a decoder
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"unreadable: {first or type(e).__name__}") from None
    if img.width < 1 or img.height < 1:
        raise ValueError("no pixels")
    return hashlib.sha256(data).hexdigest(), img.size, mode, rotated


def _inspect_or_reason(path: Path) -> tuple[str, tuple[int, int], str, bool] | str:
    try:
        return _inspect(path)
    except ValueError as e:
        return str(e)
    except OSError as e:  # permission denied, vanished file
        return f"cannot read: {e.strerror or e}"


FLUX_BUCKET_STEP = 16  # 2 x the Flux autoencoder's downsample of 8: latents are packed in 2x2 patches


def scan_dataset(cfg: DataConfig, bucket_step: int | None = None, progress: bool = False) -> DatasetIndex:
    """Index `cfg.dir`; raises DataError (one line) for a missing, empty or unusable folder.

    `bucket_step` is 2 x the autoencoder's downsample (`data.bucket_step` overrides it; Flux's 16 when neither is set).
    Every image is decoded here (truncated files show now, not mid-training), in `data.num_workers` threads.
    """
    cfg.validate()
    step = cfg.bucket_step or bucket_step or FLUX_BUCKET_STEP
    if step < 1:
        raise DataError(f"bucket step {step}: pass 2 x the autoencoder downsample or set data.bucket_step")
    root = Path(cfg.dir)
    if not root.exists():
        raise DataError(f"{root}: data folder not found: set data.dir to a folder of images with .txt captions")
    if not root.is_dir():
        raise DataError(f"{root}: data.dir is a file, not a folder of images")
    skip_dirs = {cfg.resolved_cache_dir().resolve()}
    images, others = _walk(root, skip_dirs)
    cap_ext = cfg.caption_ext.lower()
    captions = [p for p in others if p.suffix.lower() == cap_ext]
    report = ScanReport(folder=str(root), images_found=len(images))
    image_stems = {p.with_suffix("").as_posix().lower() for p in images}
    report.orphan_captions = [
        str(p.relative_to(root)) for p in captions if p.with_suffix("").as_posix().lower() not in image_stems
    ]
    if not images:
        if captions:
            raise DataError(
                f"{root}: {len(captions)} caption files but no images (jpg, jpeg, png, webp): "
                "put each image beside its caption"
            )
        raise DataError(f"{root}: no images (jpg, jpeg, png, webp) found in this folder or its subfolders")
    caption_of = {p.with_suffix("").as_posix().lower(): p for p in captions}

    lo, hi = bucket_limits(cfg, step)
    buckets = make_buckets(cfg.resolution, step, lo, hi)
    items = []
    seen: dict[Path, Path] = {}
    pool = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers > 0 else None
    inspected = pool.map(_inspect_or_reason, images) if pool else map(_inspect_or_reason, images)
    for path, result in tqdm(
        zip(images, inspected), total=len(images), desc="scanning", unit="img", disable=not progress, leave=False
    ):
        rel = str(path.relative_to(root))
        stem = path.with_suffix("")
        if stem in seen:  # photo.jpg and photo.png would share photo.txt
            report.skip(f"same name as {seen[stem].name}", rel)
            continue
        if isinstance(result, str):
            report.skip(result, rel)
            continue
        digest, size, mode, rotated = result
        bucket = choose_bucket(
            size, buckets, resolution=cfg.resolution, step=step, min_side=lo, max_side=hi, upscale=cfg.upscale
        )
        if bucket is None:
            report.skip(f"smaller than the smallest bucket side {lo} px", rel)
            continue
        seen[stem] = path
        cap_path = caption_of.get(stem.as_posix().lower())
        if cap_path is None:
            caption = cfg.default_caption
            report.default_captions.append(rel)
        else:
            caption, ok = read_caption(cap_path)
            if not ok:
                report.non_utf8_captions.append(str(cap_path.relative_to(root)))
            if not caption:
                report.empty_captions.append(str(cap_path.relative_to(root)))
        if mode != "RGB":
            report.converted[mode] += 1
        report.rotated += rotated
        repeats = folder_repeats(path.relative_to(root), cfg.repeats)
        items.append(DataItem(path, apply_trigger(caption, cfg.trigger), size, bucket, repeats, digest))
        report.buckets[bucket] += 1
        report.items += repeats
    if pool:
        pool.shutdown()
    if not items:
        reasons = ", ".join(f"{len(v)} {k}" for k, v in report.skipped.items())
        raise DataError(f"{root}: none of the {len(images)} images is usable ({reasons})")
    if (report.num_skipped or report.orphan_captions or report.non_utf8_captions or report.default_captions
            or report.empty_captions):  # worth the user's attention: printed even without logging set up
        log.warning("%s", report.summary())
    else:
        log.info("%s", report.summary())
    return DatasetIndex(cfg=cfg, bucket_step=step, items=tuple(items), report=report)


def with_dir(cfg: DataConfig, folder: str | Path) -> DataConfig:
    """A copy of `cfg` pointing at another folder (for commands that take the folder as an argument)."""
    return dataclasses.replace(cfg, dir=str(folder))

