"""Latent/text caches (recompute only what changed, corrupted files recomputed) and the bucket batch sampler
(deterministic, bucket-consistent, disjoint across ranks, 2 ranks x b == 1 rank x 2b, exact mid-epoch resume)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro.data.cache import BucketBatchSampler, cache_path, collate, missing_items, prepare_cache, variant_params
from dev2pro.data.config import DataConfig
from dev2pro.data.folders import load_image, scan_dataset
from dev2pro.errors import DataError


class FakeAE:
    """Average-pool by 4 then a fixed affine map: commutes with horizontal flips, counts encoded images."""

    latent_channels, downsample = 3, 4

    def __init__(self, identity="fake-ae-1"):
        self.identity = identity
        self.encoded = 0

    def encode(self, images):
        assert images.ndim == 4 and images.shape[1] == 3 and images.min() >= -1 and images.max() <= 1
        self.encoded += images.shape[0]
        return torch.nn.functional.avg_pool2d(images, 4) * 2.0 + 0.25


class FakeText:
    context_dim, pooled_dim, seq = 6, 4, 5

    def __init__(self, identity="fake-text-1"):
        self.identity = identity
        self.encoded = 0

    def vectors(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.seq, self.context_dim, generator=g), torch.randn(self.pooled_dim, generator=g)

    def encode(self, prompts):
        self.encoded += len(prompts)
        pairs = [self.vectors(p) for p in prompts]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def make_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        size = (32, 32) if i % 3 else (48, 24)  # two buckets
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"caption {i % 4}")  # captions 0 and 4 share text
    return root


def index_of(root: Path, **kw):
    return scan_dataset(DataConfig(dir=str(root), resolution=32, bucket_step=8, **kw), 8)


def test_cache_values_and_reuse(tmp_path):
    root = make_folder(tmp_path)
    ae, text = FakeAE(), FakeText()
    ds = prepare_cache(index_of(root), ae, text, progress=False)
    assert ae.encoded == 6 and text.encoded == 4  # one per image, one per distinct caption
    assert (root / ".dev2pro_cache" / "latents").is_dir()
    index = index_of(root)
    assert len(ds) == 6 and ds.order == list(range(6))  # entries follow index.items (repeats 1)
    for i, item in enumerate(index.items):
        got = ds[i]
        assert got["caption"] == item.caption and ds.bucket_of(i) == item.bucket
        # latents equal the encoder applied to the loaded image; text equals the encoder's output
        ref = FakeAE().encode(load_image(item, item.bucket, "center")[None])[0]
        assert got["latents"].dtype == torch.float32 and torch.equal(got["latents"], ref)
        assert got["latents"].shape == (3, item.bucket[1] // 4, item.bucket[0] // 4)
        want_txt, want_pooled = text.vectors(item.caption)
        assert torch.equal(got["txt"], want_txt) and torch.equal(got["pooled"], want_pooled)

    # second run: nothing recomputed
    ae2, text2 = FakeAE(), FakeText()
    ds2 = prepare_cache(index_of(root), ae2, text2, progress=False)
    assert ae2.encoded == 0 and text2.encoded == 0 and ds2.stats["latents_reused"] == 6
    assert missing_items(index_of(root), root / ".dev2pro_cache", "fake-ae-1", "fake-text-1") == (0, 0)

    # one image changed, one caption changed: exactly those recomputed
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "1.png")
    (root / "2.txt").write_text("a brand new caption")
    assert missing_items(index_of(root), root / ".dev2pro_cache", "fake-ae-1", "fake-text-1") == (1, 1)
    ae3, text3 = FakeAE(), FakeText()
    prepare_cache(index_of(root), ae3, text3, progress=False)
    assert ae3.encoded == 1 and text3.encoded == 1

    # another autoencoder identity: all latents, no text
    ae4, text4 = FakeAE("fake-ae-2"), FakeText()
    prepare_cache(index_of(root), ae4, text4, progress=False)
    assert ae4.encoded == 6 and text4.encoded == 0


def test_corrupted_cache_files_recomputed(tmp_path):
    root = make_folder(tmp_path, 3)
    cache = tmp_path / "elsewhere"
    index = index_of(root, cache_dir=str(cache))
    ds = prepare_cache(index, FakeAE(), FakeText(), progress=False)
    assert not (root / ".dev2pro_cache").exists()
    good = ds[0]["latents"].clone()
    lat = ds.entries[ds.order[0]].latent_paths[0]
    lat.write_bytes(lat.read_bytes()[:-7])  # truncated
    tp = ds.entries[ds.order[1]].text_paths[0]
    tp.write_bytes(b"garbage")
    ae, text = FakeAE(), FakeText()
    ds2 = prepare_cache(index, ae, text, cache, progress=False)
    assert ae.encoded == 1 and text.encoded == 1 and ds2.stats["corrupt"] == 2
    assert torch.equal(ds2[0]["latents"], good)


def test_repeats_and_variants(tmp_path):
    (tmp_path / "3_a").mkdir()
    make_folder(tmp_path / "3_a", 2)
    index = index_of(tmp_path, crop="random", random_crops=2, flip=True)
    ae = FakeAE()
    ds = prepare_cache(index, ae, FakeText(), progress=False, batch_size=3)
    assert len(ds) == 6 and ds.num_variants == 4 and ae.encoded == 8
    n = len(ds)
    for i in range(n):
        v0, v1 = ds[i]["latents"], ds[i + n]["latents"]  # variant 1 = mirrored variant 0
        assert torch.allclose(v1, v0.flip(-1), atol=1e-6)
    it = index.items[0]
    rng, mirrored = variant_params(it, 2, "random", True)
    assert not mirrored and rng.random() == variant_params(it, 2, "random", True)[0].random()
    with pytest.raises(IndexError):
        ds[4 * n]


class BucketsOnly:
    """A dataset stand-in: only the bucket of each index matters to the sampler."""

    def __init__(self, sizes: dict[tuple[int, int], int]):
        self._buckets = [b for b, n in sizes.items() for _ in range(n)]

    def __len__(self):
        return len(self._buckets)

    def buckets(self):
        return list(self._buckets)


DATA = BucketsOnly({(32, 32): 37, (48, 24): 22, (24, 48): 9, (40, 16): 3})


def take(it, n):
    return [next(it) for _ in range(n)]


def test_sampler_batches_are_bucket_consistent_and_deterministic():
    s = BucketBatchSampler(DATA, batch_size=4, seed=7)
    assert len(s) == 37 // 4 + 22 // 4 + 9 // 4 + 3 // 4
    assert s.never_used == 3  # the (40, 16) bucket holds 3 < 4 items
    epoch0 = list(s)
    assert s.state_dict()["epoch"] == 1
    for batch in epoch0:
        assert len(batch) == 4 and len({DATA._buckets[i] for i in batch}) == 1
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat))  # no duplicates in an epoch
    again = BucketBatchSampler(DATA, batch_size=4, seed=7)
    assert list(again) == epoch0
    assert list(again) != epoch0  # epoch 1 is another order
    assert list(BucketBatchSampler(DATA, batch_size=4, seed=8)) != epoch0
    plain = list(BucketBatchSampler(DATA, batch_size=4, seed=7, shuffle=False))
    assert plain[0] == [59, 60, 61, 62]  # buckets in sorted order: (24, 48) holds indices 59...


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_disjoint_and_equal_to_one_rank_with_bigger_batch(world):
    b = 3
    ranks = [BucketBatchSampler(DATA, batch_size=b, seed=5, rank=r, world_size=world) for r in range(world)]
    single = BucketBatchSampler(DATA, batch_size=b * world, seed=5)
    assert all(len(r) == len(single) for r in ranks)
    streams = [take(r.iterate(0), 3 * len(single)) for r in ranks]
    ref = take(single.iterate(0), 3 * len(single))
    for step in range(len(ref)):
        parts = [streams[r][step] for r in range(world)]
        assert all(len(p) == b for p in parts)
        assert sum(parts, []) == ref[step]  # same items, rank order = position in the global batch
    for epoch in range(3):
        seen = [i for r in range(world) for batch in streams[r][epoch * len(single) : (epoch + 1) * len(single)]
                for i in batch]
        assert len(seen) == len(set(seen))  # no item on two ranks (or twice on one) within an epoch


def test_resume_mid_epoch_gives_identical_remaining_sequence():
    s = BucketBatchSampler(DATA, batch_size=2, seed=11, rank=1, world_size=2)
    full = take(s.iterate(0), 2 * len(s) + 5)
    for k in [0, 3, len(s) - 1, len(s), len(s) + 4]:
        a = BucketBatchSampler(DATA, batch_size=2, seed=11, rank=1, world_size=2)
        assert take(a.iterate(0), k) == full[:k]
        state = a.state_dict()
        b = BucketBatchSampler(DATA, batch_size=2, seed=11, rank=1, world_size=2)
        b.load_state_dict(state)
        assert take(b.iterate(), len(full) - k) == full[k:]
        c = BucketBatchSampler(DATA, batch_size=2, seed=11, rank=1, world_size=2)
        assert take(c.iterate(k), len(full) - k) == full[k:]
    # epoch-by-epoch consumers (`for batch in sampler`) resumed right after an epoch's last batch get a full epoch
    a = BucketBatchSampler(DATA, batch_size=2, seed=11, rank=1, world_size=2)
    assert take(iter(a), len(a)) == full[: len(a)]
    assert a.state_dict()["epoch"] == 1 and a.state_dict()["position"] == 0
    b = BucketBatchSampler(DATA, batch_size=2, seed=11, rank=1, world_size=2)
    b.load_state_dict({"epoch": 0, "position": len(b), "seed": 11, "global_batch": 4})
    assert list(b) == full[len(a) : 2 * len(a)]
    # a 2-rank state resumes in 1 rank with the same global batch: same items per step
    two = BucketBatchSampler(DATA, batch_size=2, seed=11, rank=0, world_size=2)
    take(two.iterate(0), 4)
    one = BucketBatchSampler(DATA, batch_size=4, seed=11)
    one.load_state_dict(two.state_dict())
    assert next(iter(one))[:2] == next(iter(two))
    with pytest.raises(DataError):
        BucketBatchSampler(DATA, batch_size=2, seed=11).load_state_dict(two.state_dict())


def test_partial_batches_and_variants():
    s = BucketBatchSampler(DATA, batch_size=4, seed=3, rank=0, world_size=2, drop_last=False)
    batches = [i for r in range(2) for b in BucketBatchSampler(DATA, 4, 3, r, 2, drop_last=False) for i in b]
    assert set(batches) == set(range(len(DATA)))  # everything seen; duplicates only as padding
    assert len(batches) == 8 * len(s)
    with pytest.raises(DataError, match="no bucket holds a full batch of 64"):
        BucketBatchSampler(DATA, batch_size=32, seed=0, world_size=2)

    class Variants(BucketsOnly):
        num_variants = 3

    v = Variants({(8, 8): 10})
    idx = [i for b in BucketBatchSampler(v, 5, seed=1) for i in b]
    assert sorted(i % 10 for i in idx) == list(range(10)) and max(idx) >= 10 and max(idx) < 30


def test_collate_and_loader(tmp_path):
    root = make_folder(tmp_path)
    ds = prepare_cache(index_of(root), FakeAE(), FakeText(), progress=False)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    sizes = Counter()
    for batch in loader:
        assert batch["latents"].shape[0] == 2 and batch["txt"].shape == (2, 5, 6) and batch["pooled"].shape == (2, 4)
        assert batch["t5"] is batch["txt"] and len(batch["captions"]) == 2 and len(batch["keys"]) == 2
        sizes[tuple(batch["latents"].shape[-2:])] += 1
    assert sizes == {(8, 8): 2, (6, 10): 1}  # 4 images at 32x32, 2 at 48x24 -> bucket 40x24
    with pytest.raises(ValueError, match="different buckets"):
        collate([ds[i] for i in range(6)])


def test_random_crop_cache_uses_fixed_crops(tmp_path):
    root = make_folder(tmp_path, 3)
    index = index_of(root, crop="random", random_crops=3)
    ds = prepare_cache(index, FakeAE(), FakeText(), progress=False)
    e = ds.entries[0]
    paths = {cache_path(Path(root / ".dev2pro_cache"), "latents", p.stem) for p in e.latent_paths}
    assert len(paths) == 3 and all(p.is_file() for p in paths)
    # same (hash, variant) -> same crop, so a rerun reuses every file
    ae = FakeAE()
    prepare_cache(index_of(root, crop="random", random_crops=3), ae, FakeText(), progress=False)
    assert ae.encoded == 0
    assert random.Random(f"{index.items[0].hash}:1").random() == variant_params(index.items[0], 1, "random", False)[
        0
    ].random()
