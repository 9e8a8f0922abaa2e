"""train-lora's speed/memory options end to end on a tiny model (CPU): `train.blocks_to_swap` trains the same LoRA
bit for bit (with gradient checkpointing and the monitor probe, which runs forward-only passes through the
swapped blocks), `train.fp8_matmul` falls back to the dequantize path where the kernel is not available (this CPU
without `force`) and is refused on a base without fp8 linears, `train.compile` reaches the model, and the other
recipes reject these keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from dev2pro.config import load_config
from dev2pro.errors import ConfigError
from dev2pro.train.config import LoraConfig, LoraOutputConfig, ModelConfig, MonitorConfig
from dev2pro.train.recipes import train_lora as R
from dev2pro.train.speed import LoraTrainConfig
from helpers import toy_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(out, dtype="fp32", monitor=0, **train):
    cfg = R.TrainLoraConfig(
        model=ModelConfig(base="preset:tiny-dev@0", dtype=dtype),
        train=LoraTrainConfig(steps=2, batch_size=2, lr=5e-3, device="cpu", seed=0, **train),
        output=LoraOutputConfig(dir=str(out), name="lora"), lora=LoraConfig(rank=4, alpha=4.0, targets="all-linear"),
        monitor=MonitorConfig(every=monitor, probe_size=2))
    return load_file(R.run(cfg, data=toy_data(4)))


def test_block_swap_and_fp8_matmul_train_the_same_lora(tmp_path):
    ref = _run(tmp_path / "ref", monitor=1, gradient_checkpointing=True)
    swapped = _run(tmp_path / "swap", monitor=1, gradient_checkpointing=True, blocks_to_swap=1)
    assert ref.keys() == swapped.keys() and all(torch.equal(ref[k], swapped[k]) for k in ref)
    assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_up" in k)  # it trained
    fp8_ref = _run(tmp_path / "fp8", dtype="fp8", mixed_precision="bf16")
    fp8_mm = _run(tmp_path / "fp8mm", dtype="fp8", mixed_precision="bf16", fp8_matmul=True, blocks_to_swap=1)
    assert all(torch.equal(fp8_ref[k], fp8_mm[k]) for k in fp8_ref)
    with pytest.raises(ConfigError, match="fp8 base"):
        _run(tmp_path / "bad", fp8_matmul=True)
    with pytest.raises(ConfigError, match="choose 1..1"):
        _run(tmp_path / "bad2", blocks_to_swap=2)


def test_compile_option_compiles_the_blocks(tmp_path, monkeypatch):
    from dev2pro.train import compile_blocks

    seen = []
    monkeypatch.setattr(compile_blocks, "compile_blocks", lambda model: seen.append(type(model).__name__) or 2)
    _run(tmp_path / "c", compile=True)
    assert seen == ["FluxTransformer2DModel"]


def test_options_are_train_lora_only(tmp_path):
    from dev2pro.train.recipes import dedistill

    toml = tmp_path / "c.toml"
    toml.write_text('[model]\nbase = "preset:tiny-pro@0"\n[train]\nsteps = 1\nblocks_to_swap = 2\n'
                    '[output]\ndir = "x"\n')
    with pytest.raises(ConfigError, match="blocks_to_swap"):
        load_config(dedistill.DedistillConfig, toml, [])
    assert dataclasses.fields(LoraTrainConfig)[-1].name == "compile"


@pytest.mark.parametrize("name, gib", [("lora-16gb", 16), ("lora-12gb", 12)])
def test_consumer_configs_load_and_fit_their_card_by_plan_memory(tmp_path, name, gib):
    import tomllib
    from pathlib import Path

    from dev2pro.train import memory_estimate as me
    from dev2pro.train.plan_memory import job_from_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    cfg = load_config(R.TrainLoraConfig, path, [f"data.dir={tmp_path}", f"output.dir={tmp_path / 'o'}"])
    assert cfg.train.blocks_to_swap > 0 and cfg.data.resolution == 1024
    job = job_from_config(tomllib.loads(path.read_text()))
    assert job.blocks_to_swap == cfg.train.blocks_to_swap and job.weight_dtype == "fp8"
    total = me.estimate(job).gpu_total
    assert total < (gib - 1.5) * me.GiB  # headroom for the desktop and allocator spikes
    assert me.estimate(dataclasses.replace(job, blocks_to_swap=0)).gpu_total > total + 1.3 * me.GiB
