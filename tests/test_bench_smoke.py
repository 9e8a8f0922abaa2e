"""The benchmark scripts import and run one tiny iteration each (the real runs are `bench/run_all.py` and
`bench/gpu_lora_step.py`); numbers they rely on are checked where a tiny run can check them."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.mark.parametrize("name", ["common", "fp8_error", "convert_rss", "sampling_speed", "lora_memory", "train_step",
                                  "reference_diffusers_loop", "gpu_lora_step", "run_all"])
def test_bench_modules_import(name):
    importlib.import_module(f"bench.{name}")


def test_fp8_error_tiny():
    from bench import fp8_error

    r = fp8_error.measure("tiny-dev", latent=4, txt_len=4)
    assert set(r) == {"none", "tensor", "channel"}
    # per-weight errors: scaled fp8 uses the normal range, so it is more precise than a plain cast on std-0.02 weights
    assert r["tensor"]["weight"] < r["none"]["weight"] and r["channel"]["weight"] <= r["tensor"]["weight"] * 1.01


def test_sampler_matches_flux_pipeline_tiny():
    from bench import sampling_speed

    r = sampling_speed.measure("tiny-dev", latent=4, steps=2, txt_len=4)
    assert r["ours"] > 0 and r["diffusers"] > 0
    assert r["rel_diff"] < 1e-4  # same transformer, same schedule: the two samplers agree


def test_reference_loop_two_steps(tmp_path):
    from bench import reference_diffusers_loop as ref

    from dev2pro.flux import models
    from dev2pro.toy.world import ToyAutoencoder, ToyTextEncoder, write_dataset

    data = write_dataset(tmp_path / "d", 2, seed=0)
    model = models.random_transformer(models.PRESETS["tiny-dev"])
    times = ref.train(model, ToyAutoencoder(), ToyTextEncoder(), data, steps=2, batch_size=2, size=32, rank=4)
    assert len(times) == 2
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # B moved away from zero: the loop trains


def test_gpu_script_dry_run_on_cpu(tmp_path):
    from bench import gpu_lora_step

    out = tmp_path / "gpu.md"
    assert gpu_lora_step.main(["--preset", "tiny-dev", "--device", "cpu", "--steps", "1", "--warmup", "0",
                               "--resolutions", "32", "--bases", "bf16,fp8", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| bf16 | 32 |" in text and "| fp8 | 32 |" in text


def test_lora_memory_jobs_are_estimable():
    from bench import lora_memory

    from dev2pro.train.plan_memory import estimate

    jobs = lora_memory.jobs(quick=True)
    peaks = {k: estimate(j).peak for k, j in jobs.items()}
    assert all(v > 0 for v in peaks.values())
    assert torch.tensor(list(peaks.values())).isfinite().all()
