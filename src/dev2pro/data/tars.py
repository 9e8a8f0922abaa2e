"""WebDataset tar shards (images + captions, as large sets are published) streamed straight into training.

Source (`data.dir`): a folder of `*.tar` files, one `.tar` file, or a brace pattern such as
`/data/shards-{000000..000127}.tar` (ranges keep their zero padding, `{a,b}` lists work too; expanded here, no
`webdataset` dependency: the stdlib `tarfile` reads the shards). Inside a tar, members are grouped by key = the member
path up to the first dot of its file name (WebDataset's rule: `dir/0001.jpg` and `dir/0001.txt` are one sample,
`0001.seg.png` is not its image). The image is the `.jpg/.jpeg/.png/.webp` member; the caption comes from `.txt`,
else `.caption`, else `.json` (its "caption" or "text" field), else `data.default_caption`. `data.trigger` applies as
for image folders.

Streaming (`TarStream`, the same contract as `dev2pro.data.shards.ShardStream`): epoch e shuffles the tar list with
`random.Random(f"{seed}:{e}")`, rank r takes tars r, r + W, r + 2W, ... of that order (disjoint across ranks, every tar
once per epoch). A tar is indexed from its member headers plus each image's header (PIL opens lazily, so only the
first bytes of an image are read) to give every image its aspect-ratio bucket (`dev2pro.data.folders`' rules); items
are grouped by bucket, shuffled with `random.Random(f"{seed}:{e}:{tar name}")`, cut into batches of `batch_size` (a
bucket's incomplete last batch is dropped) and the batch order is shuffled. State is (epoch, tar position, batch
position): exact resume. Images are decoded, oriented, resized and cropped as `folders.load_image` does; random crops,
flips, caption dropout and tag shuffling draw from `random.Random` seeded by (seed, epoch, tar, key), so a resumed run
makes the same draws.

Encoding on the fly (`EncodedStream`): tars cannot be pre-cached, so the autoencoder and the text encoders stay loaded
in the training process and every batch is encoded as it is drawn. At real scale that costs memory on the training
device: T5-XXL about 9.5 GB in bf16 (4.8 GB as fp8), CLIP-L 0.25 GB, the VAE 0.17 GB, plus their activations; and
encoder time per step. In exchange captions are encoded per batch, so caption dropout, tag shuffling and triggers
work here (a `dev2pro cache` shard folder holds one embedding per caption and cannot do them).

Bad input is skipped deterministically (so a resumed run skips the same and positions stay exact), with a warning
naming the tar and the member: an unreadable tar (whole, or from its first damaged header on), an image whose header
PIL cannot read or that is too small for a bucket (left out when the tar is indexed), and an image or caption that
fails while decoding (its whole batch is skipped: batches keep their size). Fewer tars than processes and an empty
tar list are errors. Pitfalls: tars must be plain (uncompressed) for random access; `data.repeats` does not apply
(epochs replace it); decoding runs in the training process, between steps (a few images per step per rank).
"""

from __future__ import annotations

import json
import logging
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from dev2pro.data.captions import shuffle_tags
from dev2pro.data.config import IMAGE_EXTS, DataConfig
from dev2pro.data.folders import (
    EXIF_ORIENTATION,
    apply_trigger,
    bucket_limits,
    choose_bucket,
    make_buckets,
    prepare_image,
)
from dev2pro.data.shards import rank_share
from dev2pro.errors import DataError

log = logging.getLogger(__name__)

IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTS)  # jpg, jpeg, png, webp: preference order within a sample
CAPTION_KEYS = ("txt", "caption", "json")  # preference order
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # key = up to the first dot of the file name, then extension


# ---------------------------------------------------------------------------------------------------------------------
# The tar list


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{x,y}` lists; several braces."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        a, b = span.groups()
        if int(b) < int(a):
            raise DataError(f"{pattern}: range {{{body}}} runs backwards: write {{{b}..{a}}}")
        width = len(a) if len(a) > 1 and a.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataError(f"{pattern}: {{{body}}} is neither a range like {{000000..000127}} nor a list like {{a,b}}")
    return [x for o in options for x in expand_braces(pattern[: m.start()] + o + pattern[m.end() :])]


def is_tar_source(source: str | Path) -> bool:
    """Whether `data.dir` names tar shards: a brace pattern, a `.tar` file, or a folder holding `*.tar` files and
    neither images nor a `dev2pro cache` dataset.json at its top level."""
    s = str(source)
    if _BRACE.search(s):
        return True
    p = Path(s)
    if p.is_file():
        return p.suffix.lower() == ".tar"
    if not p.is_dir() or (p / "dataset.json").exists():
        return False
    names = [c.suffix.lower() for c in p.iterdir() if c.is_file()]
    return ".tar" in names and not any(n in IMAGE_EXTS for n in names)


def list_tars(source: str | Path) -> list[Path]:
    """The tar shards of `source` in a fixed order (pattern order, or sorted names in a folder)."""
    s = str(source)
    if _BRACE.search(s):
        paths = [Path(p) for p in expand_braces(s)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{s}: {len(missing)} of the {len(paths)} tar shards of this pattern are missing (first: "
                            f"{missing[0]}): fix the pattern's range or copy the missing shards")
    elif Path(s).is_dir():
        paths = sorted(p for p in Path(s).iterdir() if p.suffix.lower() == ".tar" and p.is_file())
    elif Path(s).is_file():
        paths = [Path(s)]
    else:
        raise DataError(f"{s}: not found: set data.dir to a folder of .tar shards or a pattern like "
                        "/data/shards-{000000..000127}.tar")
    if not paths:
        raise DataError(f"{s}: no tar shards (*.tar) match: set data.dir to a folder of .tar shards or a pattern like "
                        "/data/shards-{000000..000127}.tar")
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# One tar: members -> samples -> bucketed items -> batches


def group_samples(names: list[str]) -> dict[str, dict[str, str]]:
    """{key: {extension: member name}} in member order (WebDataset's grouping; names without an extension are
    ignored). Extensions are compared in lower case; the first member of a (key, extension) wins."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        m = _KEY.match(name)
        if m:
            out.setdefault(m.group(1), {}).setdefault(m.group(2).lower(), name)
    return out


def caption_text(data: bytes, ext: str) -> str:
    """A caption member's text (UTF-8, else Windows-1252), whitespace collapsed; `.json`: its "caption" or "text"
    field ("" when it has neither or is not JSON)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    if ext == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return ""
        field = (obj.get("caption") or obj.get("text")) if isinstance(obj, dict) else None
        text = field if isinstance(field, str) else ""
    return " ".join(text.split())


@dataclass(frozen=True)
class TarItem:
    key: str
    image: tarfile.TarInfo
    caption: tarfile.TarInfo | None
    bucket: tuple[int, int]  # (W, H)


def header_size(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[int, int]:
    """(W, H) after EXIF orientation, from the image's header only (PIL reads lazily)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(tar.extractfile(member))
        w, h = img.size
        if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn: sides swap
            w, h = h, w
    return w, h


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"larger than PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"unreadable: {first or type(e).__name__}"


def plan_batches(items: list[TarItem], batch_size: int, rng: random.Random | None) -> list[list[TarItem]]:
    """Same-bucket batches of `batch_size` (each bucket shuffled, its incomplete last batch dropped), then the batch
    order shuffled; no shuffling without `rng`."""
    by_bucket: dict[tuple[int, int], list[TarItem]] = {}
    for it in items:
        by_bucket.setdefault(it.bucket, []).append(it)
    batches = []
    for b in sorted(by_bucket):
        group = by_bucket[b]
        if rng is not None:
            rng.shuffle(group)
        batches += [group[s : s + batch_size] for s in range(0, len(group) - batch_size + 1, batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def draw_caption(caption: str, cfg: DataConfig, rng: random.Random) -> str:
    """This draw's caption: "" with probability `data.caption_dropout`, else its tags shuffled when
    `data.shuffle_captions`."""
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    return shuffle_tags(caption, cfg.keep_tokens, rng) if cfg.shuffle_captions else caption


# ---------------------------------------------------------------------------------------------------------------------
# The stream


class TarStream:
    """Endless same-bucket pixel batches for one rank (see the module docstring): dicts with images (b, 3, H, W)
    float32 in [-1, 1], captions (this draw's), keys (`tar name/sample key`)."""

    def __init__(self, source: str | Path, cfg: DataConfig, bucket_step: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, batch_size: int = 1, shuffle: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad stream arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.source, self.cfg = str(source), cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size, self.shuffle = batch_size, shuffle
        self.tars = list_tars(source)
        if len(self.tars) < world_size:
            raise DataError(f"{self.source}: {len(self.tars)} tar shards for {world_size} processes: every process "
                            f"streams whole tars, so split the data into at least {world_size} tars (more is better: "
                            "ranks then get equal shares) or run fewer processes")
        step = cfg.bucket_step or bucket_step
        self.limits = bucket_limits(cfg, step)
        self.step = step
        self.buckets = make_buckets(cfg.resolution, step, *self.limits)
        self.epoch, self.tar_pos, self.batch_pos = 0, 0, 0
        self._warned: set[Path] = set()

    def tars_of_epoch(self, epoch: int) -> list[Path]:
        """This rank's tars in epoch `epoch` (disjoint across ranks, together every tar once)."""
        return rank_share(self.tars, epoch, self.seed, self.rank, self.world_size, self.shuffle)

    def _warn(self, path: Path, problems: list[tuple[str, str]]) -> None:
        if problems and path not in self._warned:  # once per tar and stream: indexing repeats every epoch
            self._warned.add(path)
            for member, reason in problems:
                log.warning("%s: member %s: %s: skipped (the same on every run)", path, member, reason)

    def index(self, path: Path) -> tuple[tarfile.TarFile | None, list[TarItem]]:
        """Open `path` and list its usable items (from headers); (None, []) for a tar that cannot be opened."""
        try:
            tar = tarfile.open(path, "r:")
        except (tarfile.TarError, OSError) as e:
            self._warn(path, [("(whole tar)", f"{_reason(e)}: not a readable plain tar")])
            return None, []
        members, problems = [], []
        try:
            while (m := tar.next()) is not None:
                members.append(m)
        except (tarfile.TarError, OSError) as e:
            problems.append((members[-1].name if members else "(first header)",
                             f"damaged tar after this member ({_reason(e)}): the rest of the tar"))
        files = {m.name: m for m in members if m.isfile()}
        items = []
        lo, hi = self.limits
        for key, exts in group_samples(list(files)).items():
            image = next((files[exts[e]] for e in IMAGE_KEYS if e in exts), None)
            if image is None:
                continue
            try:
                size = header_size(tar, image)
            except Exception as e:  # a damaged header can raise anything from inside PIL
                problems.append((image.name, _reason(e)))
                continue
            bucket = choose_bucket(size, self.buckets, resolution=self.cfg.resolution, step=self.step, min_side=lo,
                                   max_side=hi, upscale=self.cfg.upscale)
            if bucket is None:
                problems.append((image.name, f"smaller than the smallest bucket side {lo} px"))
                continue
            caption = next((files[exts[e]] for e in CAPTION_KEYS if e in exts), None)
            items.append(TarItem(key, image, caption, bucket))
        self._warn(path, problems)
        return tar, items

    def batches_of_tar(self, items: list[TarItem], path: Path, epoch: int) -> list[list[TarItem]]:
        rng = random.Random(f"{self.seed}:{epoch}:{path.name}") if self.shuffle else None
        return plan_batches(items, self.batch_size, rng)

    def _item(self, tar: tarfile.TarFile, path: Path, it: TarItem, epoch: int) -> tuple[torch.Tensor, str]:
        rng = random.Random(f"{self.seed}:{epoch}:{path.name}:{it.key}")
        flip = self.cfg.flip and rng.random() < 0.5
        image = prepare_image(tar.extractfile(it.image).read(), it.bucket, self.cfg.crop, rng, flip)
        raw = caption_text(tar.extractfile(it.caption).read(), it.caption.name.rsplit(".", 1)[-1].lower()) \
            if it.caption is not None else ""
        return image, draw_caption(apply_trigger(raw or self.cfg.default_caption, self.cfg.trigger), self.cfg, rng)

    def load_batch(self, tar: tarfile.TarFile, path: Path, batch: list[TarItem], epoch: int) -> dict | None:
        """Decode a planned batch; None (with a warning) when one of its members fails: the batch is skipped."""
        done = []
        for it in batch:
            try:
                done.append(self._item(tar, path, it, epoch))
            except Exception as e:  # decoders raise anything on damaged data
                log.warning("%s: member %s: %s: its batch of %d items is skipped (the same on every run)", path,
                            it.image.name, _reason(e), len(batch))
                return None
        return {"images": torch.stack([d[0] for d in done]), "captions": [d[1] for d in done],
                "keys": [f"{path.name}/{it.key}" for it in batch]}

    def __iter__(self) -> Iterator[dict]:
        while True:
            tars = self.tars_of_epoch(self.epoch)
            whole_epoch, yielded = self.tar_pos == 0 and self.batch_pos == 0, False
            while self.tar_pos < len(tars):
                path = tars[self.tar_pos]
                tar, items = self.index(path)
                try:
                    batches = self.batches_of_tar(items, path, self.epoch)
                    while self.batch_pos < len(batches):
                        batch = batches[self.batch_pos]
                        self.batch_pos += 1
                        out = self.load_batch(tar, path, batch, self.epoch)
                        if out is not None:
                            yielded = True
                            yield out
                finally:
                    if tar is not None:
                        tar.close()
                self.tar_pos, self.batch_pos = self.tar_pos + 1, 0
            if whole_epoch and not yielded:
                raise DataError(f"{self.source}: process {self.rank} of {self.world_size} got no batch of "
                                f"{self.batch_size} from its {len(tars)} tars in epoch {self.epoch} (every bucket "
                                "holds fewer usable images than the batch size, or they are damaged): lower "
                                "train.batch_size or use fewer, larger tars")
            self.epoch, self.tar_pos = self.epoch + 1, 0

    def first_batch(self, n: int) -> dict:
        """Up to `n` items of one bucket (the first tar's most common one), centre-cropped and unshuffled, with
        their own captions: the monitor's fixed probe batch."""
        for path in self.tars:
            tar, items = self.index(path)
            if tar is None:
                continue
            with tar:
                if not items:
                    continue
                counts = Counter(it.bucket for it in items)
                bucket = min(counts, key=lambda b: (-counts[b], b))
                chosen = [it for it in items if it.bucket == bucket][:n]
                out = self.load_batch(tar, path, chosen, 0)
                if out is not None:
                    return out
        raise DataError(f"{self.source}: no tar holds a usable image (see the warnings above)")

    def state_dict(self) -> dict:
        """Position of the next batch of this rank (counting batches handed out, skipped ones included)."""
        return {"epoch": self.epoch, "tar_pos": self.tar_pos, "batch_pos": self.batch_pos, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "tars": len(self.tars)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "rank", "world_size", "batch_size", "tars"):
            if k in state and state[k] != mine[k]:
                raise DataError(f"{self.source}: tar stream state has {k} = {state[k]}, this run has {mine[k]}: resume "
                                "with the same settings and the same tars")
        self.epoch, self.tar_pos = int(state["epoch"]), int(state["tar_pos"])
        self.batch_pos = int(state["batch_pos"])


class EncodedStream:
    """A `TarStream` encoded on the fly: batches like `ShardStream`'s (latents (b, C, h, w), txt / t5, pooled
    float32, captions, keys). The encoders stay loaded for the whole run (memory: see the module docstring)."""

    def __init__(self, stream: TarStream, autoencoder, text_encoder, device, dtype: torch.dtype = torch.float32):
        self.stream, self.autoencoder, self.text_encoder = stream, autoencoder, text_encoder
        self.device, self.dtype = device, dtype

    def encode(self, batch: dict) -> dict:
        with torch.no_grad():  # not inference_mode: these tensors feed an autograd graph next
            latents = self.autoencoder.encode(batch["images"].to(self.device, self.dtype)).float()
            txt, pooled = self.text_encoder.encode(batch["captions"])
        txt = txt.float()
        return {"latents": latents, "txt": txt, "t5": txt, "pooled": pooled.float(), "captions": batch["captions"],
                "keys": batch["keys"]}

    def __iter__(self) -> Iterator[dict]:
        for batch in self.stream:
            yield self.encode(batch)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
