"""No silent garbage: a transformer, LoRA/adapter, autoencoder or text-encoder file holding NaN, Inf or absurd values
is an error at load time naming the file and the tensor; sane files load as before."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dev2pro.errors import CheckpointError
from dev2pro.flux import value_check
from dev2pro.flux.checkpoint import load_transformer, save_transformer


@pytest.mark.parametrize("value, why", [(float("nan"), "NaN"), (float("inf"), "Inf"),
                                        (-3e5, r"max \|x\| = [\d.]+e\+05 \(> 10000\)")])
def test_bad_values_are_named(value, why):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.zeros(4, 4)
        t[1, 2] = value
        t = t.to(dtype)
        if dtype == torch.float16 and abs(value) > 65504:  # fp16 holds 3e5 as inf
            why = "Inf"
        with pytest.raises(CheckpointError, match=rf"f.safetensors: tensor 'w' holds {why}"):
            value_check.check_tensor(t, "f.safetensors", "w")
    assert value_check.bad_value(torch.full((3,), value_check.ABSURD)) is None  # the bound itself is fine
    assert value_check.bad_value(torch.arange(10**6)) is None  # integer tensors are not checked


def test_fp8_nan_bit_patterns():
    w = torch.randn(8, 8).to(torch.float8_e4m3fn)
    assert value_check.bad_value(w) is None
    w.view(torch.uint8)[3, 3] = 0x7F  # e4m3fn NaN
    assert value_check.bad_value(w) == "NaN"
    w5 = torch.randn(8, 8).to(torch.float8_e5m2)
    assert value_check.bad_value(w5) is None
    w5.view(torch.uint8)[0, 0] = 0x7C  # e5m2 +Inf
    assert value_check.bad_value(w5) == "Inf"


def _corrupt(path, key, value):
    sd = load_file(str(path))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    save_file(sd, str(path))


def test_transformer_files_bf16_fp8_and_scales(tmp_path):
    model = load_transformer("preset:tiny-dev")
    for fmt, dtype, key in (("bfl", None, "double_blocks.0.img_attn.qkv.weight"),
                            ("bfl", "fp8_e4m3fn", "single_blocks.0.linear1.scale_weight")):
        path = tmp_path / f"{fmt}-{dtype}.safetensors"
        save_transformer(model, path, format=fmt, dtype=dtype, scaling="tensor" if dtype else None)
        load_transformer(path)  # sane file loads
        _corrupt(path, key, float("inf"))
        with pytest.raises(CheckpointError, match=rf"{path.name}: tensor '{key}' holds Inf"):
            load_transformer(path)


def test_lora_and_adapter_files(tmp_path):
    from dev2pro.lora.files import load_lora

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 2) * 2e4,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}, str(path))
    with pytest.raises(CheckpointError, match=r"lora.safetensors: tensor 'lora_unet_double_blocks_0_img_attn_qkv"
                                              r".lora_up.weight' holds max \|x\|"):
        load_lora(path)


def test_autoencoder_file(tmp_path):
    from diffusers import AutoencoderKL

    from dev2pro.flux.ae_keymap import diffusers_to_bfl_ae
    from dev2pro.flux.autoencoder import load_autoencoder

    vae = AutoencoderKL(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=32)
    sd = {k: v.contiguous() for k, v in diffusers_to_bfl_ae(vae.state_dict(), num_up=1).items()}
    sd["decoder.conv_out.bias"][0] = float("nan")
    save_file(sd, str(tmp_path / "ae.safetensors"))
    with pytest.raises(CheckpointError, match=r"ae.safetensors: tensor 'decoder.conv_out.bias' holds NaN"):
        load_autoencoder(str(tmp_path / "ae.safetensors"))
