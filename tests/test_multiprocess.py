"""Every trainer under 2 processes on CPU (gloo), launched by torchrun, against 1-process references.

Per-process batch b over 2 processes must match 1 process with batch 2b (same seed, same data; 2 accumulated
micro-batches per step, so DDP's no_sync and FSDP2's deferred reduce-scatter / HSDP's skipped all-reduce run too) in
loss trajectory within float tolerance: the sampler gives rank r the items [r b, (r + 1) b) of each global batch and
the objective's noise, times and dropout are drawn for the global batch (see dev2pro.train.distributed).

Launches are few (each costs seconds of start-up), so each worker runs a list of jobs in one process group:
- `single` (1 process): dedistill fp32 + EMA with DCP checkpoints (the reference, and the checkpoint a 2-process
  run resumes: 1 -> 2), and the bf16 references of distill, train-base, train-lora;
- `ddp` (2): dedistill under DDP, train-lora under DDP with bf16;
- `fsdp2` (2): dedistill under FSDP2 (deferred reduce-scatter) writing DCP checkpoints, the 1 -> 2 resume, dedistill
  under HSDP (replicate 2 x shard 1), distill (sharded teacher, and whole fp8 teacher) and train-base under FSDP2
  with bf16, and the shared-folder check;
- `resume` (1): the 2-process DCP checkpoint resumed on 1 process (2 -> 1);
- `hsdp4` (4): dedistill under HSDP with a real 2-D mesh (replicate 2 x shard 2, one sample per process), writing
  DCP checkpoints.
The same file is the worker script (`python tests/test_multiprocess.py --worker JOBS.json`).
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


def _data():
    from dev2pro.toy.world import ToyAutoencoder, ToyTextEncoder, make_batch
    from dev2pro.train.data_loading import InMemoryDataset, TrainData, encode_prompts

    images, captions, _ = make_batch(8, 0)
    text = ToyTextEncoder()
    txt, pooled = text.encode(captions)
    return TrainData(dataset=InMemoryDataset(ToyAutoencoder().encode(images), txt, pooled, captions),
                     prompts=encode_prompts(text, []))


def _run_job(job: dict) -> None:
    from dev2pro.train.config import (
        DistributedConfig,
        EmaConfig,
        LoraConfig,
        LoraOutputConfig,
        ModelConfig,
        OutputConfig,
        TrainConfig,
    )
    from dev2pro.train.recipes import dedistill, distill, train_base, train_lora

    if job.get("copy_from"):  # resume another run's checkpoint: start from a copy of its folder
        import torch.distributed as dist

        if int(os.environ.get("RANK", "0")) == 0:
            skip = shutil.ignore_patterns("*.safetensors", "*.toml", "checkpoint-*")
            shutil.copytree(job["copy_from"], job["out"], ignore=skip)
            shutil.copytree(Path(job["copy_from"]) / "checkpoint-2", Path(job["out"]) / "checkpoint-2")
        if dist.is_initialized():
            dist.barrier()
    recipe = job["recipe"]
    train = TrainConfig(steps=job["steps"], batch_size=job["batch"], grad_accum=2, lr=2e-3, device="cpu",
                        timestep_sampling="uniform", mixed_precision=job.get("mp", "no"))
    dist_cfg = DistributedConfig(strategy=job["strategy"], replicate=job.get("replicate", 1),
                                 defer_reduce_scatter=job.get("defer", False))
    out = OutputConfig(dir=job["out"], name="model", dtype="fp32", save_every=job.get("save_every", 0), keep_last=5)
    base = ModelConfig(base="preset:tiny-dev@0" if recipe in ("dedistill", "train_lora") else "preset:tiny-pro@0")
    if recipe == "dedistill":
        cfg = dedistill.DedistillConfig(model=base, train=train, output=out, distributed=dist_cfg,
                                        ema=EmaConfig(enabled=job.get("ema", False), decay=0.5))
        dedistill.run(cfg, resume=job.get("resume", False), data=_data())
    elif recipe.startswith("distill"):
        section = distill.DistillSection(teacher_fp8=recipe == "distill_fp8")
        distill.run(distill.DistillRecipeConfig(model=base, train=train, output=out, distributed=dist_cfg,
                                                distill=section), data=_data())
    elif recipe == "train_base":
        train_base.run(train_base.TrainBaseConfig(model=base, train=train, output=out, distributed=dist_cfg),
                       data=_data())
    else:
        train_lora.run(train_lora.TrainLoraConfig(
            model=base, train=train, output=LoraOutputConfig(dir=job["out"], format="diffusers"),
            lora=LoraConfig(rank=4, alpha=4.0), distributed=dist_cfg), data=_data())


def _shared_dir_job(root: str) -> None:
    """Each process gets its own `output.dir` (as on nodes without a shared filesystem): every one must refuse."""
    import torch.distributed as dist

    from dev2pro.errors import UserError
    from dev2pro.train.config import TrainConfig
    from dev2pro.train.distributed import setup_accelerator
    from dev2pro.train.run_logs import prepare_output_dir

    acc = setup_accelerator(TrainConfig(steps=1, device="cpu"))
    rank = dist.get_rank()
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        prepare_output_dir(Path(root) / f"node{rank}", acc)
        msg = "accepted"
    except UserError as e:
        msg = str(e)
    (Path(root) / f"refusal-{rank}.txt").write_text(msg)


def _worker(jobs_file: str) -> None:
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1)
    # The recipes end with `end_training`, which destroys the process group (a CLI run ends there); this worker runs
    # several recipes in one group.
    Accelerator.end_training = lambda self: None
    for job in json.loads(Path(jobs_file).read_text()):
        if job["recipe"] == "shared_dir":
            _shared_dir_job(job["out"])
        else:
            _run_job(job)


def _launch(tmp: Path, name: str, nproc: int, jobs: list[dict]) -> None:
    jobs_file = tmp / f"{name}-jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + (os.getpid() + hash(name)) % 2000), str(HERE), "--worker", str(jobs_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    with open(out / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _close(got, ref, rtol, atol=1e-6):
    import torch

    assert len(got) == len(ref), (got, ref)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=rtol, atol=atol)


BF16 = ("distill", "distill_fp8", "train_base")  # run in bf16 under FSDP2 and as 1-process references


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All launches (module-scoped: they are the expensive part); the tests below check their outputs."""
    t = tmp_path_factory.mktemp("mp")
    dd = dict(recipe="dedistill", steps=STEPS, ema=True)
    _launch(t, "single", 1, [
        {**dd, "out": str(t / "single"), "strategy": "ddp", "batch": 4, "steps": STEPS + 2, "save_every": 2},
        *[{"recipe": r, "out": str(t / f"single-{r}"), "strategy": "ddp", "batch": 4, "steps": 3, "mp": "bf16"}
          for r in (*BF16, "train_lora")]])
    _launch(t, "ddp", 2, [
        {**dd, "out": str(t / "ddp"), "strategy": "ddp", "batch": 2, "save_every": 2},
        {"recipe": "train_lora", "out": str(t / "ddp-train_lora"), "strategy": "ddp", "batch": 2, "steps": 3,
         "mp": "bf16"}])
    _launch(t, "fsdp2", 2, [
        {**dd, "out": str(t / "fsdp2"), "strategy": "fsdp2", "batch": 2, "save_every": 2, "defer": True},
        {**dd, "out": str(t / "grow"), "strategy": "fsdp2", "batch": 2, "steps": STEPS + 2, "resume": True,
         "copy_from": str(t / "single")},
        {**dd, "out": str(t / "hsdp"), "strategy": "fsdp2", "batch": 2, "replicate": 2},
        *[{"recipe": r, "out": str(t / f"fsdp2-{r}"), "strategy": "fsdp2", "batch": 2, "steps": 3, "mp": "bf16"}
          for r in BF16],
        {"recipe": "shared_dir", "out": str(t / "shared")}])
    resumed = t / "shrink"
    shutil.copytree(t / "fsdp2", resumed)
    (resumed / "model.safetensors").unlink()
    _launch(t, "resume", 1, [{**dd, "out": str(resumed), "strategy": "fsdp2", "batch": 4, "steps": STEPS + 2,
                              "resume": True}])
    _launch(t, "hsdp4", 4, [{**dd, "out": str(t / "hsdp4"), "strategy": "fsdp2", "batch": 1, "replicate": 2,
                             "save_every": 2}])
    return t


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "hsdp"])
def test_two_processes_match_one(runs, name):
    """fp32: the 2-process trajectory is the 1-process one up to float summation order."""
    _close(_losses(runs / name), _losses(runs / "single")[:STEPS], rtol=1e-4)
    if name != "hsdp":
        state = json.loads((runs / name / "checkpoint-2" / "state.json").read_text())
        assert state["world_size"] == 2 and state["format"] == "dcp" and state["ema"]
        assert state["distributed"] == name


def test_hsdp_on_a_two_by_two_mesh_matches_one_process(runs):
    """4 processes, replicate 2 x shard 2: parameters sharded in halves inside each replica group, gradients
    reduce-scattered in the group and all-reduced across groups; the trajectory and the exported EMA model are the
    1-process run's and the exported EMA model the 2-process FSDP2 run's within float tolerance; the DCP checkpoint
    holds each shard half once."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    _close(_losses(runs / "hsdp4"), _losses(runs / "single")[:STEPS], rtol=1e-4)
    state = json.loads((runs / "hsdp4" / "checkpoint-2" / "state.json").read_text())
    assert state["world_size"] == 4 and state["format"] == "dcp"
    rows = 0
    for f in sorted((runs / "hsdp4" / "checkpoint-2").glob("shard-*.safetensors")):
        with safe_open(str(f), "pt") as st:
            if "model.transformer_blocks.0.attn.to_q.weight" in st.keys():
                rows += st.get_slice("model.transformer_blocks.0.attn.to_q.weight").get_shape()[0]
    assert rows == 32  # the two shard halves, each written once (replicas do not duplicate them)
    a = load_file(str(runs / "fsdp2" / "model.safetensors"))  # the same 4 steps on a 1-D mesh of 2 processes
    b = load_file(str(runs / "hsdp4" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_sharded_checkpoint_has_one_file_per_rank_and_exports_by_streaming(runs):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dev2pro.flux.checkpoint import save_transformer
    from dev2pro.flux.sharded_source import ShardedSource

    ckpt = runs / "fsdp2" / "checkpoint-4"
    files = sorted(p.name for p in ckpt.glob("shard-*.safetensors"))
    assert files == ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    rows = []
    for f in files:  # each rank wrote its half of every block weight (FSDP2 shards dim 0)
        with safe_open(str(ckpt / f), "pt") as st:
            rows.append(st.get_slice("model.transformer_blocks.0.attn.to_q.weight").get_shape()[0])
    assert rows == [16, 16]
    src = ShardedSource(ckpt)  # the EMA is what gets exported
    assert src.prefix == "ema"
    out = save_transformer(src, runs / "exported.safetensors", format="bfl")
    src.close()
    final = load_file(str(runs / "fsdp2" / "model.safetensors"))
    again = load_file(str(out))
    assert final.keys() == again.keys() and all(final[k].equal(again[k]) for k in final)


def test_resume_across_process_counts_continues_the_trajectory(runs):
    """2 -> 1 (`shrink`) and 1 -> 2 (`grow`, from the 1-process run's checkpoint-2): the losses after the resumed
    step and the exported EMA model equal the uninterrupted 1-process run's within float tolerance."""
    import torch
    from safetensors.torch import load_file

    ref = _losses(runs / "single")
    _close(_losses(runs / "shrink"), ref, rtol=1e-4)
    _close(_losses(runs / "grow"), ref, rtol=1e-4)
    a = load_file(str(runs / "single" / "model.safetensors"))
    for name in ("shrink", "grow"):
        b = load_file(str(runs / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", [*BF16, "train_lora"])
def test_every_trainer_under_two_processes_in_bf16(runs, recipe):
    """distill (sharded teacher or whole fp8 teacher) and train-base under FSDP2 (bf16 all-gathers, fp32 reduction),
    train-lora under DDP, all with bf16 autocast and 2 accumulated micro-steps: the same trajectory as 1 process
    within bf16 rounding (measured: <= 0.6 %)."""
    two = runs / ("ddp-train_lora" if recipe == "train_lora" else f"fsdp2-{recipe}")
    _close(_losses(two), _losses(runs / f"single-{recipe}"), rtol=2e-2)
    assert (two / ("lora.safetensors" if recipe == "train_lora" else "model.safetensors")).is_file()


def test_an_unshared_output_dir_is_refused_on_every_process(runs):
    for rank in (0, 1):
        msg = (runs / "shared" / f"refusal-{rank}.txt").read_text()
        assert "is not shared: process(es) [1]" in msg, msg


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    _worker(p.parse_args().worker)
