"""Shared training components: LR schedule, global draws, checkpoints (atomic, keep-last, disk full), output dir,
NaN guard, logs, EMA, and the guidance-health monitor."""

from __future__ import annotations

import csv
import dataclasses
import errno
import math
from types import SimpleNamespace

import pytest
import torch

from dev2pro.errors import UserError
from dev2pro.train.checkpointing import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dev2pro.train.config import LoraConfig, LoraOutputConfig, ModelConfig, MonitorConfig, OutputConfig, TrainConfig
from dev2pro.train.distributed import load_model
from dev2pro.train.ema import Ema
from dev2pro.train.flow_step import flow_batch
from dev2pro.train.optim import NonFiniteLoss, lr_factor, set_lr
from dev2pro.train.run_logs import RunLog, prepare_output_dir
from helpers import toy_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fake_acc(world: int, rank: int):
    return SimpleNamespace(num_processes=world, process_index=rank)


def test_lr_factor_warmup_then_cosine_closed_form():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    for s in (10, 35, 60, 109, 110):
        p = (s - 10) / 100
        assert lr_factor(s, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    const = dataclasses.replace(cfg, lr_schedule="constant")
    assert lr_factor(50, const) == 1.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert set_lr(opt, 4, dataclasses.replace(cfg, lr=2e-4)) == pytest.approx(1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_flow_batch_global_draw_slices_match_the_full_batch():
    """2 ranks x b see exactly the noise and times of 1 rank x 2b."""
    lat = torch.randn(4, 12, 8, 8)
    txt, pooled = torch.randn(4, 16, 64), torch.randn(4, 32)
    cfg = TrainConfig(steps=1, timestep_sampling="logit_normal")
    full = flow_batch(lat, txt, pooled, cfg, torch.Generator().manual_seed(3), fake_acc(1, 0), "cpu")
    parts = [flow_batch(lat[r * 2:(r + 1) * 2], txt[r * 2:(r + 1) * 2], pooled[r * 2:(r + 1) * 2], cfg,
                        torch.Generator().manual_seed(3), fake_acc(2, r), "cpu") for r in range(2)]
    for field in ("noise", "t", "x_t", "target"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(full, field)), field
    # the convention of flow.py: x_t = (1 - t) x0 + t eps, v = eps - x0
    tb = full.t[:, None, None]
    torch.testing.assert_close(full.x_t, (1 - tb) * full.x0 + tb * full.noise)
    torch.testing.assert_close(full.target, full.noise - full.x0)


def _tiny_run(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return acc, model, opt


def test_checkpoints_are_atomic_keep_last_and_survive_a_full_disk(tmp_path, monkeypatch):
    acc, model, opt = _tiny_run(tmp_path)
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, acc, model, opt, generator=gen, config_toml="x = 1\n", keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # fail in the middle of the checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", full_disk)
    with pytest.raises(UserError) as e:
        save_checkpoint(tmp_path, 4, acc, model, opt, generator=gen, keep_last=2)
    msg = str(e.value)
    assert "\n" not in msg and "No space left" in msg and "checkpoint-3 is intact" in msg
    monkeypatch.setattr(st, "save_file", real)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # a half-written folder without state.json is never taken for a checkpoint
    (tmp_path / "checkpoint-9").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    with torch.no_grad():
        model.weight.add_(1.0)
    resumed = load_checkpoint(tmp_path / "checkpoint-3", acc, model, opt, generator=gen)
    assert resumed.step == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_rng_states_round_trip():
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(1)
    torch.rand(3, generator=gen)
    tensors, meta = rng_state(gen)
    expect = (torch.rand(2, generator=gen), torch.rand(2), np.random.rand(2), random.random())
    g2 = torch.Generator().manual_seed(99)
    set_rng_state(tensors, meta, g2)
    got = (torch.rand(2, generator=g2), torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    assert np.array_equal(got[2], expect[2]) and got[3] == expect[3]


def test_output_dir_not_writable_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="output.dir .* is not writable") as e:
        prepare_output_dir(blocker / "run")
    assert "\n" not in str(e.value)


def test_nan_loss_stops_naming_the_step_and_last_checkpoint(tmp_path, monkeypatch):
    from dev2pro.flux import flow
    from dev2pro.train.recipes import train_base

    real = flow.flow_loss
    calls = {"n": 0}

    def poisoned(pred, target, weight=None):
        calls["n"] += 1
        out = real(pred, target, weight)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(flow, "flow_loss", poisoned)
    cfg = train_base.TrainBaseConfig(
        model=ModelConfig(base="preset:tiny-pro@0"),
        train=TrainConfig(steps=5, batch_size=4, device="cpu"),
        output=OutputConfig(dir=str(tmp_path), save_every=2))
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 3 .*; last good checkpoint: .*checkpoint-2"):
        train_base.run(cfg, data=toy_data(8))
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_run_log_csv_drops_rows_after_the_resumed_step(tmp_path):
    log = RunLog(tmp_path, True, tensorboard=False)
    for s in range(1, 6):
        log.log(s, {"loss": float(s)})
    log = RunLog(tmp_path, True, resume_step=3, tensorboard=False)
    log.log(4, {"loss": 40.0})
    log.log(5, {"loss": 50.0, "loss/t2": 7.0})  # a new column: earlier rows get empty cells
    log.log(6, {"loss/t2": 8.0})
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), r["loss"], r["loss/t2"]) for r in rows] == [
        (1, "1.0", ""), (2, "2.0", ""), (3, "3.0", ""), (4, "40.0", ""), (5, "50.0", "7.0"), (6, "", "8.0")]


def test_ema_matches_the_recurrence():
    p = {"w": torch.zeros(3)}
    ema = Ema({"w": torch.nn.Parameter(torch.zeros(3))}, decay=0.9)
    ref = torch.zeros(3)
    for k in range(1, 6):
        p["w"] = torch.full((3,), float(k))
        ema.update(p)
        ref = 0.9 * ref + 0.1 * p["w"]
    torch.testing.assert_close(ema.shadow["w"], ref)


# ---------------------------------------------------------------------------------------------------------------------
# monitor


def test_monitor_metrics_closed_form():
    from dev2pro.train.monitor import rel_norm

    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])
    assert rel_norm(a, a) == 0.0
    assert rel_norm(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1.0)
    assert rel_norm(b + 1, torch.tensor([2.0, 2.0])) == pytest.approx(0.5)


def _lora_monitor_run(tmp_path, base: str, g: float, steps: int = 10, every: int = 5) -> list[dict]:
    from dev2pro.train.recipes import train_lora as R

    out = tmp_path / f"g{g}"
    cfg = R.TrainLoraConfig(
        model=ModelConfig(base=base, dtype="fp32"),
        train=TrainConfig(steps=steps, guidance=g, batch_size=4, lr=3e-2, device="cpu", seed=0),
        output=LoraOutputConfig(dir=str(out)), lora=LoraConfig(rank=8, alpha=8.0, targets="all-linear"),
        monitor=MonitorConfig(every=every))
    R.run(cfg, data=toy_data(8))
    with open(out / "monitor.csv") as f:
        return list(csv.DictReader(f))


def test_monitor_curves_move_during_a_lora_run(tmp_path):
    """The monitor logs at 0, every, ..., steps; drift starts at exactly 0 and moves; the guidance response moves.
    On a random (not guidance-distilled) tiny base the *direction* says nothing about erosion: measured with 20 steps
    at lr 3e-2, the response went 0.836 -> 1.507 training at g = 1.0 and 0.836 -> 0.961 at g = 3.5 (the random
    guidance embedding has no distilled meaning to erode). The erosion comparison needs toy:dev (next test)."""
    from dev2pro.flux.checkpoint import save_transformer
    from dev2pro.flux.models import PRESETS, random_transformer

    base = tmp_path / "base.safetensors"
    save_transformer(random_transformer(PRESETS["tiny-dev"], seed=0, std=0.2), base, format="bfl")
    rows = _lora_monitor_run(tmp_path, str(base), 3.5)
    assert [int(r["step"]) for r in rows] == [0, 5, 10]
    assert float(rows[0]["drift_g1"]) == 0.0 and float(rows[0]["drift_g3.5"]) == 0.0
    assert float(rows[-1]["drift_g3.5"]) > 0.01
    assert float(rows[-1]["guidance_response"]) != float(rows[0]["guidance_response"])


def test_monitor_lora_guidance_response_on_toy_dev(tmp_path):
    """On the guidance-distilled toy dev: LoRAs trained at g = 1.0 and at g = 3.5 with a large learning rate both
    move the guidance response; the numbers are printed (which one moves it more is an empirical question, see
    docs/training.md: on a small distilled model made in the same way both eroded it, g = 1.0 slightly more)."""
    from dev2pro.toy.assets import model_path

    if not model_path("dev", must_exist=False).exists():
        pytest.skip("toy:dev is not built (dev2pro toy build)")
    moves = {}
    for g in (1.0, 3.5):
        rows = _lora_monitor_run(tmp_path, "toy:dev", g)
        r0, r1 = float(rows[0]["guidance_response"]), float(rows[-1]["guidance_response"])
        moves[g] = abs(r1 - r0) / r0
        print(f"toy:dev, LoRA at g={g}: guidance response {r0:.4f} -> {r1:.4f}")
    assert min(moves.values()) > 0.02, moves


def test_load_model_dtypes():
    from dev2pro.flux.fp8 import Fp8Linear

    m = load_model("preset:tiny-dev@0", "fp8", "cpu")
    fp8 = [mod for mod in m.modules() if isinstance(mod, Fp8Linear)]
    assert fp8 and all(mod.weight.dtype == torch.float8_e4m3fn for mod in fp8)
    assert m.x_embedder.weight.dtype == torch.bfloat16  # embedders stay high precision
    assert load_model("preset:tiny-dev@0", "bf16", "cpu").x_embedder.weight.dtype == torch.bfloat16
    assert load_model("preset:tiny-dev@0", "auto", "cpu").x_embedder.weight.dtype == torch.float32
