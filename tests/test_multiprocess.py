"""Data-parallel equality on CPU with 2 processes (gloo): DDP and FSDP2, launched by torchrun.

Per-process batch b over 2 processes must match 1 process with batch 2b (same seed, same data; 2 accumulated
micro-batches per step, so DDP's no_sync path runs too) in loss trajectory within float tolerance: the sampler gives
rank r the items [r b, (r + 1) b) of each global batch and the objective's noise, times and dropout are drawn for the
global batch (see dev2pro.train.distributed). A checkpoint written by 2 processes must resume in 1. The same file is the
worker script (`python tests/test_multiprocess.py --worker ...`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
STEPS = 4


def _worker(out: str, strategy: str, batch: int, steps: int, save_every: int, resume: bool) -> None:
    import torch

    from dev2pro.toy.world import ToyAutoencoder, ToyTextEncoder, make_batch
    from dev2pro.train.config import DistributedConfig, ModelConfig, OutputConfig, TrainConfig
    from dev2pro.train.data_loading import InMemoryDataset, TrainData, encode_prompts
    from dev2pro.train.recipes import dedistill

    torch.set_num_threads(1)
    images, captions, _ = make_batch(8, 0)
    text = ToyTextEncoder()
    txt, pooled = text.encode(captions)
    data = TrainData(dataset=InMemoryDataset(ToyAutoencoder().encode(images), txt, pooled, captions),
                     prompts=encode_prompts(text, []))
    cfg = dedistill.DedistillConfig(
        model=ModelConfig(base="preset:tiny-dev@0"),
        train=TrainConfig(steps=steps, batch_size=batch, grad_accum=2, lr=2e-3, device="cpu",
                          timestep_sampling="uniform"),
        output=OutputConfig(dir=out, name="model", dtype="fp32", save_every=save_every, keep_last=5),
        distributed=DistributedConfig(strategy=strategy))
    dedistill.run(cfg, resume=resume, data=data)


def _launch(tmp: Path, name: str, nproc: int, strategy: str, batch: int, steps: int = STEPS, save_every: int = 0,
            resume: bool = False, out: Path | None = None) -> Path:
    out = out or tmp / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + (os.getpid() + hash(name)) % 2000), str(HERE), "--worker", str(out), strategy, str(batch),
           str(steps), str(save_every)] + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _losses(out: Path) -> list[float]:
    with open(out / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    return _launch(tmp, "single", 1, "ddp", 4, steps=STEPS + 2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, single, strategy):
    import torch
    from safetensors.torch import load_file

    two = _launch(tmp_path, strategy, 2, strategy, 2, save_every=2)
    ref = _losses(single)[:STEPS]
    got = _losses(two)
    assert len(got) == STEPS
    state = json.loads((two / "checkpoint-2" / "state.json").read_text())
    assert state["world_size"] == 2 and state["distributed"] == strategy
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-6)
    if strategy != "fsdp2":
        return
    # the 2-process (sharded) checkpoint resumes in 1 process and continues the 1-process trajectory
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    (resumed / "model.safetensors").unlink()
    _launch(tmp_path, "resume", 1, strategy, 4, steps=STEPS + 2, resume=True, out=resumed)
    torch.testing.assert_close(torch.tensor(_losses(resumed)), torch.tensor(_losses(single)), rtol=1e-4, atol=1e-6)
    a, b = load_file(str(single / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", nargs=5)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    out, strategy, batch, steps, save_every = a.worker
    _worker(out, strategy, int(batch), int(steps), int(save_every), a.resume)
