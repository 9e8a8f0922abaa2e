"""LoRA files usable at every save: `<name>-<step:06d>.safetensors` beside each checkpoint, in `output.save_dtype`, with
per-pattern ranks/alphas (`[[lora.rules]]`), kohya/modelspec metadata and kohya's `sshs_*` hashes; diffusers'
`FluxPipeline.load_lora_weights` reproduces the model of that step and `dev2pro lora inspect` shows the metadata."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dev2pro.cli import main
from dev2pro.lora.files import load_lora, save_lora
from dev2pro.lora.metadata import sshs_hashes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RULE = r"single_transformer_blocks\..*\.proj_mlp"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step CLI run on a `2_toys` folder (repeats 2), LoRA files every step, a per-pattern rank rule."""
    from dev2pro.toy.world import write_dataset

    tmp = tmp_path_factory.mktemp("outputs")
    images = write_dataset(tmp / "data" / "2_toys", 8, seed=0).parent  # kohya layout: data/2_toys
    config = tmp / "run.toml"
    config.write_text((ROOT / "configs" / "tiny-cpu.toml").read_text()
                      + f'\n[[lora.rules]]\npattern = "{RULE.replace(chr(92), chr(92) * 2)}"\nrank = 8\nalpha = 2\n')
    args = ["train-lora", str(config), f"data.dir={images}", f"output.dir={tmp / 'o'}", "train.steps=2",
            "output.save_every=1", "train.batch_size=2", "train.warmup_steps=0", "train.lr=0.1", "sample.every=0",
            "monitor.every=0", "lora.targets=all-linear", "data.trigger=ohwx",
            "output.format=diffusers"]  # diffusers' kohya reader assumes the real Flux sizes (3072, 12288)
    assert main(args) == 0
    return tmp


def test_files_at_every_save(run):
    out = run / "o"
    assert {p.name for p in out.glob("*.safetensors")} == {"tiny-lora-000001.safetensors", "tiny-lora.safetensors"}
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    sd = load_file(str(out / "tiny-lora-000001.safetensors"))
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.bfloat16}  # save_dtype default
    t = "transformer.single_transformer_blocks.0."
    assert sd[t + "proj_mlp.lora_A.weight"].shape[0] == 8 and sd[t + "proj_mlp.alpha"].item() == 2.0
    assert sd[t + "attn.to_q.lora_A.weight"].shape[0] == 4 and sd[t + "attn.to_q.alpha"].item() == 4.0
    # in kohya format single blocks fuse q, k, v and proj_mlp into linear1: block-diagonal, rank 4 + 4 + 4 + 8
    save_lora(out.parent / "k.safetensors", load_lora(out / "tiny-lora-000001.safetensors"), "kohya")
    sd = load_file(str(out.parent / "k.safetensors"))
    down = sd["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    assert down.shape[0] == 20 and sd["lora_unet_single_blocks_0_linear1.alpha"].item() == 20.0
    # double-block qkv: three independent rank-4 LoRAs, block-diagonal rank 12, alpha 12 (scale 1, as alpha 4/rank 4)
    qkv = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert qkv.shape[0] == 12 and sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 12.0


def test_metadata_civitai_and_managers_read(run):
    path = run / "o" / "tiny-lora-000001.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "tiny-lora" and meta["modelspec.title"] == "tiny-lora"
    assert meta["ss_steps"] == "1" and meta["ss_max_train_steps"] == "2" and meta["dev2pro.steps"] == "1"
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.trigger_phrase"] == "ohwx" and meta["dev2pro.trigger"] == "ohwx"
    assert meta["ss_resolution"] == "(32, 32)" and meta["modelspec.resolution"] == "32x32"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_seed"] == "0" and meta["ss_learning_rate"] == "0.1"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW" and meta["ss_num_train_images"] == "16"
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert json.loads(meta["dev2pro.lora_rules"]) == [{"pattern": RULE, "rank": 8, "alpha": 2.0}]
    # ss_tag_frequency against the caption files, counted here
    expected = Counter()
    for txt in (run / "data" / "2_toys").glob("*.txt"):
        expected.update(t.strip() for t in ("ohwx, " + txt.read_text()).split(",") if t.strip())
    assert json.loads(meta["ss_tag_frequency"]) == {"2_toys": dict(expected)}
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_toys": {"n_repeats": 2, "img_count": 8}}
    # sshs_model_hash: sha256 of the tensor bytes after the header, read from the file itself
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # a file under 1 MiB


def test_legacy_hash_is_kohyas_on_a_large_file(tmp_path):
    """kohya's `addnet_hash_legacy`: sha256 of 64 KiB at 1 MiB of the file written with only the `ss_*` keys."""
    tensors = {"a": torch.arange(700_000, dtype=torch.float32)}
    meta = {"ss_output_name": "x", "modelspec.title": "x"}
    save_file(tensors, str(tmp_path / "k.safetensors"), metadata={"ss_output_name": "x"})
    with open(tmp_path / "k.safetensors", "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    assert sshs_hashes(tensors, meta)["sshs_legacy_hash"] == legacy


def test_intermediate_file_loads_in_diffusers_to_the_model_of_that_step(run, tmp_path):
    """Oracle: `FluxPipeline.load_lora_weights` of the step-1 file into a fresh base gives the output of our
    peft model holding checkpoint-1's weights (rounded to bf16 as the file stores them)."""
    from diffusers import FluxPipeline

    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.models import image_ids, predict, text_ids
    from dev2pro.lora.inject import add_lora
    from dev2pro.train.config import LoraRule

    ours = load_transformer("preset:tiny-dev@0")
    add_lora(ours, 4, 4.0, "all-linear", rules=[LoraRule(pattern=RULE, rank=8, alpha=2.0)])
    trained = load_file(str(run / "o" / "checkpoint-1" / "trainable.safetensors"))
    ours.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in trained.items()}, strict=False)
    fresh = load_transformer("preset:tiny-dev@0")
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=fresh)
    shutil.copy(run / "o" / "tiny-lora-000001.safetensors", tmp_path / "l.safetensors")
    pipe.load_lora_weights(str(tmp_path / "l.safetensors"))
    g = torch.Generator().manual_seed(0)
    cfg = fresh.config
    x = torch.randn(1, 8 * 8, cfg.in_channels, generator=g)  # a 16x16 latent in 2x2 patches
    txt = torch.randn(1, 16, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    args = (x, torch.tensor([0.6]), txt, pooled, image_ids(16, 16), text_ids(16), 1.0)
    with torch.no_grad():
        v_ours, v_theirs = predict(ours, *args), predict(fresh, *args)
        v_base = predict(load_transformer("preset:tiny-dev@0"), *args)
    d_ours, d_theirs = v_ours - v_base, v_theirs - v_base  # what the LoRA adds (small on this 0.02-std base)
    assert d_ours.abs().max() > 1e-5
    torch.testing.assert_close(d_theirs, d_ours, rtol=1e-3, atol=1e-3 * float(d_ours.abs().max()))


def test_lora_inspect_shows_the_metadata(run, capsys):
    assert main(["lora", "inspect", str(run / "o" / "tiny-lora-000001.safetensors")]) == 0
    text = capsys.readouterr().out
    for line in ("ss_output_name = tiny-lora", "modelspec.trigger_phrase = ohwx", "ss_steps = 1",
                 "modelspec.architecture = flux-1-dev/lora", "sshs_model_hash = ", "dev2pro.training_guidance = 1.0"):
        assert line in text, line
    assert "rank: 4 x" in text and "8 x" in text
