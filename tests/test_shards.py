"""Shards: round trip against direct encoding, resumable writing, per-rank disjoint streaming, exact resume, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro.cli import main as cli_main
from dev2pro.data.config import DataConfig
from dev2pro.data.folders import load_image, scan_dataset
from dev2pro.data.shards import ShardStream, plan_shards, read_info, write_shards
from dev2pro.errors import DataError


class FakeAE:
    latent_channels, downsample, identity = 3, 4, "fake-ae"

    def __init__(self):
        self.encoded = 0

    def encode(self, images):
        self.encoded += images.shape[0]
        return torch.nn.functional.avg_pool2d(images, 4) * 2.0 + 0.25


class FakeText:
    context_dim, pooled_dim, identity = 6, 4, "fake-text"

    def encode(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little"))
            out.append((torch.randn(5, 6, generator=g), torch.randn(4, generator=g)))
        return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])


def make_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (32, 32) if i % 3 else (48, 24)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"image number {i}")
    return root


def index_of(root: Path):
    return scan_dataset(DataConfig(dir=str(root), resolution=32, bucket_step=8), 8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    root = make_folder(tmp / "data", 17)  # 11 at 32x32, 6 at 40x24
    out = tmp / "out"
    info = write_shards(index_of(root), FakeAE(), FakeText(), out, shard_size=4, batch_size=3, progress=False)
    return root, out, info


def test_round_trip_matches_direct_encoding(built):
    root, out, info = built
    assert [s["count"] for s in info["shards"]] == [4, 4, 3, 4, 2]  # 32x32: 4+4+3, then 40x24: 4+2
    assert info["written"] == 5 and read_info(out)["items"] == 17
    index = index_of(root)
    by_caption = {it.caption: it for it in index.items}
    stream = ShardStream(out, batch_size=1, shuffle=False)
    seen = 0
    for _, batch in zip(range(17), stream):
        item = by_caption[batch["captions"][0]]
        ref = FakeAE().encode(load_image(item, item.bucket, "center")[None])
        assert torch.equal(batch["latents"], ref)
        txt, pooled = FakeText().encode([item.caption])
        assert torch.equal(batch["txt"], txt) and torch.equal(batch["pooled"], pooled) and batch["t5"] is batch["txt"]
        seen += 1
    assert seen == 17
    manifest = json.loads((out / "shard-000000.json").read_text())
    assert manifest["bucket"] == [32, 32] and len(manifest["keys"]) == 4 and manifest["images"][0].endswith(".png")


def test_rerun_keeps_complete_shards_and_rewrites_changed(built, tmp_path):
    root, out, _ = built
    ae = FakeAE()
    info = write_shards(index_of(root), ae, FakeText(), out, shard_size=4, progress=False)
    assert ae.encoded == 0 and info["kept"] == 5
    # copy, change one image and damage one shard: only those two shards are rewritten
    data = make_folder(tmp_path / "data", 17)
    out2 = tmp_path / "out"
    write_shards(index_of(data), FakeAE(), FakeText(), out2, shard_size=4, progress=False)
    Image.fromarray(np.zeros((24, 48, 3), np.uint8)).save(data / "00.png")  # in shard 3 (first 40x24)
    (out2 / "shard-000004.safetensors").write_bytes(b"broken")
    ae = FakeAE()
    info = write_shards(index_of(data), ae, FakeText(), out2, shard_size=4, progress=False)
    assert info["written"] == 2 and ae.encoded == 4 + 2
    # a smaller rerun removes shards beyond the new plan
    write_shards(index_of(data), FakeAE(), FakeText(), out2, shard_size=100, progress=False)
    assert sorted(p.name for p in out2.glob("shard-*.json")) == ["shard-000000.json", "shard-000001.json"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_disjoint_and_complete_per_epoch(built, world):
    _, out, info = built
    keys = []
    for rank in range(world):
        s = ShardStream(out, rank=rank, world_size=world, seed=3, batch_size=2)
        n = sum(len(s._batches_of_shard(sh, 0)) for sh in s.shards_of_epoch(0))
        it = iter(s)
        for _ in range(n):
            batch = next(it)
            assert batch["latents"].shape[0] == 2  # one bucket per batch
            keys += batch["keys"]
        assert s.epoch == 0
        next(it)
        assert s.epoch == 1
    assert len(keys) == len(set(keys))  # no item on two ranks
    assert len(keys) == sum(c["count"] // 2 * 2 for c in info["shards"])  # everything but odd leftovers


def test_stream_resume_exact(built):
    _, out, _ = built
    ref = ShardStream(out, rank=1, world_size=2, seed=9, batch_size=2)
    full = [b["keys"] for _, b in zip(range(20), ref)]
    for k in [0, 1, 4, 7, 13]:
        a = ShardStream(out, rank=1, world_size=2, seed=9, batch_size=2)
        got = [b["keys"] for _, b in zip(range(k), a)]  # range first: zip must not pull an extra batch
        assert got == full[:k]
        state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint file
        b = ShardStream(out, rank=1, world_size=2, seed=9, batch_size=2)
        b.load_state_dict(state)
        assert [x["keys"] for _, x in zip(range(20 - k), b)] == full[k:]
    with pytest.raises(DataError):
        ShardStream(out, rank=0, world_size=2, seed=9, batch_size=2).load_state_dict(state)


def test_stream_errors(built, tmp_path):
    _, out, _ = built
    with pytest.raises(DataError, match="shards with at least 4 items for 6 processes"):
        ShardStream(out, rank=0, world_size=6, batch_size=4)
    with pytest.raises(DataError, match="not found"):
        ShardStream(tmp_path / "nothing")
    assert plan_shards(index_of(built[0]), 100)[0][0].bucket == (32, 32)


def test_cli_cache_with_toy_encoders(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 5)
    (data / "broken.png").write_bytes(b"")
    rc = cli_main(["cache", str(data), str(tmp_path / "out"), "--ae", "toy", "--t5", "toy",
                         "--resolution", "32", "--shard-size", "2", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0 and "broken.png" in captured.out and "3 shards" in captured.out
    batch = next(iter(ShardStream(tmp_path / "out", batch_size=1)))
    assert batch["latents"].shape[1] == 12  # toy autoencoder: pixel-unshuffle by 2 -> 12 channels
    (tmp_path / "empty").mkdir()
    rc = cli_main(["cache", str(tmp_path / "empty"), str(tmp_path / "out2"), "--ae", "toy", "--t5", "toy", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no images" in err


def test_parallel_cache_slices_equal_one_process(tmp_path, capsys):
    """Two processes (--process-index I --num-processes 2, launched together) write shard files byte-identical to a
    one-process run and the same dataset.json; one slice alone leaves dataset.json unwritten, and a rerun with one
    process completes it while encoding only the other slice."""
    import os
    import subprocess
    import sys

    import dev2pro

    data = make_folder(tmp_path / "data", 9)
    common = ["--ae", "toy", "--t5", "toy", "--resolution", "32", "--shard-size", "2", "--quiet"]
    assert cli_main(["cache", str(data), str(tmp_path / "one"), *common]) == 0
    src = str(Path(dev2pro.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen([sys.executable, "-m", "dev2pro.cli", "cache", str(data), str(tmp_path / "two"), *common,
                               "--process-index", str(i), "--num-processes", "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "process 0 of 2" in outs[0][0] and "process 1 of 2" in outs[1][0]
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(one) == 2 * 5 + 1  # 5 shards
    for name in one:
        if name != "dataset.json":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert read_info(tmp_path / "one") == read_info(tmp_path / "two")

    capsys.readouterr()
    assert cli_main(["cache", str(data), str(tmp_path / "part"), *common, "--process-index", "1",
                     "--num-processes", "2"]) == 0
    assert "not yet: the last process to finish writes it" in capsys.readouterr().out
    assert not (tmp_path / "part" / "dataset.json").exists()
    assert sorted(p.name for p in (tmp_path / "part").glob("*.json")) == ["shard-000001.json", "shard-000003.json"]
    assert cli_main(["cache", str(data), str(tmp_path / "part"), *common]) == 0
    assert "(3 written, 2 already complete)" in capsys.readouterr().out
    assert read_info(tmp_path / "part") == read_info(tmp_path / "one")
    with pytest.raises(DataError, match="the index must be in 0..1"):
        write_shards(index_of(data), FakeAE(), FakeText(), tmp_path / "x", process_index=2, num_processes=2)


def test_a_process_group_writes_dataset_json_after_the_barrier(built, tmp_path):
    root, out, _ = built
    calls = []
    kw = dict(shard_size=4, progress=False, num_processes=2, barrier=lambda: calls.append(1))
    info = write_shards(index_of(root), FakeAE(), FakeText(), tmp_path / "o", process_index=1, **kw)
    assert not info["complete"] and not (tmp_path / "o" / "dataset.json").exists() and len(calls) == 2
    info = write_shards(index_of(root), FakeAE(), FakeText(), tmp_path / "o", process_index=0, **kw)
    assert info["complete"] and info["written"] == 3 and read_info(tmp_path / "o")["shards"] == read_info(out)["shards"]
