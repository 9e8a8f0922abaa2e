"""`dev2pro sample` end to end on tiny presets with the toy components: files, numbers, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dev2pro import cli
from dev2pro.flux import sampling
from dev2pro.flux.models import random_transformer
from dev2pro.lora.files import save_lora
from dev2pro.lora.inject import LoraLayer, LoraWeights, merge_lora_into_model
from test_components import ae_files, text_folders, tiny_vae  # noqa: F401  (module fixtures: tiny real components)

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
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.lora.files import load_lora
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


def test_sample_with_real_component_loaders_and_fp8_base(tmp_path, capsys, ae_files, text_folders):  # noqa: F811
    """The real-Flux path at tiny size: BFL ae.safetensors, a pipeline folder for T5 + CLIP, an fp8 BFL base."""
    from dev2pro.flux.autoencoder import load_autoencoder
    from dev2pro.flux.checkpoint import load_transformer, save_transformer
    from dev2pro.flux.models import FluxSpec
    from dev2pro.flux.text_encoders import load_text_encoder

    root, _ = text_folders
    spec = FluxSpec(in_channels=64, vec_in_dim=24, context_in_dim=32, hidden_size=32, num_heads=2, depth=1,
                    depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=True)
    base = tmp_path / "base-fp8.safetensors"
    save_transformer(random_transformer(spec, seed=0, std=0.1), base, format="bfl", dtype="fp8_e4m3fn")
    out = tmp_path / "out"
    argv = ["--base", str(base), "--ae", str(ae_files / "ae.safetensors"), "--t5", str(root / "pipe"), "--clip",
            str(root / "pipe"), "--t5-max-length", "16", "--width", "16", "--height", "8", "--steps", "3",
            "--cfg", "2", "--negative", "dog", "--guidance", "2", "--out", str(out), "a cat on a mat"]
    code, cap = _run(argv, capsys)
    assert code == 0, cap.err
    ref = sampling.generate(load_transformer(base, dtype=torch.float32), load_autoencoder(ae_files / "ae.safetensors"),
                            load_text_encoder(root / "pipe", max_length=16), ["a cat on a mat"], negative="dog",
                            height=8, width=16, steps=3, guidance=2.0, cfg=2.0, progress=False)
    got = np.asarray(Image.open(out / "p00_s0.png").convert("RGB")).astype(int)
    assert got.shape == (8, 16, 3)
    assert np.abs(got - np.asarray(sampling.to_pil(ref)[0]).astype(int)).max() <= 1
    assert json.loads((out / "settings.json").read_text())["guidance"] == 2.0
    fp8 = load_transformer(base).transformer_blocks[0].attn.to_q.weight
    assert fp8.dtype == torch.float8_e4m3fn  # the base really is stored in fp8
