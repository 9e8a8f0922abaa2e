"""Several `[[data.datasets]]` (own folder, repeats, trigger, resolutions, caption dropout/shuffle, regularization
sets), the per-draw caption transforms against their definitions, and config errors that name the key inside
`[data]`."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro.config import from_dict
from dev2pro.data.cache import BucketBatchSampler, collate
from dev2pro.data.captions import caption_variants, pick, shuffle_tags, split_tags
from dev2pro.data.datasets import load_datasets
from dev2pro.errors import ConfigError
from dev2pro.train.recipes.train_lora import TrainLoraConfig
from test_cache import FakeAE, FakeText

TAGS = ["red", "circle", "black background", "center", "small", "sharp"]


def folder(root: Path, n: int, name: str, size=(32, 32)) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"{name} {i}, " + ", ".join(TAGS))
    return root


def data_config(extra: dict):
    base = {"model": {"base": "preset:tiny-dev@0"}, "train": {"steps": 1}, "output": {"dir": "o"}}
    return from_dict(TrainLoraConfig, {**base, "data": extra}).data


def test_shuffle_keeps_the_first_tokens_and_permutes_the_rest():
    caption = "ohwx, " + ", ".join(TAGS)
    variants = caption_variants(caption, shuffle=True, keep_tokens=1, count=8)
    assert len(variants) == len(set(variants)) == 8 and variants[0] == caption
    for v in variants:
        tags = split_tags(v)
        assert tags[0] == "ohwx" and sorted(tags) == sorted(split_tags(caption))
    assert caption_variants(caption, shuffle=True, keep_tokens=1, count=8) == variants  # seeded by the caption
    assert caption_variants("a, b", shuffle=True, keep_tokens=1, count=8) == ["a, b"]  # one order only
    assert shuffle_tags("a, b, c", 3, random.Random(0)) == "a, b, c"
    # dropout: the empty caption with probability p, the variant uniform otherwise (binomial 5-sigma bounds)
    n, p = 4000, 0.25
    picks = [pick(d, 4, p) for d in range(n)]
    dropped = sum(c is None for c in picks)
    assert abs(dropped - n * p) < 5 * (n * p * (1 - p)) ** 0.5
    counts = Counter(c for c in picks if c is not None)
    assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) < 0.2 * (n - dropped) / 4
    assert [pick(d, 4, p) for d in range(50)] == picks[:50]


def test_datasets_repeats_triggers_resolutions_and_reg(tmp_path):
    a = folder(tmp_path / "2_people", 4, "person")
    b = folder(tmp_path / "styles", 2, "style")
    reg = folder(tmp_path / "reg", 3, "reg")
    cfg = data_config({"bucket_step": 8, "resolution": 32, "datasets": [
        {"dir": str(a), "trigger": "ohwx"},  # 2_ folder: repeats 2
        {"dir": str(b), "repeats": 3, "resolutions": [32, 16], "trigger": "sty"},
        {"dir": str(reg), "is_reg": True}]})
    ae, text = FakeAE(), FakeText()
    ds, info = load_datasets(cfg, ae, text, device="cpu", dtype=torch.float32, progress=False)
    n_train = 4 * 2 + 2 * 3 * 2  # images x repeats x resolutions
    assert len(ds) == 2 * n_train and info["num_train_images"] == n_train and info["num_reg_images"] == n_train
    items = [ds[i] for i in range(len(ds))]
    captions = Counter(it["caption"].split(",")[0] for it in items)
    assert captions["ohwx"] == 8 and captions["sty"] == 12
    reg_counts = Counter(it["caption"] for it in items[n_train:])  # 3 reg images cycled to 20 items
    assert sorted(reg_counts.values()) == [6, 7, 7] and all(c.startswith("reg ") for c in reg_counts)
    shapes = Counter(tuple(it["latents"].shape[-2:]) for it in items)
    assert shapes == {(8, 8): 2 * n_train - 6, (4, 4): 6}  # style images also at 16 px (FakeAE downsamples 4x)
    for it in items:  # each item's text embedding is its caption's
        torch.testing.assert_close(it["txt"], text.vectors(it["caption"])[0])
    assert info["tag_frequency"]["2_people"]["red"] == 4 and info["tag_frequency"]["styles"]["sty"] == 2
    assert info["dataset_dirs"]["styles"] == {"n_repeats": 3, "img_count": 2} and info["trigger"] == "ohwx, sty"
    sampler = BucketBatchSampler(ds, batch_size=2, seed=0)
    for batch in list(sampler)[:10]:
        collate([ds[i] for i in batch])  # raises if a batch mixed buckets


def test_caption_dropout_and_shuffle_per_draw(tmp_path):
    a = folder(tmp_path / "a", 2, "person")
    cfg = data_config({"bucket_step": 8, "resolution": 32, "trigger": "ohwx", "keep_tokens": 1,
                       "datasets": [{"dir": str(a), "caption_dropout": 0.3, "shuffle_captions": True}]})
    text = FakeText()
    ds, info = load_datasets(cfg, FakeAE(), text, device="cpu", dtype=torch.float32, progress=False)
    assert info["caption_dropout"] == 0.3 and info["shuffle_caption"] is True
    n = len(ds)
    rng = random.Random(0)
    draws = [ds[j + rng.randrange(ds.num_variants) * n] for j in (0, 1) * 300]  # what the sampler does
    empty = [d for d in draws if d["caption"] == ""]
    assert abs(len(empty) - 180) < 5 * (600 * 0.3 * 0.7) ** 0.5
    for d in draws:
        torch.testing.assert_close(d["txt"], text.vectors(d["caption"])[0])
        if d["caption"]:
            assert split_tags(d["caption"])[0] == "ohwx"  # keep_tokens = 1 keeps the prepended trigger first
    assert len({d["caption"] for d in draws if d["caption"]}) == 16  # 8 cached shuffles per caption


@pytest.mark.parametrize("data,needle", [
    ({"dir": "x", "resolutoin": 5}, "data.resolutoin: unknown key (did you mean 'resolution'?)"),
    ({"datasets": [{"dir": "a"}, {"dir": "b", "repeats": "ten"}]},
     "data.datasets[1].repeats: expected an integer, got 'ten'"),
    ({"datasets": [{"dri": "a"}]}, "data.datasets[0].dri: unknown key (did you mean 'dir'?)"),
    ({"datasets": [{"dir": "a", "caption_dropout": 1.5}]}, "data.datasets[0].caption_dropout = 1.5"),
    ({"datasets": [{"dir": "a", "is_reg": True}]}, "every [[data.datasets]] entry has is_reg = true"),
    ({"dir": "x", "datasets": [{"dir": "a"}]}, "data.dir = 'x' and [[data.datasets]] are both set"),
    ({"dir": "x", "resolution": "big"}, "data.resolution: expected an integer, got 'big'"),
])
def test_config_errors_name_the_key_and_value(data, needle):
    with pytest.raises(ConfigError) as e:
        data_config(data)
    assert needle in str(e.value) and "DataConfig" not in str(e.value)


def test_datasets_rules_and_targets_round_trip_through_the_resolved_config(tmp_path):
    """The resolved config written beside checkpoints (`dump_toml`) loads back equal, tables in lists included."""
    from dev2pro.config import dump_toml, load_config

    text = '''
[model]
base = "preset:tiny-dev@0"
t5_max_length = 256
[train]
steps = 1
optimizer = "adafactor"
optimizer_args = { clip_threshold = 2.0 }
scheduler = "cosine"
[output]
dir = "o"
save_dtype = "fp16"
[lora]
targets = ["attention", 'single_transformer_blocks\\..*\\.proj_mlp']
[[lora.rules]]
pattern = 'single_transformer_blocks\\..*\\.proj_mlp'
rank = 16
[[data.datasets]]
dir = "a"
keep_tokens = 1
shuffle_captions = true
[[data.datasets]]
dir = "reg"
is_reg = true
resolutions = [512, 768]
'''
    (tmp_path / "c.toml").write_text(text)
    cfg = load_config(TrainLoraConfig, tmp_path / "c.toml")
    assert cfg.lora.targets == ("attention", r"single_transformer_blocks\..*\.proj_mlp")
    assert cfg.lora.rules[0].rank == 16 and cfg.lora.rules[0].alpha is None and cfg.model.t5_max_length == 256
    assert cfg.data.datasets[1].is_reg and cfg.data.datasets[1].resolutions == (512, 768)
    (tmp_path / "resolved.toml").write_text(dump_toml(cfg))
    assert load_config(TrainLoraConfig, tmp_path / "resolved.toml") == cfg
    for bad, needle in (("lora.targets=['(']", "lora.targets[0] = '(': not a valid regex"),
                        ("model.t5_max_length=1024", "model.t5_max_length = 1024: must be in 1..512"),
                        ("train.scheduler=cosine_restarts", "train.scheduler: expected one of"),
                        ("lora.rules=[{pattern='x', rank='big'}]", "lora.rules[0].rank: expected an integer")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(TrainLoraConfig, tmp_path / "c.toml", [bad])


def test_t5_max_length_reaches_the_text_encoder(tmp_path, monkeypatch):
    import dev2pro.flux.text_encoders as te
    from dev2pro.toy.world import write_dataset
    from dev2pro.train.config import ModelConfig, TrainConfig
    from dev2pro.train.data_loading import load_train_data
    from dev2pro.train.distributed import setup_accelerator

    seen, real = [], te.load_text_encoder

    def spy(*args, max_length=512, **kw):
        seen.append(max_length)
        return real(*args, max_length=max_length, **kw)

    monkeypatch.setattr(te, "load_text_encoder", spy)
    data = data_config({"dir": str(write_dataset(tmp_path / "d", 2, seed=0)), "resolution": 32})
    acc = setup_accelerator(TrainConfig(steps=1, device="cpu"))
    model = ModelConfig(base="preset:tiny-dev@0", t5="toy", clip="toy", autoencoder="toy", t5_max_length=77)
    got = load_train_data(data, model, acc, [])
    assert seen == [77] and got.info["dataset_size"] == 2


def test_a_shard_folder_refuses_per_draw_captions(tmp_path):
    from dev2pro.train.data_loading import _load_shards

    cfg = data_config({"dir": str(tmp_path), "caption_dropout": 0.1})
    with pytest.raises(ConfigError, match="shard folder, which holds one embedding per caption"):
        _load_shards(cfg, None, "cpu", torch.float32, [], False)
