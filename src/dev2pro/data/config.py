"""The `[data]` table of every recipe: one folder (`data.dir`, the original form) or several `[[data.datasets]]` as
kohya and ai-toolkit users write them, each with its own folder, repeats, trigger, caption extension, resolutions,
caption dropout/shuffle and flip, and regularization sets (`is_reg`). Strict frozen dataclasses
(`dev2pro.config.load_config`); `validate` names the key with its full path (`data.datasets[1].repeats`).

A dataset entry leaves unset (None) what it takes from `[data]`; `dataset_configs` resolves each entry into a plain
`DataConfig` per (folder, resolution), which is what `dev2pro.data.folders.scan_dataset` indexes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dev2pro.errors import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")  # kohya: a folder "10_name" repeats its images 10 times


@dataclass(frozen=True)
class DatasetConfig:
    """One `[[data.datasets]]` entry; None = the value of `[data]`. Unset `repeats` of a folder named `N_name` is N."""

    dir: str
    repeats: int | None = None
    trigger: str | None = None
    caption_ext: str | None = None
    default_caption: str | None = None
    resolutions: tuple[int, ...] = ()  # () = data.resolutions, else (data.resolution,)
    caption_dropout: float | None = None
    shuffle_captions: bool | None = None
    keep_tokens: int | None = None
    flip: bool | None = None
    is_reg: bool = False  # regularization (prior preservation) images, trained with their own captions

    def validate(self, where: str = "data.datasets") -> None:
        if not self.dir:
            raise ConfigError(f"{where}.dir is empty: set it to a folder of images and captions")
        _check_common(self, where)


@dataclass(frozen=True)
class DataConfig:
    """The `[data]` table of every recipe config: one folder (`dir`) or several `[[data.datasets]]`."""

    dir: str = ""
    datasets: tuple[DatasetConfig, ...] = ()
    trigger: str = ""  # replaces "[trigger]" in captions, else prepended as "trigger, caption"
    default_caption: str = ""  # used for images without a caption file (counted in the report)
    caption_ext: str = ".txt"
    resolution: int = 512  # target pixel area is resolution^2
    resolutions: tuple[int, ...] = ()  # several: every image is bucketed (and trained) at each of them
    bucket_step: int = 0  # 0 = 2 x autoencoder downsample (16 for Flux)
    min_bucket_side: int = 0  # 0 = resolution / 2
    max_bucket_side: int = 0  # 0 = resolution * 2
    upscale: bool = False  # upscale small images to the target area (never by default)
    crop: Literal["center", "random"] = "center"
    random_crops: int = 4  # crop = "random": this many fixed random crops per image are cached
    flip: bool = False  # also cache the mirrored image; each use picks one of them at random
    repeats: int = 1  # default repeats; a folder named "N_name" overrides it for the images below it
    caption_dropout: float = 0.0  # probability that a draw uses the empty caption
    shuffle_captions: bool = False  # shuffle the comma-separated tags per draw, the first keep_tokens fixed
    keep_tokens: int = 0
    caption_variants: int = 8  # shuffle_captions: this many shuffled versions per caption are cached
    cache_dir: str = ""  # "" = <data.dir>/.dev2pro_cache (per dataset folder)
    shuffle: bool = True
    num_workers: int = 0  # threads decoding images while caching

    def validate(self) -> None:
        if not self.dir and not self.datasets:
            raise ConfigError("data.dir is empty: set it to the folder of images and captions (or give "
                              "[[data.datasets]] entries)")
        if self.dir and self.datasets:
            raise ConfigError(f"data.dir = {self.dir!r} and [[data.datasets]] are both set: put the folder in a "
                              "[[data.datasets]] entry (dir = ...) instead")
        if self.datasets and all(d.is_reg for d in self.datasets):
            raise ConfigError("every [[data.datasets]] entry has is_reg = true: add a training dataset")
        if self.resolution < 8:
            raise ConfigError(f"data.resolution = {self.resolution}: must be at least 8 (pixels per side)")
        if self.bucket_step < 0:
            raise ConfigError(f"data.bucket_step = {self.bucket_step}: must be >= 0 (0 = from the autoencoder)")
        if self.min_bucket_side < 0 or self.max_bucket_side < 0:
            raise ConfigError("data.min_bucket_side / data.max_bucket_side must be >= 0 (0 = derived from resolution)")
        if self.max_bucket_side and self.min_bucket_side > self.max_bucket_side:
            raise ConfigError(
                f"data.min_bucket_side = {self.min_bucket_side} is larger than data.max_bucket_side = "
                f"{self.max_bucket_side}"
            )
        if self.random_crops < 1:
            raise ConfigError(f"data.random_crops = {self.random_crops}: must be >= 1")
        if self.caption_variants < 1:
            raise ConfigError(f"data.caption_variants = {self.caption_variants}: must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers = {self.num_workers}: must be >= 0")
        _check_common(self, "data")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.dir) / ".dev2pro_cache"

    def num_variants(self) -> int:
        """Cached versions of each image: random crops x (original, mirrored)."""
        return (self.random_crops if self.crop == "random" else 1) * (2 if self.flip else 1)

    def caption_random(self) -> bool:
        """Whether captions change per draw (dropout or shuffle)."""
        return self.caption_dropout > 0 or self.shuffle_captions


def _check_common(c, where: str) -> None:
    if c.repeats is not None and c.repeats < 1:
        raise ConfigError(f"{where}.repeats = {c.repeats}: must be >= 1")
    if c.caption_ext is not None and (not c.caption_ext.startswith(".") or c.caption_ext.lower() in IMAGE_EXTS):
        raise ConfigError(f"{where}.caption_ext = {c.caption_ext!r}: must be a file extension such as '.txt'")
    for r in c.resolutions:
        if r < 8:
            raise ConfigError(f"{where}.resolutions = {list(c.resolutions)}: each must be at least 8 (pixels)")
    if c.caption_dropout is not None and not 0.0 <= c.caption_dropout < 1.0:
        raise ConfigError(f"{where}.caption_dropout = {c.caption_dropout}: must be in [0, 1)")
    if c.keep_tokens is not None and c.keep_tokens < 0:
        raise ConfigError(f"{where}.keep_tokens = {c.keep_tokens}: must be >= 0")


def dataset_configs(data: DataConfig) -> list[tuple[DataConfig, bool]]:
    """One plain single-folder `DataConfig` per (dataset, resolution), with whether it is a regularization set.
    The single-folder form gives one entry per `data.resolutions` (or just `data`)."""
    entries = data.datasets or (DatasetConfig(dir=data.dir),)
    out = []
    for d in entries:
        over = {f.name: getattr(d, f.name) for f in dataclasses.fields(d)
                if f.name not in ("resolutions", "is_reg") and getattr(d, f.name) is not None}
        named = REPEATS_DIR.match(Path(d.dir).name)
        if data.datasets and d.repeats is None and named:  # an entry's own "10_name" folder, as kohya_ss users have
            over["repeats"] = max(1, int(named.group(1)))
        base = dataclasses.replace(data, datasets=(), resolutions=(), **over)
        for r in d.resolutions or data.resolutions or (data.resolution,):
            out.append((dataclasses.replace(base, resolution=r), d.is_reg))
    return out
