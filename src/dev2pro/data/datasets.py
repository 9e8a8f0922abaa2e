"""Several datasets as one: every `[[data.datasets]]` entry (or the single `data.dir`) at each of its resolutions is
scanned and cached on its own (`dev2pro.data.folders`, `dev2pro.data.cache`), then the cached parts are joined into
one `CachedDataset` whose bucket sampler never mixes resolutions or aspect ratios in a batch (buckets are (W, H)).

Regularization sets (`is_reg = true`, kohya's prior preservation): reg images are trained with their own captions and
the plain loss, mixed so that each epoch holds as many reg items as training items (images x repeats, summed over
every training set and resolution): the reg items (images x their repeats) are cycled or cut to that count, as kohya
sd-scripts does (it repeats reg images when there are fewer, and uses the first ones when there are more).

Also gathers what the LoRA metadata records about the data (`info`): kohya's `ss_tag_frequency` per folder,
`ss_dataset_dirs`, the image counts, the triggers and the caption settings.
"""

from __future__ import annotations

from pathlib import Path

from dev2pro.data.cache import CachedDataset, prepare_cache
from dev2pro.data.captions import tag_frequency
from dev2pro.data.config import DataConfig, dataset_configs
from dev2pro.data.folders import scan_dataset


def join(parts: list[tuple[CachedDataset, bool]]) -> CachedDataset:
    """One dataset from (cached part, is_reg) pairs; reg items cycled or cut to the number of training items."""
    if len(parts) == 1 and not parts[0][1]:
        return parts[0][0]
    entries, train, reg = [], [], []
    stats: dict[str, int] = {}
    for ds, is_reg in parts:
        offset = len(entries)
        entries += ds.entries
        (reg if is_reg else train).extend(offset + j for j in ds.order)
        for k, v in ds.stats.items():
            stats[k] = stats.get(k, 0) + v
    if reg:
        reg = [reg[k % len(reg)] for k in range(len(train))]
    return CachedDataset(entries, max(ds.image_variants for ds, _ in parts), stats, order=train + reg,
                         caption_draws=max(ds.caption_draws for ds, _ in parts))


def load_datasets(data: DataConfig, autoencoder, text_encoder, *, device, dtype, progress: bool = True
                  ) -> tuple[CachedDataset, dict]:
    """Scan and cache every dataset (x resolution) of `[data]`; returns the joined dataset and the metadata facts."""
    parts, indexes = [], []
    for cfg, is_reg in dataset_configs(data):
        index = scan_dataset(cfg, 2 * autoencoder.downsample, progress=progress)
        parts.append((prepare_cache(index, autoencoder, text_encoder, device=device, dtype=dtype, progress=progress),
                      is_reg))
        indexes.append((cfg, index, is_reg))
    dataset = join(parts)
    return dataset, data_info(indexes, dataset, data)


def data_info(indexes, dataset: CachedDataset, data: DataConfig) -> dict:
    """What the LoRA metadata records about the data (each folder counted once, at its first resolution)."""
    tags, dirs, triggers, images, seen = {}, {}, [], 0, set()
    for cfg, index, _ in indexes:
        if cfg.dir in seen:
            continue
        seen.add(cfg.dir)
        images += len(index)
        if cfg.trigger and cfg.trigger not in triggers:
            triggers.append(cfg.trigger)
        groups: dict[str, list] = {}
        for it in index.items:  # kohya's subsets: each first-level subfolder (`10_name`), else the folder itself
            rel = it.path.relative_to(cfg.dir)
            groups.setdefault(rel.parts[0] if len(rel.parts) > 1 else Path(cfg.dir).name, []).append(it)
        for name, items in groups.items():
            tags[name] = tag_frequency([it.caption for it in items])
            dirs[name] = {"n_repeats": max(it.repeats for it in items), "img_count": len(items)}
    has_reg = any(is_reg for *_, is_reg in indexes)
    n_train = len(dataset) // 2 if has_reg else len(dataset)  # `join` gives reg sets as many items as training
    first = indexes[0][0]
    return {"dataset_size": len(dataset), "images": images, "resolution": max(c.resolution for c, *_ in indexes),
            "tag_frequency": tags, "dataset_dirs": dirs, "num_train_images": n_train,
            "num_reg_images": len(dataset) - n_train, "trigger": ", ".join(triggers),
            "caption_dropout": first.caption_dropout, "keep_tokens": first.keep_tokens,
            "shuffle_caption": first.shuffle_captions, "flip": first.flip}
