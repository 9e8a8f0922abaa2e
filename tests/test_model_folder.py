"""`model.path` fills every part from one FLUX.1 folder (HF snapshot layout); nothing silently becomes the toy world;
every path and width is checked from headers before caching; a hub id goes through the hub's snapshot."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from dev2pro.config import load_config
from dev2pro.errors import ConfigError
from dev2pro.flux.models import PRESETS
from dev2pro.train.config import LoraConfig, LoraOutputConfig, ModelConfig, TrainConfig
from dev2pro.train.recipes import train_lora as R
from encoder_builders import clip_file_dict, t5_file_dict, tiny_clip, tiny_t5, tiny_tokenizer, write

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# tiny FLUX.1 layout: T5 width 64, CLIP width 128, 16 latent channels (64 packed), as the snapshot's encoders
SPEC = dataclasses.replace(PRESETS["tiny-dev"], in_channels=64, vec_in_dim=128, context_in_dim=64)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    from diffusers import AutoencoderKL

    from dev2pro.flux.autoencoder import FLUX_AE_SCALE, FLUX_AE_SHIFT
    from dev2pro.flux.checkpoint import save_transformer
    from dev2pro.flux.models import random_transformer

    root = tmp_path_factory.mktemp("models")
    snap = root / "FLUX.1-tiny"
    save_transformer(random_transformer(SPEC, seed=0, std=0.2), snap / "transformer", format="diffusers")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32], layers_per_block=1,
                  latent_channels=16, norm_num_groups=32, scaling_factor=FLUX_AE_SCALE, shift_factor=FLUX_AE_SHIFT,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(snap / "vae")
    clip, t5 = tiny_clip(), tiny_t5()
    clip.save_pretrained(snap / "text_encoder")
    t5.save_pretrained(snap / "text_encoder_2")
    tiny_tokenizer(snap / "tokenizer", "clip")
    tiny_tokenizer(snap / "tokenizer_2", "t5")
    write(root / "clip_l.safetensors", clip_file_dict(clip))
    write(root / "t5xxl_fp16.safetensors", t5_file_dict(t5))
    write(root / "t5_small.safetensors", t5_file_dict(tiny_t5(d_model=32)))
    return root, snap


def test_one_path_fills_every_part_and_a_key_overrides_one(snapshot, tmp_path):
    root, snap = snapshot
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'path = "{snap}"\n')  # a [model] table, as a recipe's loader hands it over
    m = load_config(ModelConfig, cfg)
    assert (m.base, m.t5, m.clip, m.autoencoder, m.tokenizers) == (str(snap),) * 5
    m = load_config(ModelConfig, cfg, [f"t5={root / 't5xxl_fp16.safetensors'}"])
    assert m.t5 == str(root / "t5xxl_fp16.safetensors") and m.clip == str(snap)
    assert m.preflight() == {"context_in_dim": 64, "vec_in_dim": 128, "latent_channels": 16}
    # the ComfyUI way: every part from its own file, a placeholder model.path left in the config is unused
    m = ModelConfig(path="/placeholder/FLUX.1-dev", base=str(snap / "transformer"),
                    t5=str(root / "t5xxl_fp16.safetensors"), clip=str(root / "clip_l.safetensors"),
                    autoencoder=str(snap / "vae"), tokenizers=str(snap))
    assert m.preflight()["context_in_dim"] == 64
    # a folder lacking a part names the key to set
    (tmp_path / "partial" / "transformer").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has no text_encoder_2/ \(T5\): set model.t5"):
        ModelConfig(path=str(tmp_path / "partial"))
    with pytest.raises(ConfigError, match="model.path = .*nowhere: no such folder or file"):
        ModelConfig(path=str(tmp_path / "nowhere")).preflight()


def test_train_lora_from_one_folder(snapshot, tmp_path):
    """model.path alone: the snapshot's VAE, T5, CLIP and tokenizers build the cache, its transformer trains a LoRA
    on it; the cached text is exactly what the snapshot's encoders give."""
    from dev2pro.data.folders import DataConfig
    from dev2pro.flux.text_encoders import load_text_encoder
    from dev2pro.toy.world import write_dataset
    from dev2pro.train.data_loading import load_train_data
    from dev2pro.train.distributed import setup_accelerator

    _, snap = snapshot
    cfg = R.TrainLoraConfig(
        model=ModelConfig(path=str(snap), dtype="fp32"),
        train=TrainConfig(steps=1, batch_size=2, device="cpu"), output=LoraOutputConfig(dir=str(tmp_path / "out")),
        data=DataConfig(dir=str(write_dataset(tmp_path / "img", 2, seed=0)), resolution=32),
        lora=LoraConfig(rank=2, alpha=2.0))
    data = load_train_data(cfg.data, cfg.model, setup_accelerator(cfg.train), prompts=["a cat"])
    item = data.dataset[0]
    txt, pooled = load_text_encoder(str(snap)).encode([item["caption"]])
    assert torch.equal(item["txt"], txt[0]) and torch.equal(item["pooled"], pooled[0])
    assert item["latents"].shape[0] == 16
    assert R.run(cfg, data=data).is_file()  # the base from the same folder trains on what was cached


def test_unset_encoder_is_an_error_naming_the_key(snapshot, tmp_path):
    from dev2pro.data.folders import DataConfig
    from dev2pro.toy.world import write_dataset

    _, snap = snapshot
    data = DataConfig(dir=str(write_dataset(tmp_path / "img", 2, seed=0)), resolution=32)
    cfg = R.TrainLoraConfig(model=ModelConfig(base=str(snap / "transformer"), clip=str(snap), autoencoder=str(snap)),
                            train=TrainConfig(steps=1, device="cpu"), output=LoraOutputConfig(dir=str(tmp_path / "o")),
                            data=data)
    with pytest.raises(ConfigError, match=r"model.t5 is unset: set it .*\"toy\" for the toy world.*model.path"):
        R.run(cfg)
    assert not (tmp_path / "img" / ".dev2pro_cache").exists()  # failed before caching


@pytest.mark.parametrize("change, message", [
    (dict(t5="t5_small.safetensors"), r"model.t5 = .*t5_small.safetensors gives width 32, but model.base = .* takes "
                                      r"64 as context_in_dim"),
    (dict(clip="toy"), r"model.clip = toy gives width 32, .* takes 128 as vec_in_dim"),
    (dict(autoencoder="toy"), r"model.autoencoder = toy gives width 12, .* takes 16 as in_channels / 4"),
    (dict(t5="missing.safetensors"), r"model.t5 = .*missing.safetensors: no such file or folder"),
    (dict(clip="t5xxl_fp16.safetensors"), r"model.clip: .*no CLIP text encoder here.*holds a T5"),
    (dict(base="nothing.safetensors"), r"model.base = .*nothing.safetensors: no such file or folder"),
])
def test_preflight_fails_in_seconds_naming_the_key(snapshot, change, message):
    root, snap = snapshot
    change = {k: v if v == "toy" else str(root / v) for k, v in change.items()}
    m = ModelConfig(path=str(snap), **change)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        m.preflight()
    assert time.perf_counter() - t0 < 5.0


def test_hub_id_base_goes_through_the_hub_snapshot(snapshot, monkeypatch):
    import huggingface_hub

    from dev2pro.flux.checkpoint import load_transformer

    _, snap = snapshot
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_transformer("black-forest-labs/FLUX.1-tiny")
    assert calls == [("black-forest-labs/FLUX.1-tiny", ("transformer/*", "model_index.json"))]
    assert model.config.joint_attention_dim == SPEC.context_in_dim
    m = ModelConfig(path="black-forest-labs/FLUX.1-tiny")
    assert (m.base, m.t5, m.clip, m.autoencoder) == ("black-forest-labs/FLUX.1-tiny",) * 4
