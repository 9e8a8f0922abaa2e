"""Latent and text-embedding caches, the cached dataset, and the bucket batch sampler.

What: `prepare_cache` encodes every image once with the autoencoder (`ae.encode`: the normalised posterior mean) and
every caption once with the text encoders (`text.encode` -> T5 sequence, CLIP pooled), stores each as a small
safetensors file, and returns a `CachedDataset` that reads them back; training never holds the encoders.
`BucketBatchSampler` makes same-bucket batches in a deterministic order per (seed, epoch), split across ranks.

Cache keys (sha256, see `latent_key` / `text_key`):
- latents: image content hash + `ae.identity` + bucket (W, H) + crop mode + variant; a changed image, autoencoder,
  resolution or crop recomputes only the affected files, a renamed or moved image reuses its file.
- text: caption text (after trigger) + `text.identity`; a changed caption recomputes that caption only. With caption
  shuffling each cached variant is its own text, with caption dropout the empty caption is one more
  (`item_captions`; which one a draw uses: `dev2pro.data.captions`).
Files live in `<cache_dir>/latents/ab/<key>.safetensors` and `<cache_dir>/text/ab/<key>.safetensors`, written to a
temporary name and renamed, so an interrupted run leaves no half file; a file that does not load or holds non-finite
values is recomputed.

Random crops and flips: caching needs a finite set of versions per image ("variants"). With `crop = "random"` the
cache holds `data.random_crops` crops per image at fixed offsets (seeded by the image hash), with `flip` also the
mirrored version of each; the sampler picks one variant per use at random from (seed, epoch). `crop = "center"`
without flip caches exactly one version.

Sampler contract (the data-parallel equality depends on it): for each epoch, indices are grouped by bucket, each group
shuffled with `random.Random(f"{seed}:{epoch}")`, cut into *global* batches of `batch_size * world_size` items
(incomplete ones dropped, or padded by wrapping around when `drop_last=False`), and the global batches shuffled. Rank r
takes items `[r * batch_size, (r + 1) * batch_size)` of each global batch. So step k of 2 ranks x batch b covers exactly
the items of step k of 1 rank x batch 2b. State is (epoch, position in the epoch) in global steps.
Reference: kohya sd-scripts bucket batching; torch DistributedSampler (padding by wrap-around).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dev2pro.data.folders import DataItem, DatasetIndex, load_image
from dev2pro.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = "dev2pro-cache-1"


def latent_key(item: DataItem, ae_identity: str, crop: str, variant: int) -> str:
    text = f"{CACHE_FORMAT}\0{ae_identity}\0{item.hash}\0{item.bucket[0]}x{item.bucket[1]}\0{crop}\0{variant}"
    return hashlib.sha256(text.encode()).hexdigest()


def text_key(caption: str, text_identity: str) -> str:
    return hashlib.sha256(f"{CACHE_FORMAT}\0{text_identity}\0{caption}".encode()).hexdigest()


def cache_path(cache_dir: Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / key[:2] / f"{key}.safetensors"


def variant_params(item: DataItem, variant: int, crop: str, flip: bool) -> tuple[random.Random | None, bool]:
    """(crop rng, mirrored) of one cached variant: variants run over crops, each crop first plain then mirrored."""
    crop_index, mirrored = divmod(variant, 2) if flip else (variant, 0)
    rng = random.Random(f"{item.hash}:{crop_index}") if crop == "random" else None
    return rng, bool(mirrored)


def save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_valid(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file, or None if it is missing, truncated, corrupt or holds non-finite values."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        return None
    except Exception:  # safetensors raises its own error types for damaged files
        return None
    if any(n not in tensors or not torch.isfinite(tensors[n].float()).all() for n in names):
        return None
    return tensors


# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    latent_paths: tuple[Path, ...]  # one per variant
    text_paths: tuple[Path, ...]  # one per caption variant (shuffled tags; one without shuffling)
    caption: str
    bucket: tuple[int, int]  # (W, H) in pixels
    key: str  # latent key of variant 0: identifies the image at this bucket and crop
    repeats: int
    captions: tuple[str, ...] = ()  # the text of each caption variant (default: the caption)
    empty_path: Path | None = None  # the empty caption's embedding (caption dropout)
    caption_dropout: float = 0.0


CAPTION_DRAWS = 1 << 20  # draw numbers per item when captions change per draw (see `dev2pro.data.captions.pick`)


class CachedDataset(torch.utils.data.Dataset):
    """Cached latents + text embeddings, each image repeated `repeats` times (or in the given `order`).

    Index i in [0, len) is variant 0 of the i-th (image, repeat); `i + v * len` is variant v (the sampler adds it
    when the cache holds several crops or flips per image). With `caption_draws` > 1 (caption dropout or shuffle),
    v // image_variants is also a draw number that picks the caption variant (`dev2pro.data.captions.pick`). An entry
    with fewer image variants than the dataset (mixed datasets) uses v modulo its own count.
    """

    def __init__(self, entries: list[CacheEntry], num_variants: int = 1, stats: dict | None = None,
                 order: list[int] | None = None, caption_draws: int = 1):
        self.entries = entries
        self.image_variants = num_variants
        self.caption_draws = caption_draws
        self.num_variants = num_variants * caption_draws
        self.order = order if order is not None else [j for j, e in enumerate(entries) for _ in range(e.repeats)]
        self.stats = stats or {}

    def __len__(self) -> int:
        return len(self.order)

    def _entry(self, i: int) -> tuple[CacheEntry, int]:
        n = len(self.order)
        if i < 0 or i >= n * self.num_variants:
            raise IndexError(i)
        variant, j = divmod(i, n)
        return self.entries[self.order[j]], variant

    def bucket_of(self, i: int) -> tuple[int, int]:
        return self._entry(i)[0].bucket

    def buckets(self) -> list[tuple[int, int]]:
        return [self.entries[j].bucket for j in self.order]

    def __getitem__(self, i: int) -> dict:
        from dev2pro.data.captions import pick

        entry, variant = self._entry(i)
        image_v, draw = variant % self.image_variants, variant // self.image_variants
        lat = load_file(str(entry.latent_paths[image_v % len(entry.latent_paths)]))["latents"]
        choice = pick(draw, len(entry.text_paths), entry.caption_dropout) if self.caption_draws > 1 else 0
        path = entry.empty_path if choice is None else entry.text_paths[choice]
        txt = load_file(str(path))
        return {
            "latents": lat.float(),
            "txt": txt["txt"].float(),
            "pooled": txt["pooled"].float(),
            "caption": "" if choice is None else (entry.captions or (entry.caption,))[choice],
            "key": entry.key,
        }


def collate(items: list[dict]) -> dict:
    """Stack same-bucket items: latents (b, C, h, w), txt (b, seq, ctx) (also under "t5"), pooled (b, vec),
    captions, keys."""
    shapes = {tuple(it["latents"].shape) for it in items}
    if len(shapes) != 1:
        raise ValueError(f"collate: items from different buckets {sorted(shapes)}: use BucketBatchSampler")
    txt = torch.stack([it["txt"] for it in items])
    return {
        "latents": torch.stack([it["latents"] for it in items]),
        "txt": txt,
        "t5": txt,
        "pooled": torch.stack([it["pooled"] for it in items]),
        "captions": [it["caption"] for it in items],
        "keys": [it["key"] for it in items],
    }


def _batches(seq: list, n: int) -> Iterator[list]:
    for s in range(0, len(seq), n):
        yield seq[s : s + n]


def missing_items(index: DatasetIndex, cache_dir: str | Path, ae_identity: str, text_identity: str) -> tuple[int, int]:
    """(latent files, text files) not yet cached: lets a trainer skip loading encoders when both are 0."""
    cfg, cache_dir = index.cfg, Path(cache_dir)
    lat = sum(
        not cache_path(cache_dir, "latents", latent_key(it, ae_identity, cfg.crop, v)).is_file()
        for it in index.items
        for v in range(cfg.num_variants())
    )
    captions = {c for i in index.items for c in item_captions(cfg, i.caption)}
    txt = sum(not cache_path(cache_dir, "text", text_key(c, text_identity)).is_file() for c in captions)
    return lat, txt


def item_captions(cfg, caption: str) -> list[str]:
    """The caption texts an item needs cached: its variants (`dev2pro.data.captions`) and, with caption dropout,
    the empty caption last."""
    from dev2pro.data.captions import caption_variants

    out = caption_variants(caption, shuffle=cfg.shuffle_captions, keep_tokens=cfg.keep_tokens,
                           count=cfg.caption_variants)
    return out + [""] if cfg.caption_dropout > 0 else out


def prepare_cache(
    index: DatasetIndex,
    ae,
    text,
    cache_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = True,
) -> CachedDataset:
    """Encode what is not cached yet (tqdm), return the dataset. After this the caller can drop `ae` and `text`.

    `dtype` is the encoders' compute dtype; text embeddings are stored in it (latents always in float32).
    """
    from tqdm import tqdm

    cfg = index.cfg
    cache_dir = Path(cache_dir) if cache_dir else cfg.resolved_cache_dir()
    nv = cfg.num_variants()
    stats = {"latents_computed": 0, "latents_reused": 0, "texts_computed": 0, "texts_reused": 0, "corrupt": 0}

    # latents: (item, variant) pairs whose file is missing or damaged, grouped by bucket so batches stack
    todo: dict[tuple[int, int], list[tuple[DataItem, int, Path]]] = {}
    entries = []
    for it in index.items:
        paths = tuple(cache_path(cache_dir, "latents", latent_key(it, ae.identity, cfg.crop, v)) for v in range(nv))
        for v, p in enumerate(paths):
            if load_valid(p, ("latents",)) is None:
                stats["corrupt"] += p.exists()
                todo.setdefault(it.bucket, []).append((it, v, p))
            else:
                stats["latents_reused"] += 1
        texts = item_captions(cfg, it.caption)
        tpaths = tuple(cache_path(cache_dir, "text", text_key(c, text.identity)) for c in texts)
        n = len(texts) - (cfg.caption_dropout > 0)
        entries.append(CacheEntry(paths, tpaths[:n], it.caption, it.bucket, paths[0].stem, it.repeats,
                                  captions=tuple(texts[:n]), empty_path=tpaths[n] if n < len(texts) else None,
                                  caption_dropout=cfg.caption_dropout))

    def load(job: tuple[DataItem, int, Path]) -> torch.Tensor:
        it, v, _ = job
        rng, mirrored = variant_params(it, v, cfg.crop, cfg.flip)
        return load_image(it, it.bucket, cfg.crop, rng, flip=mirrored)

    n_lat = sum(len(v) for v in todo.values())
    pool = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers > 0 else None
    try:
        with tqdm(total=n_lat, desc="caching latents", unit="img", disable=not progress or n_lat == 0) as bar:
            for bucket in sorted(todo):
                for jobs in _batches(todo[bucket], batch_size):
                    images = list(pool.map(load, jobs)) if pool else [load(j) for j in jobs]
                    with torch.inference_mode():
                        lat = ae.encode(torch.stack(images).to(device=device, dtype=dtype)).float().cpu()
                    for (it, _, p), z in zip(jobs, lat):
                        meta = {"format": CACHE_FORMAT, "ae": ae.identity, "image": it.path.name, "hash": it.hash}
                        save_atomic(p, {"latents": z}, meta)
                    stats["latents_computed"] += len(jobs)
                    bar.update(len(jobs))
    finally:
        if pool:
            pool.shutdown()

    # text: one file per distinct caption
    captions: dict[str, Path] = {}
    for e in entries:
        for c, p in zip(e.captions + ("",) * (e.empty_path is not None),
                        e.text_paths + ((e.empty_path,) if e.empty_path is not None else ())):
            captions.setdefault(c, p)
    missing = []
    for caption, p in captions.items():
        if load_valid(p, ("txt", "pooled")) is None:
            stats["corrupt"] += p.exists()
            missing.append(caption)
        else:
            stats["texts_reused"] += 1
    with tqdm(total=len(missing), desc="caching text", unit="caption", disable=not progress or not missing) as bar:
        for chunk in _batches(missing, batch_size):
            with torch.inference_mode():
                txt, pooled = text.encode(chunk)
            for caption, t, pv in zip(chunk, txt, pooled):
                meta = {"format": CACHE_FORMAT, "text": text.identity, "caption": caption}
                save_atomic(captions[caption], {"txt": t.to(dtype).cpu(), "pooled": pv.to(dtype).cpu()}, meta)
            stats["texts_computed"] += len(chunk)
            bar.update(len(chunk))
    return CachedDataset(entries, nv, stats, caption_draws=CAPTION_DRAWS if cfg.caption_random() else 1)


# ---------------------------------------------------------------------------------------------------------------------


class BucketBatchSampler:
    """Same-bucket batches, deterministic per (seed, epoch), split across ranks (see the module docstring).

    Iterating yields this rank's batches (lists of dataset indices) from the current (epoch, position) to the end of
    the epoch, then moves to the next epoch: usable as a DataLoader `batch_sampler`. `iterate(start_step)` is the
    endless version for step-based training.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shuffle: bool = True,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.shuffle = drop_last, shuffle
        self.global_batch = batch_size * world_size
        self.size = len(dataset)
        self.num_variants = getattr(dataset, "num_variants", 1)
        buckets = dataset.buckets() if hasattr(dataset, "buckets") else [dataset.bucket_of(i) for i in range(self.size)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            groups.setdefault(tuple(b), []).append(i)
        self.groups = [groups[b] for b in sorted(groups)]
        g = self.global_batch
        self.steps_per_epoch = sum((len(x) // g) if drop_last else math.ceil(len(x) / g) for x in self.groups)
        if self.steps_per_epoch == 0:
            largest = max(len(x) for x in self.groups)
            raise DataError(
                f"no bucket holds a full batch of {g} items (largest bucket: {largest}): lower the batch size, "
                "add repeats or images, or allow partial batches"
            )
        # with drop_last, a bucket smaller than one global batch is never trained on: say so once
        self.never_used = sum(len(x) for x in self.groups if len(x) < g) if drop_last else 0
        if self.never_used and rank == 0:
            log.warning(
                "%d of %d items are in buckets with fewer than %d items (batch size x processes) and are never "
                "used; add images of those shapes or lower the batch size", self.never_used, self.size, g,
            )
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of `epoch`, in order (the same for every rank and every world size with the same
        global batch size)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        g = self.global_batch
        out = []
        for group in self.groups:
            idx = list(group)
            if self.shuffle:
                rng.shuffle(idx)
            for chunk in _batches(idx, g):
                if len(chunk) < g:
                    if self.drop_last:
                        break
                    chunk = (chunk + idx * math.ceil(g / len(idx)))[:g]
                out.append(chunk)
        if self.shuffle:
            rng.shuffle(out)
        if self.num_variants > 1:
            out = [[i + rng.randrange(self.num_variants) * self.size for i in b] for b in out]
        return out

    def _rank_slice(self, batch: list[int]) -> list[int]:
        return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.position
        batches = self.global_batches(epoch)
        for pos in range(start, len(batches)):
            self.epoch, self.position = epoch, pos + 1
            yield self._rank_slice(batches[pos])
        self.epoch, self.position = epoch + 1, 0

    def iterate(self, start_step: int | None = None) -> Iterator[list[int]]:
        """Endless batches for global steps start_step, start_step + 1, ... (epochs follow each other); with None,
        from the current state (after `load_state_dict`)."""
        if start_step is not None:
            self.epoch, self.position = divmod(start_step, self.steps_per_epoch)
        while True:
            yield from self

    def state_dict(self) -> dict:
        """Position of the next batch, in global steps: valid for any world size with the same global batch.

        It counts the batches handed out; a consumer that pulls ahead (a DataLoader with workers prefetches) must
        save its own step count and resume with `iterate(step)` instead."""
        epoch, position = self.epoch, self.position
        if position >= self.steps_per_epoch:  # the last batch of an epoch was handed out: next is the next epoch's
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        same = state.get("global_batch", self.global_batch) == self.global_batch
        if not same or state.get("seed", self.seed) != self.seed:
            raise DataError(
                f"sampler state was saved with seed {state.get('seed')} and global batch {state.get('global_batch')}, "
                f"this run has seed {self.seed} and global batch {self.global_batch}: resume with the same settings"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
