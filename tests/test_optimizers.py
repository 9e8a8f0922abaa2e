"""Optimizers (AdamW8bit, Adafactor, Prodigy) and diffusers LR schedulers in train-lora: exact resume (k steps,
resume, N-k steps == N steps straight, bit for bit, optimizer and scheduler state from the checkpoint), the LR of
every step against the schedulers' closed forms, and the optimizer named in the LoRA metadata."""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dev2pro.errors import ConfigError
from dev2pro.train.config import LoraConfig, LoraOutputConfig, ModelConfig, TrainConfig
from dev2pro.train.recipes import train_lora as R
from helpers import toy_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
N, K, W, LR = 4, 2, 1, 5e-3


def closed_form(name: str, s: int) -> float:
    """The LR factor of diffusers' schedulers at step s (warmup W, N steps), written from their definitions."""
    if s < W and name != "constant":
        return s / W
    p = (s - W) / (N - W)
    return {"linear": max(0.0, 1 - p), "constant_with_warmup": 1.0, "constant": 1.0,
            "cosine_with_restarts": 0.5 * (1 + math.cos(math.pi * ((2 * p) % 1.0))),
            "polynomial": ((LR - 1e-7) * (1 - p) ** 2 + 1e-7) / LR}[name]


def log(out) -> list[dict]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("optimizer,scheduler", [("adamw8bit", "cosine_with_restarts"), ("adafactor", "polynomial"),
                                                 ("prodigy", "linear")])
def test_exact_resume_and_lr_curve(tmp_path, optimizer, scheduler):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    lr = 1.0 if optimizer == "prodigy" else LR
    train = TrainConfig(steps=N, batch_size=4, lr=lr, device="cpu", seed=0, optimizer=optimizer, scheduler=scheduler,
                        warmup_steps=W, lr_cycles=2, lr_power=2.0,
                        optimizer_args={"min_8bit_size": 0} if optimizer == "adamw8bit" else {})
    cfg = R.TrainLoraConfig(model=ModelConfig(base="preset:tiny-dev@0", dtype="fp32"), train=train,
                            output=LoraOutputConfig(dir=str(tmp_path / "a"), save_every=K, save_dtype="fp32"),
                            lora=LoraConfig(rank=4, alpha=4.0))
    straight = R.run(cfg, data=toy_data(8))
    # resume from checkpoint-K in a copy of the run folder, as after a crash right after that save
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns(f"checkpoint-{N}", "lora.*"))
    cfg_b = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(tmp_path / "b")))
    resumed = R.run(cfg_b, resume=True, data=toy_data(8))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_up" in k)  # it trained
    rows_a, rows_b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b] and len(rows_b) == N
    want = [lr * closed_form(scheduler, s) for s in range(N)]
    assert [float(r["lr"]) for r in rows_a] == pytest.approx(want, rel=1e-6, abs=1e-12)
    with safe_open(str(straight), "pt") as f:
        meta = f.metadata()
    label = {"adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "prodigy": "Prodigy"}[optimizer]
    assert meta["ss_optimizer"].split("(")[0].endswith("." + label) and meta["ss_lr_scheduler"] == scheduler
    if optimizer == "adamw8bit":  # 8-bit moments really are in the checkpoint
        st = load_file(str(tmp_path / "a" / f"checkpoint-{N}" / "optimizer.safetensors"))
        assert any(v.dtype == torch.uint8 for v in st.values())


def test_bad_optimizer_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.lr = 0.0001 with train.optimizer = 'prodigy'"):
        TrainConfig(steps=1, optimizer="prodigy", lr=1e-4).validate()
    from dev2pro.train.optim import set_lr  # the full-model recipes keep the built-in schedule

    with pytest.raises(ConfigError, match="train.scheduler = 'cosine' is supported by train-lora only"):
        set_lr(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0, TrainConfig(steps=1,
                                                                                                scheduler="cosine"))
    cfg = R.TrainLoraConfig(model=ModelConfig(base="preset:tiny-dev@0", dtype="fp32"),
                            train=TrainConfig(steps=1, device="cpu", optimizer="adafactor",
                                              optimizer_args={"betaz": 0.9}),
                            output=LoraOutputConfig(dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match=r"train.optimizer_args = \{'betaz': 0.9\}: not accepted by .*Adafactor"):
        R.run(cfg, data=toy_data(4))
