"""Fault suite: the trainer never loses a run, and bad input never produces a traceback or a silently wrong result.

Training faults (tiny-cpu config, 8 steps, a checkpoint every 2): kill -9 at a random step then `--resume` gives the
bit-identical LoRA of an uninterrupted run; a crash in the middle of writing a checkpoint leaves the previous one
loadable (resume from it reproduces the reference); a NaN loss stops with a message naming the step and the last good
checkpoint; a full disk while saving is one clear line and the previous checkpoint is intact.

Bad inputs go through the CLI (`dev2pro.cli.main`, as a user would type them): each is either a one-line error with
exit code 2 or a skip/conversion counted in the scan report, and for converted images the pixels that reach the
cache are checked (EXIF rotation applied, 16-bit scaled not clipped, alpha over white, grayscale and palette to RGB).
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dev2pro.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny-cpu.toml")
STEPS = 8
FAST = [f"train.steps={STEPS}", "output.save_every=2", "output.keep_last=10", "sample.every=0", "monitor.every=0",
        "train.batch_size=2"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def lora_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "tiny-lora.safetensors"))


def assert_same_lora(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_line_error(err: str) -> str:
    """The CLI's single error line (`dev2pro <command>: error: ...`); progress bars may precede it on stderr."""
    assert "Traceback" not in err, err
    assert err.count(": error: ") == 1, err
    i = err.index(": error: ")
    return err[err.rfind("dev2pro ", 0, i):].split("\n")[0]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    from dev2pro.toy.world import write_dataset

    return write_dataset(tmp_path_factory.mktemp("toy") / "images", 4, seed=0)


@pytest.fixture(scope="module")
def reference(toy_data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """An uninterrupted run: the LoRA every faulted-then-resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train-lora", CONFIG, f"data.dir={toy_data}", f"output.dir={out}", *FAST]) == 0
    return lora_tensors(out)


# ---------------------------------------------------------------------------------------------------------------------
# Training faults


def test_kill_9_at_a_random_step_then_resume_is_bit_identical(toy_data, reference, tmp_path, capsys):
    seed = int(time.time()) % 1000
    kill_after = random.Random(seed).randint(3, STEPS - 1)  # a checkpoint (step 2) exists by then
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dev2pro.cli", "train-lora", CONFIG, f"data.dir={toy_data}", f"output.dir={out}",
           *FAST]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.csv"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().strip().splitlines()) - 1 >= kill_after:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"training finished before the kill (seed {seed}, step {kill_after})"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "tiny-lora.safetensors").exists()
    code, _, err = run_cli(["train-lora", CONFIG, f"data.dir={toy_data}", f"output.dir={out}", *FAST, "--resume"],
                           capsys)
    assert code == 0, err
    assert_same_lora(lora_tensors(out), reference)


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way up handles it."""


def _failing_save_file(monkeypatch, fail_on_call: int, exc: BaseException):
    """Patch safetensors' `save_file` (what checkpoints are written with) to write half a file and raise on the
    `fail_on_call`-th call."""
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            buf = st.save(tensors, metadata=metadata)
            Path(filename).write_bytes(buf[: len(buf) // 2])
            raise exc
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save)


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(toy_data, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # Each checkpoint calls save_file 3 times (rng, trainable, optimizer): call 5 is inside checkpoint-4.
    _failing_save_file(monkeypatch, 5, Crash())
    with pytest.raises(Crash):
        main(["train-lora", CONFIG, f"data.dir={toy_data}", f"output.dir={out}", *FAST])
    monkeypatch.undo()
    assert _checkpoint_steps(out) == [2]
    # the previous checkpoint loads: resuming from it reproduces the uninterrupted run exactly
    code, _, err = run_cli(["train-lora", CONFIG, f"data.dir={toy_data}", f"output.dir={out}", *FAST, "--resume"],
                           capsys)
    assert code == 0, err
    assert_same_lora(lora_tensors(out), reference)


def test_disk_full_while_saving_is_one_line_and_previous_checkpoint_intact(toy_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _failing_save_file(monkeypatch, 5, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code, _, err = run_cli(["train-lora", CONFIG, f"data.dir={toy_data}", f"output.dir={out}", *FAST], capsys)
    monkeypatch.undo()
    assert code == 2
    line = one_line_error(err)
    assert "No space left on device" in line and "checkpoint-2" in line
    assert _checkpoint_steps(out) == [2] and not list(out.glob(".tmp-*"))
    state = load_file(str(out / "checkpoint-2" / "trainable.safetensors"))
    assert state and all(torch.isfinite(v).all() for v in state.values())


def test_nan_loss_stops_naming_the_step_and_last_good_checkpoint(toy_data, tmp_path, monkeypatch, capsys):
    from dev2pro.flux import flow

    real = flow.flow_loss
    calls = {"n": 0}

    def poisoned(pred, target, weight=None):
        calls["n"] += 1
        loss = real(pred, target, weight)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(flow, "flow_loss", poisoned)
    out = tmp_path / "run"
    code, _, err = run_cli(["train-lora", CONFIG, f"data.dir={toy_data}", f"output.dir={out}", *FAST], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "nan" in line.lower() and "step 5" in line and "checkpoint-4" in line
    assert _checkpoint_steps(out) == [2, 4]
    state = load_file(str(out / "checkpoint-4" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (out / "tiny-lora.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Bad data, end to end through `dev2pro cache` and `dev2pro train-lora`


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (what a decompression bomb looks like to a scanner)."""
    data = _png(Image.new("RGB", (8, 8)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def _half(width: int, height: int, left, right, mode="RGB") -> Image.Image:
    a = np.zeros((height, width, len(left)), np.uint8)
    a[:, : width // 2] = left
    a[:, width // 2 :] = right
    return Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a, mode)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """Two good images plus every data fault in issue 7; returns the folder."""
    from dev2pro.toy.world import write_dataset

    d = write_dataset(tmp_path_factory.mktemp("bad") / "images", 2, seed=1)
    rgb = Image.new("RGB", (32, 32), (200, 40, 40))
    files: dict[str, bytes] = {
        "zero_byte.png": b"",
        "truncated.jpg": _jpeg(_half(32, 32, (255, 0, 0), (0, 0, 255)))[:300],
        "truncated.png": _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)))[:200],
        "text_named.png": b"this is not an image\n",
        "cmyk.jpg": _jpeg(Image.new("CMYK", (32, 32), (0, 255, 255, 0))),  # pure red in CMYK
        "gray.png": _png(Image.new("L", (32, 32), 128)),
        "rgba.png": _png(Image.new("RGBA", (32, 32), (0, 0, 0, 0))),  # fully transparent black: white expected
        "palette.png": _png(rgb.convert("P")),
        "bomb.png": _bomb_png(20000, 20000),
        "too_small.png": _png(Image.new("RGB", (4, 4))),
        # stored 64x32 with red left / blue right; orientation 6 = rotate 90 CW to display: red on top, 32x64
        "exif_rotated.jpg": _jpeg(_half(64, 32, (255, 0, 0), (0, 0, 255)), exif=_exif_orientation(6)),
    }
    a16 = np.full((32, 32), 32768, np.uint16)  # 16-bit mid gray: must not become white
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, format="PNG")
    files["gray16.png"] = buf.getvalue()
    for name, data in files.items():
        (d / name).write_bytes(data)
        (d / name).with_suffix(".txt").write_text(f"a test image {name}")
    (d / "gray16.txt").write_text("")  # empty caption
    (d / "gray.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))  # not UTF-8
    (d / "orphan.txt").write_text("a caption without its image")
    return d


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


SKIPPED = ["zero_byte.png", "truncated.jpg", "truncated.png", "text_named.png", "bomb.png", "too_small.png"]


def test_bad_images_and_captions_are_counted_and_converted_correctly(bad_data, tmp_path, capsys):
    from dev2pro.toy.world import ToyAutoencoder

    code, out, err = run_cli(["cache", str(bad_data), str(tmp_path / "shards"), "--ae", "toy", "--t5", "toy",
                                 "--resolution", "32", "--quiet"],
                             capsys)
    assert code == 0, err
    assert "Traceback" not in err
    report = out + err
    for name in SKIPPED:
        assert name in report, f"{name} not reported as skipped"
    assert "skipped" in report
    assert "orphan.txt" in report and "gray.txt" in report and "gray16.txt" in report
    assert "EXIF orientation applied: 1" in report
    # What reached the cache: decode each cached image with the (exact) toy autoencoder.
    ae = ToyAutoencoder()
    images = {}
    for manifest in sorted((tmp_path / "shards").glob("shard-*.json")):
        meta = json.loads(manifest.read_text())
        lat = load_file(str(manifest.with_suffix(".safetensors")))["latents"]
        for i, name in enumerate(meta["images"]):
            images[name] = ((ae.decode(lat[i : i + 1])[0] + 1) * 127.5).round()  # (3, H, W) in 0..255
    assert not set(SKIPPED) & set(images)
    assert {"cmyk.jpg", "gray.png", "rgba.png", "palette.png", "gray16.png", "exif_rotated.jpg"} <= set(images)
    rot = images["exif_rotated.jpg"]
    assert rot.shape[1] > rot.shape[2], "EXIF rotation not applied (still landscape)"
    top, bottom = rot[:, : rot.shape[1] // 4].mean((1, 2)), rot[:, -rot.shape[1] // 4 :].mean((1, 2))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)
    assert images["gray16.png"].mean().item() == pytest.approx(128, abs=3), "16-bit PNG clipped"
    assert images["rgba.png"].min().item() >= 250, "transparent pixels not composited over white"
    assert images["gray.png"].mean().item() == pytest.approx(128, abs=2)
    cmyk = images["cmyk.jpg"].mean((1, 2))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60, cmyk
    pal = images["palette.png"].mean((1, 2))
    assert pal[0] > 150 and pal[1] < 90, pal


def test_train_lora_runs_on_the_bad_folder_with_skips_counted(bad_data, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    code, _, err = run_cli(["train-lora", CONFIG, f"data.dir={bad_data}", f"output.dir={out}", "train.steps=1",
                            "output.save_every=0", "sample.every=0", "monitor.every=0"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    # the scan report is a logging warning (printed on stderr by the CLI; captured by pytest's caplog here)
    report = err + caplog.text
    assert "skipped" in report and all(name in report for name in SKIPPED)
    assert (out / "tiny-lora.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Bad model files, LoRAs, configs and output folders: one line, exit code 2


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    from dev2pro.flux import models

    d = tmp_path_factory.mktemp("files")
    good = models.random_transformer(models.PRESETS["tiny-dev"])
    save_file({k: v.contiguous() for k, v in good.state_dict().items()}, str(d / "good.safetensors"))
    data = (d / "good.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    save_file({"encoder.layers.0.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)},
              str(d / "other_arch.safetensors"))
    (d / "model.ckpt").write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00statsq\x01K\x00u.")  # a pickle stream
    # LoRA in kohya format whose shapes do not fit tiny-dev (hidden 32): in 64 instead of 32.
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(64, 4),
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0)},
              str(d / "wrong_shape_lora.safetensors"))
    save_file({"lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_double_blocks_7_img_attn_proj.alpha": torch.tensor(4.0)},
              str(d / "no_match_lora.safetensors"))
    (d / "not_a_dir").write_text("a file where the output folder should be")
    return {p.stem: p for p in d.iterdir()}


BAD_RUNS = {
    # case: (overrides, words the one-line error must contain)
    "truncated safetensors": (["model.base={truncated}"], ["truncated.safetensors"]),
    "safetensors of another architecture": (["model.base={other_arch}"], ["other_arch.safetensors"]),
    "pickle checkpoint": (["model.base={model}"], ["model.ckpt"]),
    "LoRA whose shapes do not fit": (["model.adapter={wrong_shape_lora}"], ["wrong_shape_lora.safetensors"]),
    "LoRA with keys matching no module": (["model.adapter={no_match_lora}"], ["no_match_lora.safetensors"]),
    "config with an unknown key": (["train.stepz=3"], ["stepz"]),
    "config value of the wrong type": (["train.steps=many"], ["train.steps"]),
    "output folder not writable": (["output.dir={not_a_dir}/run"], ["not_a_dir"]),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_is_one_line_with_exit_code_2(case, toy_data, bad_files, tmp_path, capsys):
    overrides, words = BAD_RUNS[case]
    overrides = [o.format(**{k: str(v) for k, v in bad_files.items()}) for o in overrides]
    argv = ["train-lora", CONFIG, f"data.dir={toy_data}", f"output.dir={tmp_path / 'run'}", "train.steps=1",
            "sample.every=0", "monitor.every=0", *overrides]
    code, _, err = run_cli(argv, capsys)
    assert code == 2, f"{case}: exit {code}\n{err[-2000:]}"
    line = one_line_error(err)
    for w in words:
        assert w in line, f"{case}: {line}"
