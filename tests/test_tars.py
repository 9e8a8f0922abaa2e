"""WebDataset tar shards: the tar list (braces, folders), key grouping and caption sources, per-rank disjoint streaming,
exact resume (draws included), deterministic skips of damaged input, and train-base trained from tars and resumed."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from dev2pro.data.config import DataConfig
from dev2pro.data.folders import load_image
from dev2pro.data.tars import (
    EncodedStream,
    TarStream,
    expand_braces,
    group_samples,
    is_tar_source,
    list_tars,
)
from dev2pro.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def image_bytes(png: Path, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.open(png).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def make_tars(root: Path, n_images: int, n_tars: int, seed: int = 0) -> Path:
    """`n_images` toy-world images with .txt captions, dealt round-robin into `n_tars` tars under root/tars."""
    from dev2pro.toy.world import write_dataset

    images = write_dataset(root / "images", n_images, seed=seed)
    out = root / "tars"
    out.mkdir(parents=True)
    pngs = sorted(images.glob("*.png"))
    for t in range(n_tars):
        with tarfile.open(out / f"part-{t:03d}.tar", "w") as tf:
            for p in pngs[t::n_tars]:
                add(tf, f"sample/{p.stem}.png", p.read_bytes())
                add(tf, f"sample/{p.stem}.txt", p.with_suffix(".txt").read_bytes())
    return out


def cfg_of(source, **kw) -> DataConfig:
    return DataConfig(dir=str(source), resolution=32, **kw)


def planned(stream: TarStream, epoch: int = 0) -> int:
    """Batches planned for this rank in `epoch` (skipped ones included)."""
    n = 0
    for p in stream.tars_of_epoch(epoch):
        tar, items = stream.index(p)
        if tar is not None:
            tar.close()
        n += len(stream.batches_of_tar(items, p, epoch))
    return n


def every_item(stream: TarStream, skipped: int = 0) -> list[str]:
    """The keys of one epoch of `stream` (its position left at the start of epoch 1)."""
    n = planned(stream) - skipped
    it = iter(stream)
    keys = [k for _, b in zip(range(n), it) for k in b["keys"]]
    assert stream.epoch == 0
    next(it)
    assert stream.epoch == 1
    return keys


def test_tar_list_from_braces_folders_and_files(tmp_path):
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    with pytest.raises(DataError, match="runs backwards"):
        expand_braces("s-{5..1}.tar")
    tars = make_tars(tmp_path, 6, 3)
    assert list_tars(str(tars / "part-{000..002}.tar")) == list_tars(tars) == sorted(tars.glob("*.tar"))
    assert is_tar_source(tars) and is_tar_source(tars / "part-000.tar") and is_tar_source(f"{tars}/x-{{0..1}}.tar")
    assert not is_tar_source(tmp_path / "images")  # an image folder (it has no tars)
    with pytest.raises(DataError, match=r"2 of the 4 tar shards of this pattern are missing \(first: .*part-003"):
        list_tars(str(tars / "part-{001..004}.tar"))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="none: no tar shards"):
        list_tars(tmp_path / "none")
    with pytest.raises(DataError, match="3 tar shards for 4 processes: .* at least 4 tars"):
        TarStream(tars, cfg_of(tars), 4, rank=0, world_size=4)
    from dev2pro.cli import main

    assert main(["cache", str(tars / "part-{000..001}.tar"), str(tmp_path / "o"), "--ae", "toy", "--t5", "toy"]) == 2


def test_key_grouping_and_caption_sources(tmp_path):
    from dev2pro.toy.world import ToyAutoencoder, ToyTextEncoder, write_dataset

    assert group_samples(["a/0001.jpg", "a/0001.seg.png", "a/0001.TXT", "b.c/2.json", "noext", ".hidden.txt"]) == {
        "a/0001": {"jpg": "a/0001.jpg", "seg.png": "a/0001.seg.png", "txt": "a/0001.TXT"},
        "b.c/2": {"json": "b.c/2.json"}}
    pngs = sorted(write_dataset(tmp_path / "img", 6, seed=1).glob("*.png"))
    with tarfile.open(tmp_path / "one.tar", "w") as tf:
        add(tf, "k/a.jpg", image_bytes(pngs[0], "JPEG"))
        add(tf, "k/a.txt", b"  from\n txt ")
        add(tf, "k/a.caption", b"not used: .txt wins")
        add(tf, "b.png", pngs[1].read_bytes())
        add(tf, "b.caption", b"from caption")
        add(tf, "b.json", b'{"caption": "not used: .caption wins"}')
        add(tf, "c.webp", image_bytes(pngs[2], "WEBP"))
        add(tf, "c.json", json.dumps({"caption": "from json caption", "text": "x"}).encode())
        add(tf, "d.png", pngs[3].read_bytes())
        add(tf, "d.json", json.dumps({"text": "from json text"}).encode())
        add(tf, "e.png", pngs[4].read_bytes())  # no caption: data.default_caption
        add(tf, "e.seg.png", pngs[5].read_bytes())  # another field of sample "e", not an image sample
        add(tf, "orphan.txt", b"no image")
    cfg = cfg_of(tmp_path / "one.tar", default_caption="fallback", trigger="zxq")
    stream = TarStream(cfg.dir, cfg, 4, batch_size=1, shuffle=False)
    got = {}
    for _, b in zip(range(5), stream):
        got[b["keys"][0]] = (b["captions"][0], b["images"])
    assert {k: c for k, (c, _) in got.items()} == {
        "one.tar/k/a": "zxq, from txt", "one.tar/b": "zxq, from caption", "one.tar/c": "zxq, from json caption",
        "one.tar/d": "zxq, from json text", "one.tar/e": "zxq, fallback"}
    assert torch.equal(got["one.tar/b"][1][0], load_image(pngs[1], (32, 32)))  # decoded as folders.load_image does
    enc = EncodedStream(stream, ToyAutoencoder(), ToyTextEncoder(), "cpu")
    batch = enc.encode({"images": got["one.tar/b"][1], "captions": ["zxq, from caption"], "keys": ["b"]})
    assert torch.equal(batch["latents"], ToyAutoencoder().encode(load_image(pngs[1], (32, 32))[None]))
    assert torch.equal(batch["txt"], ToyTextEncoder().encode(["zxq, from caption"])[0]) and batch["t5"] is batch["txt"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_disjoint_and_every_item_once_per_epoch(tmp_path, world):
    tars = make_tars(tmp_path, 14, 4)  # tars of 4, 4, 3, 3 images
    per_rank = []
    for rank in range(world):
        s = TarStream(tars, cfg_of(tars), 4, rank=rank, world_size=world, seed=5, batch_size=1)
        per_rank.append(every_item(s))
        assert len({k.split("/")[0] for k in per_rank[-1]}) == len(s.tars_of_epoch(0))  # whole tars per rank
    keys = [k for ks in per_rank for k in ks]
    assert len(keys) == len(set(keys)) == 14  # no item on two ranks, every item once
    s2 = TarStream(tars, cfg_of(tars), 4, seed=5, batch_size=2)
    assert len(every_item(s2)) == 4 + 4 + 2 + 2  # each tar's odd leftover is dropped
    assert s2.tars_of_epoch(0) != s2.tars_of_epoch(1) or s2.tars_of_epoch(1) != s2.tars_of_epoch(2)  # reshuffled


def test_resume_is_exact_with_random_draws(tmp_path):
    tars = make_tars(tmp_path, 14, 4)
    cfg = cfg_of(tars, crop="random", flip=True, caption_dropout=0.3, shuffle_captions=True, keep_tokens=1)

    def stream():
        return TarStream(tars, cfg, 4, rank=1, world_size=2, seed=9, batch_size=2)

    full = [b for _, b in zip(range(12), stream())]  # 3 epochs of this rank
    assert any(c == "" for b in full for c in b["captions"])  # caption dropout is drawn per batch here
    for k in [0, 1, 3, 7]:
        a = stream()
        assert [b["keys"] for _, b in zip(range(k), a)] == [b["keys"] for b in full[:k]]
        b = stream()
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # survives a checkpoint file
        for x, ref in zip(b, full[k:]):
            assert x["keys"] == ref["keys"] and x["captions"] == ref["captions"]
            assert torch.equal(x["images"], ref["images"])
            if ref is full[-1]:
                break
    with pytest.raises(DataError, match="rank = 1, this run has 0: resume with the same settings"):
        TarStream(tars, cfg, 4, seed=9, batch_size=2).load_state_dict(a.state_dict())


def test_damaged_input_is_skipped_with_warnings_the_same_on_resume(tmp_path, caplog):
    tars = make_tars(tmp_path, 12, 3)
    (tars / "part-003.tar").write_bytes(b"not a tar at all" * 100)
    pngs = sorted((tmp_path / "images").glob("*.png"))
    with tarfile.open(tars / "part-004.tar", "w") as tf:  # 4 same-bucket images: two batches of 2
        for i, p in enumerate(pngs[:4]):
            data = image_bytes(p, "JPEG")
            sos = data.index(b"\xff\xda")  # start of scan: the header ends here
            add(tf, f"x{i}.jpg", data[: (sos + len(data)) // 2] if i == 1 else data)  # x1: header fine, pixels cut
            add(tf, f"x{i}.txt", b"caption")
        add(tf, "x8.png", pngs[5].read_bytes()[:200])  # a PNG cut short: its header fails when the tar is indexed
        add(tf, "x9.png", b"garbage, no image header")  # left out when the tar is indexed
    cfg = cfg_of(tars)
    with caplog.at_level(logging.WARNING, logger="dev2pro.data.tars"):
        s = TarStream(tars, cfg, 4, seed=2, batch_size=2, shuffle=False)
        keys = every_item(s, skipped=1)
    text = caplog.text
    assert "part-003.tar: member (whole tar)" in text and "not a readable plain tar" in text
    assert "part-004.tar: member x9.png: not an image: skipped" in text
    assert "part-004.tar: member x8.png: unreadable" in text
    assert "part-004.tar: member x1.jpg: unreadable: image file is truncated" in text
    assert "batch of 2 items is skipped" in text
    assert not any(k.startswith("part-004.tar/x1") for k in keys)
    assert sum(k.startswith("part-004.tar/") for k in keys) == 2  # the batch without x1 is streamed
    assert len(keys) == 12 + 2

    def run(n, state=None):
        st = TarStream(tars, cfg, 4, rank=0, world_size=2, seed=4, batch_size=2)
        if state is not None:
            st.load_state_dict(state)
        got = [b["keys"] for _, b in zip(range(n), st)]
        return got, st.state_dict()

    full, _ = run(10)
    for k in [2, 5]:
        head, state = run(k)
        tail, _ = run(10 - k, state)
        assert head + tail == full


def test_train_base_trains_on_tars_and_resumes_bit_identically(tmp_path, monkeypatch):
    """A full fine-tune streams tar shards (encoded on the fly with the toy encoders, caption dropout per draw) and a
    run interrupted after its step-2 checkpoint resumes at the same data position to the same final weights."""
    from safetensors.torch import load_file

    from dev2pro.train.config import ModelConfig, MonitorConfig, OutputConfig, TrainConfig
    from dev2pro.train.recipes import train_base

    tars = make_tars(tmp_path, 12, 3)

    def cfg(out):
        return train_base.TrainBaseConfig(
            model=ModelConfig(base="preset:tiny-pro@0", t5="toy", clip="toy", autoencoder="toy"),
            train=TrainConfig(steps=4, batch_size=2, lr=2e-3, device="cpu", timestep_sampling="uniform"),
            output=OutputConfig(dir=str(out), dtype="fp32", save_every=2),
            data=cfg_of(f"{tars}/part-{{000..002}}.tar", caption_dropout=0.2, shuffle_captions=True),
            monitor=MonitorConfig(every=2, probe_size=2))

    full = train_base.run(cfg(tmp_path / "a"))
    real, calls = train_base.set_lr, {"n": 0}

    def crash_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_base, "set_lr", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_base.run(cfg(tmp_path / "b"))
    monkeypatch.setattr(train_base, "set_lr", real)
    state = json.loads((tmp_path / "b" / "checkpoint-2" / "ranks" / "sampler-0.json").read_text())
    assert state["tars"] == 3 and {"epoch", "tar_pos", "batch_pos"} <= set(state)
    resumed = train_base.run(cfg(tmp_path / "b"), resume=True)
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
