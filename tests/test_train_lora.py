"""train-lora end to end on tiny models (CPU): overfit, exact resume, adapter, tiny-cpu config, bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dev2pro.errors import ConfigError, UserError
from dev2pro.train.checkpointing import latest_checkpoint, list_checkpoints
from dev2pro.train.config import LoraConfig, LoraOutputConfig, ModelConfig, TrainConfig
from dev2pro.train.optim import grad_norm_and_clip
from dev2pro.train.recipes import train_lora as R
from helpers import toy_data

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config(out: Path, steps: int, **sections) -> R.TrainLoraConfig:
    train = dict(steps=steps, batch_size=4, lr=5e-3, device="cpu", seed=0)
    train.update(sections.pop("train", {}))
    cfg = R.TrainLoraConfig(
        model=ModelConfig(base="preset:tiny-dev@0", dtype="fp32"), train=TrainConfig(**train),
        output=LoraOutputConfig(dir=str(out), name="lora"), lora=LoraConfig(rank=4, alpha=4.0))
    return dataclasses.replace(cfg, **sections)


def losses(out: Path) -> list[float]:
    import csv

    with open(out / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained_like_base(tmp_path_factory) -> Path:
    """A tiny base whose outputs have the scale of a trained model's (init std 0.2 instead of 0.02: with 0.02 the
    frozen output layer caps the prediction at ~0.1 and no LoRA on the blocks can fit a unit-variance target)."""
    from dev2pro.flux.checkpoint import save_transformer
    from dev2pro.flux.models import PRESETS, random_transformer

    path = tmp_path_factory.mktemp("base") / "tiny-dev-s02.safetensors"
    save_transformer(random_transformer(PRESETS["tiny-dev"], seed=0, std=0.2), path, format="bfl")
    return path


def test_overfit_fixed_batch(tmp_path, trained_like_base):
    out = tmp_path / "run"
    # 4 items and batch 4: every step sees the same batch (new noise and t each step)
    cfg = config(out, 50, train=dict(lr=1e-2, timestep_sampling="uniform"))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base=str(trained_like_base)),
                              lora=LoraConfig(rank=8, alpha=8.0, targets="all-linear"))
    path = R.run(cfg, data=toy_data(4))
    ls = losses(out)
    first, last = sum(ls[:5]) / 5, sum(ls[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["dev2pro.training_guidance"] == "1.0" and meta["dev2pro.steps"] == "50"
    assert meta["dev2pro.rank"] == "8" and meta["dev2pro.base_model"] == trained_like_base.name
    assert meta["dev2pro.base_model_hash"].startswith("sha256:")
    assert meta["dev2pro.dataset_size"] == "4" and meta["dev2pro.resolution"] == "32"
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in keys)


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    steps, data = 6, toy_data(8)
    kw = dict(output=LoraOutputConfig(dir="", name="lora", save_every=3, keep_last=1),
              train=dict(lr_schedule="cosine", warmup_steps=2))
    full = R.run(dataclasses.replace(config(tmp_path / "a", steps, **kw),
                                     output=LoraOutputConfig(dir=str(tmp_path / "a"), name="lora", save_every=3)),
                 data=data)
    cfg_b = dataclasses.replace(config(tmp_path / "b", steps, **kw),
                                output=LoraOutputConfig(dir=str(tmp_path / "b"), name="lora", save_every=3))
    real = grad_norm_and_clip
    calls = {"n": 0}

    def crash_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("dev2pro.train.optim.grad_norm_and_clip", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        R.run(cfg_b, data=toy_data(8))
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]
    monkeypatch.setattr("dev2pro.train.optim.grad_norm_and_clip", real)
    with pytest.raises(UserError, match="--resume"):
        R.run(cfg_b, data=toy_data(8))
    resumed = R.run(cfg_b, resume=True, data=toy_data(8))
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    ck = tmp_path / "b" / "checkpoint-6"
    assert {"trainable.safetensors", "optimizer.safetensors", "rng-0.safetensors", "sampler-0.json", "config.toml",
            "state.json"} <= {p.name for p in ck.iterdir()}


def test_adapter_equals_training_on_merged_base(tmp_path):
    from dev2pro.flux.checkpoint import load_transformer, save_transformer
    from dev2pro.lora.files import save_lora
    from dev2pro.lora.inject import LoraLayer, LoraWeights, merge_lora_into_model, resolve_targets

    base = load_transformer("preset:tiny-dev@0")
    g = torch.Generator().manual_seed(5)
    paths = resolve_targets(base, "all-linear")
    lin = dict(base.named_modules())
    adapter = LoraWeights(layers={
        p: LoraLayer(down=0.2 * torch.randn(2, lin[p].in_features, generator=g),
                     up=0.2 * torch.randn(lin[p].out_features, 2, generator=g), alpha=2.0) for p in paths})
    save_lora(tmp_path / "adapter.safetensors", adapter, "kohya")
    merge_lora_into_model(base, adapter)
    save_transformer(base, tmp_path / "merged.safetensors", format="bfl", dtype=torch.float32)

    cfg = config(tmp_path / "with", 5)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter=str(tmp_path / "adapter.safetensors")),
                              output=dataclasses.replace(cfg.output, format="diffusers"))
    with_adapter = load_file(str(R.run(cfg, data=toy_data(8))))
    cfg2 = config(tmp_path / "merged", 5)
    cfg2 = dataclasses.replace(cfg2, model=dataclasses.replace(cfg2.model, base=str(tmp_path / "merged.safetensors")),
                               output=dataclasses.replace(cfg2.output, format="diffusers"))
    on_merged = load_file(str(R.run(cfg2, data=toy_data(8))))
    assert with_adapter.keys() == on_merged.keys()
    moved = 0.0
    for k in with_adapter:
        torch.testing.assert_close(with_adapter[k], on_merged[k], rtol=1e-4, atol=1e-5)
        moved = max(moved, float(with_adapter[k].abs().max()))
    assert moved > 0  # the LoRA did train (B starts at zero)
    with safe_open(str(tmp_path / "with" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["dev2pro.adapter"] == "adapter.safetensors"


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dev2pro.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_tiny_cpu_config_runs_as_is(tmp_path):
    from dev2pro.toy.world import write_dataset

    data = write_dataset(tmp_path / "images", 16, seed=0)
    r = _cli("train-lora", str(ROOT / "configs" / "tiny-cpu.toml"), f"data.dir={data}", f"output.dir={tmp_path / 'o'}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "o"
    with safe_open(str(out / "tiny-lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["dev2pro.dataset_size"] == "16" and meta["dev2pro.training_guidance"] == "1.0"
    assert [s for s, _ in list_checkpoints(out)] == [10, 20]
    assert (out / "samples" / "step-000020.png").is_file()
    assert (out / "monitor.csv").read_text().count("\n") >= 4
    assert list((out / "tb").iterdir())
    assert "guidance = 1.0" in (out / "checkpoint-20" / "config.toml").read_text()


@pytest.mark.parametrize("case", ["empty", "captions_only", "missing_base", "unknown_key", "wrong_type"])
def test_bad_input_is_one_line_exit_2(tmp_path, case, capsys):
    from dev2pro.cli import main

    data = tmp_path / "data"
    data.mkdir()
    args = [str(ROOT / "configs" / "tiny-cpu.toml"), f"data.dir={data}", f"output.dir={tmp_path / 'o'}"]
    if case == "captions_only":
        (data / "a.txt").write_text("a red circle")
    if case in ("missing_base", "unknown_key", "wrong_type"):
        from dev2pro.toy.world import write_dataset

        write_dataset(data, 4, seed=0)
    if case == "missing_base":
        args.append(f"model.base={tmp_path / 'nope.safetensors'}")
    if case == "unknown_key":
        args.append("train.stepz=3")
    if case == "wrong_type":
        args.append("train.steps=many")
    code = main(["train-lora", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s" not in ln and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("dev2pro train-lora: error:"), err
    expect = {"empty": "no images", "captions_only": "caption", "missing_base": "nope.safetensors",
              "unknown_key": "stepz", "wrong_type": "train.steps"}[case]
    assert expect in lines[0]


def test_lora_on_an_fp8_base_with_bf16_autocast(tmp_path):
    """fp32 LoRA on an fp8 file (block linears Fp8Linear, the rest bf16), bf16 autocast: trains and saves."""
    from dev2pro.flux.checkpoint import save_transformer
    from dev2pro.flux.models import PRESETS, random_transformer

    base = tmp_path / "fp8.safetensors"
    save_transformer(random_transformer(PRESETS["tiny-dev"], seed=0, std=0.2), base, format="bfl",
                     dtype="fp8_e4m3fn", scaling="tensor")
    cfg = config(tmp_path / "o", 3, train=dict(mixed_precision="bf16"))
    cfg = dataclasses.replace(cfg, model=ModelConfig(base=str(base), dtype="auto"))
    lora = load_file(str(R.run(cfg, data=toy_data(8))))
    assert all(v.dtype == (torch.float32 if k.endswith(".alpha") else torch.bfloat16) and torch.isfinite(v).all()
               for k, v in lora.items())  # output.save_dtype = "bf16" by default
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in lora.items())
    with pytest.raises(ConfigError, match="mixed_precision"):
        R.run(dataclasses.replace(cfg, train=TrainConfig(steps=1, device="cpu"),
                                  output=LoraOutputConfig(dir=str(tmp_path / "p"))), data=toy_data(8))


def test_diffusers_loader_reproduces_the_trained_model(tmp_path, trained_like_base):
    """Oracle: the diffusers-format LoRA loaded by diffusers' own `load_lora_adapter` into a fresh base gives the
    output of our trained model as it was in memory (rebuilt from the final checkpoint's raw peft weights)."""
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.models import image_ids, pack_latents, predict, text_ids
    from dev2pro.lora.inject import add_lora

    cfg = config(tmp_path / "o", 3, lora=LoraConfig(rank=4, alpha=4.0, targets="all-linear"))
    cfg = dataclasses.replace(cfg, output=LoraOutputConfig(dir=str(tmp_path / "o"), format="diffusers",
                                                           save_every=3, save_dtype="fp32"),
                              model=dataclasses.replace(cfg.model, base=str(trained_like_base)))
    data = toy_data(8)
    path = R.run(cfg, data=data)
    ours = load_transformer(trained_like_base)
    add_lora(ours, 4, 4.0, "all-linear")
    trained = load_file(str(tmp_path / "o" / "checkpoint-3" / "trainable.safetensors"))
    missing, unexpected = ours.load_state_dict(trained, strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    theirs = load_transformer(trained_like_base)
    theirs.load_lora_adapter(str(path), prefix="transformer", adapter_name="trained")
    item = data.dataset[0]
    x = pack_latents(item["latents"][None])
    args = (x, torch.tensor([0.6]), item["txt"][None], item["pooled"][None], image_ids(16, 16), text_ids(16), 1.0)
    with torch.no_grad():
        v_ours, v_theirs = predict(ours, *args), predict(theirs, *args)
        v_base = predict(load_transformer(trained_like_base), *args)
    assert (v_ours - v_base).abs().max() > 1e-2 * v_base.abs().max()  # the LoRA changes the output
    torch.testing.assert_close(v_theirs, v_ours, rtol=1e-5, atol=1e-5)


def test_train_lora_streams_a_shard_folder_and_resumes(tmp_path, capsys):
    """data.dir may be a `dev2pro cache` shard folder: streamed per rank, monitor probe from the first shard,
    per-rank stream position in the checkpoint."""
    import json

    from dev2pro.cli import main
    from dev2pro.toy.world import write_dataset

    images = write_dataset(tmp_path / "images", 12, seed=0)
    assert main(["cache", str(images), str(tmp_path / "shards"), "--ae", "toy", "--t5", "toy", "--resolution", "32",
                 "--shard-size", "4"]) == 0
    args = ["train-lora", str(ROOT / "configs" / "tiny-cpu.toml"), f"data.dir={tmp_path / 'shards'}",
            f"output.dir={tmp_path / 'o'}", "train.steps=4", "output.save_every=2", "sample.every=0",
            "monitor.every=2", "train.batch_size=2"]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    state = json.loads((tmp_path / "o" / "checkpoint-4" / "sampler-0.json").read_text())
    assert state["batch_size"] == 2 and {"epoch", "shard_pos", "batch_pos"} <= set(state)
    assert main([*args[:-2], "train.steps=6", "train.batch_size=2", "--resume"]) == 0
    assert latest_checkpoint(tmp_path / "o").name == "checkpoint-6"
