"""`dev2pro sample` end to end on tiny presets with the toy components: files, numbers, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro import cli, sampling
from dev2pro.lora import LoraLayer, LoraWeights, merge_lora_into_model
from dev2pro.lora_files import save_lora

PROMPTS = ["a red circle on a black background", "a small green cross on a white background, top left"]


@pytest.fixture(autouse=True)
def quiet_diffusers():
    """diffusers warns on `model.to(dtype)`; its log handler may hold a stream closed by an earlier capsys."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    yield
    dlog.set_verbosity(level)


def _run(argv, capsys):
    code = cli.main(["sample", "--no-progress", *argv])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    layers = {  # one attention layer and the output projection (which moves the velocity directly)
        "transformer_blocks.0.attn.to_q": LoraLayer(torch.randn(4, 32, generator=g),
                                                    torch.randn(32, 4, generator=g), 4.0),
        "proj_out": LoraLayer(torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g) * 0.1, 4.0),
    }
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_lora(path, LoraWeights(layers=layers), format="diffusers")
    return path


def test_sample_writes_images_that_match_the_sampler(tmp_path, capsys, lora_file):
    from dev2pro.checkpoint import load_transformer
    from dev2pro.lora_files import load_lora
    from dev2pro.toy.world import ToyAutoencoder, ToyTextEncoder

    out = tmp_path / "out"
    code, cap = _run(["--base", "preset:tiny-dev", *PROMPTS, "--seed", "1", "2", "--steps", "2",
                      "--lora", f"{lora_file}:0.5", "--out", str(out)], capsys)
    assert code == 0, cap.err
    assert "wrote 4 images" in cap.out
    names = ["p00_s1.png", "p00_s2.png", "p01_s1.png", "p01_s2.png"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["files"] == names and settings["guidance"] == 3.5 and settings["loras"] == [[str(lora_file), 0.5]]
    # the same images through the library: base + LoRA merged at 0.5, toy components, default guidance 3.5
    model = load_transformer("preset:tiny-dev")
    base_imgs = sampling.generate(model, ToyAutoencoder(), ToyTextEncoder(), PROMPTS, height=32, width=32, steps=2,
                                  seeds=[1, 2], progress=False)
    merge_lora_into_model(model, load_lora(lora_file), 0.5)
    imgs = sampling.generate(model, ToyAutoencoder(), ToyTextEncoder(), PROMPTS, height=32, width=32, steps=2,
                             seeds=[1, 2], progress=False)
    for name, ref, base in zip(names, sampling.to_pil(imgs), sampling.to_pil(base_imgs)):
        got = np.asarray(Image.open(out / name).convert("RGB")).astype(int)
        assert got.shape == (32, 32, 3)
        assert np.abs(got - np.asarray(ref).astype(int)).max() <= 1, name
        assert np.abs(got - np.asarray(base).astype(int)).max() > 8, "the LoRA had no visible effect"
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 seeds per row, 2 prompts


def test_sample_true_cfg_from_prompts_file(tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# evaluation prompts\n\na large blue square on a gray background\n")
    out = tmp_path / "cfg"
    code, cap = _run(["--base", "preset:tiny-pro", "--prompts-file", str(pf), "--cfg", "3", "--negative", "blurry",
                      "--steps", "2", "--width", "16", "--height", "24", "--out", str(out)], capsys)
    assert code == 0, cap.err
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == ["a large blue square on a gray background"]
    assert settings["cfg"] == 3.0 and settings["negative"] == "blurry" and settings["guidance"] is None
    assert Image.open(out / "p00_s0.png").size == (16, 24)
    assert "true CFG 3" in cap.out


@pytest.mark.parametrize("argv,message", [
    (["--base", "missing/flux1-dev.safetensors", "a cat"], "missing/flux1-dev.safetensors' not found"),
    (["--base", "preset:tiny-dev"], "no prompts"),
    (["--base", "preset:tiny-dev", "--lora", "nope.safetensors:0.8", "a cat"], "LoRA file 'nope.safetensors' not"),
    (["--base", "preset:tiny-dev", "--width", "30", "--steps", "1", "a cat"], "multiple of 4"),
    (["--base", "preset:nope", "--ae", "toy", "--t5", "toy", "--clip", "toy", "a cat"], "unknown preset 'nope'"),
    (["--base", "preset:flux-dev", "a cat"], "--ae --t5 --clip required"),
])
def test_sample_user_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    code, cap = _run([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dev2pro sample: error:") and message in lines[0], cap.err


def test_sample_help_has_examples():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["sample"]
    text = sub.format_help()
    for needle in ("--guidance 3.5", "--cfg 3.5 --negative", "--lora", "--prompts-file", "toy:dev"):
        assert needle in text
