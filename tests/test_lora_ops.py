"""Checkpoint-level LoRA operations: extract recovers a planted low-rank difference, merge -> extract round trip,
merging into fp8 re-quantizes, resize equals the truncated SVD (closed-form references: torch.linalg.svd)."""

import pytest
import torch

from dev2pro.errors import UserError
from dev2pro.flux import fp8
from dev2pro.flux.checkpoint import load_transformer, save_transformer
from dev2pro.flux.convert import convert_checkpoint
from dev2pro.flux.models import PRESETS, random_transformer
from dev2pro.lora.files import load_lora, save_lora
from dev2pro.lora.inject import LoraLayer, LoraWeights, linear_modules, merge_lora_into_model
from dev2pro.lora.ops import extract_lora, lowrank_factors, merge_into_checkpoint, resize_factors, resize_lora

SPEC = PRESETS["tiny-dev"]
PLANTED = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.net.2",
           "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out", "norm_out.linear",
           "x_embedder")


def _planted_lora(model, rank=2, seed=0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    lin = linear_modules(model)
    return LoraWeights(layers={p: LoraLayer(torch.randn(rank, lin[p].in_features, generator=g) * 0.1,
                                            torch.randn(lin[p].out_features, rank, generator=g) * 0.1, 2.0 * rank)
                               for p in PLANTED})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    a = random_transformer(SPEC, seed=0)
    lora = _planted_lora(a)
    b = random_transformer(SPEC, seed=0)
    merge_lora_into_model(b, lora)
    with torch.no_grad():
        b.transformer_blocks[0].attn.to_q.bias.add_(0.01)  # not representable as a LoRA: reported
    save_transformer(a, d / "a.safetensors", format="bfl")
    save_transformer(b, d / "b.safetensors", format="bfl")
    save_transformer(b, d / "b_diffusers", format="diffusers")
    return d, a, b, lora


def _weights(model):
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def test_lowrank_factors_match_truncated_svd():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)
    up, down, kept, total = lowrank_factors(low, rank=5)  # randomized path (q = 13 < 200)
    torch.testing.assert_close(up @ down, low, rtol=1e-4, atol=1e-4)
    assert kept == pytest.approx(total, rel=1e-5)
    full = torch.randn(120, 80, generator=g)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    best = (u[:, :10] * s[:10]) @ vh[:10]
    up, down, kept, total = lowrank_factors(full, rank=10, niter=4)
    assert torch.linalg.norm(up @ down - full) <= torch.linalg.norm(best - full) * 1.02  # near Eckart-Young
    up, down, kept, total = lowrank_factors(full, energy=0.5, exact=True)
    r = up.shape[1]
    cum = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
    assert cum[r - 1] >= 0.5 > (cum[r - 2] if r > 1 else 0)


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_extract_recovers_planted_difference(models, tmp_path, format):
    d, a, b, lora = models
    summary = extract_lora(d / "a.safetensors", d / "b.safetensors", tmp_path / "x.safetensors",
                           energy=0.999999, format=format, progress=False)
    assert summary.fraction > 0.99999
    assert summary.other_tensors == 1 and summary.other_energy == pytest.approx(32 * 0.01**2, rel=1e-3)
    extracted = load_lora(tmp_path / "x.safetensors")
    assert set(extracted.layers) == set(lora.layers)
    # kohya works on BFL modules: q and k (rank 2 each) are one fused qkv matrix of rank 4
    assert max(x.rank for x in extracted.layers.values()) == (4 if format == "kohya" else 2)
    for k, layer in lora.layers.items():
        torch.testing.assert_close(extracted.layers[k].delta(), layer.delta(), rtol=1e-4, atol=1e-5)
    # A + extracted == B (weights), and the diffusers folder reads the same
    rebuilt = random_transformer(SPEC, seed=0)
    merge_lora_into_model(rebuilt, extracted)
    wb, wr = _weights(b), _weights(rebuilt)
    for k in wb:
        if k != "transformer_blocks.0.attn.to_q.bias":
            torch.testing.assert_close(wr[k], wb[k], rtol=1e-4, atol=1e-5)
    s2 = extract_lora(d / "a.safetensors", d / "b_diffusers", tmp_path / "y.safetensors", rank=4, format=format,
                      progress=False)
    assert abs(s2.fraction - summary.fraction) < 1e-5
    text = str(summary)
    assert "overall 1.0000" in text and ("transformer_blocks.0.attn.to_k" in text or "double_blocks.0.img_attn.qkv"
                                         in text)


def test_merge_then_extract_round_trip_and_fp8(models, tmp_path):
    d, a, b, lora = models
    save_lora(tmp_path / "l.safetensors", lora, "kohya")
    summary = merge_into_checkpoint(d / "a.safetensors", tmp_path / "m.safetensors",
                                    [(tmp_path / "l.safetensors", 0.5), (tmp_path / "l.safetensors", 0.5)],
                                    progress=False)
    assert summary.weights_changed == len(lora.layers) - 1 and len(summary.loras) == 2  # to_q + to_k = one BFL qkv
    merged = load_transformer(tmp_path / "m.safetensors")
    expect = random_transformer(SPEC, seed=0)
    merge_lora_into_model(expect, lora)
    we, wm = _weights(expect), _weights(merged)
    for k in we:
        torch.testing.assert_close(wm[k], we[k], rtol=1e-5, atol=1e-6)
    extract_lora(d / "a.safetensors", tmp_path / "m.safetensors", tmp_path / "back.safetensors", rank=2,
                 format="diffusers", progress=False)
    back = load_lora(tmp_path / "back.safetensors")
    for k, layer in lora.layers.items():
        torch.testing.assert_close(back.layers[k].delta(), layer.delta(), rtol=1e-4, atol=1e-5)

    # fp8 base (per-channel scaled): output stays fp8 with the same scaling = quantize(dequantize(base) + delta)
    convert_checkpoint(d / "a.safetensors", tmp_path / "a8.safetensors", dtype="fp8_e4m3fn", scaling="channel",
                       progress=False)
    base8 = load_transformer(tmp_path / "a8.safetensors")
    merge_into_checkpoint(tmp_path / "a8.safetensors", tmp_path / "m8.safetensors", [(lora, 1.0)], progress=False)
    m8 = load_transformer(tmp_path / "m8.safetensors")
    path = "single_transformer_blocks.0.proj_mlp"
    lin8, base_lin = linear_modules(m8)[path], linear_modules(base8)[path]
    assert isinstance(lin8, fp8.Fp8Linear) and lin8.scaling == "channel"
    w8, scale = fp8.quantize(base_lin.dequantized_weight() + lora.layers[path].delta(), "channel")
    assert torch.equal(lin8.weight.view(torch.uint8), w8.view(torch.uint8))
    torch.testing.assert_close(lin8.scale_weight, scale)


def test_merge_errors_name_the_layer(models, tmp_path):
    d, *_ = models
    big = LoraWeights(layers={"transformer_blocks.0.attn.to_q": LoraLayer(torch.zeros(2, 64), torch.zeros(64, 2), 2)})
    with pytest.raises(UserError, match=r"transformer_blocks\.0\.attn\.to_q|double_blocks\.0\.img_attn\.qkv"):
        merge_into_checkpoint(d / "a.safetensors", tmp_path / "o.safetensors", [(big, 1.0)], progress=False)
    alien = LoraWeights(layers={"transformer_blocks.5.attn.to_q": LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2),
                                                                            2)})
    with pytest.raises(UserError, match=r"match no weight.*double_blocks\.5\.img_attn\.qkv"):
        merge_into_checkpoint(d / "a.safetensors", tmp_path / "o.safetensors", [(alien, 1.0)], progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_resize_is_the_truncated_svd(tmp_path):
    g = torch.Generator().manual_seed(1)
    layer = LoraLayer(torch.randn(8, 48, generator=g), torch.randn(40, 8, generator=g), 4.0)
    down, up, kept, total = resize_factors(layer.down, layer.up, layer.scale, 3)
    u, s, vh = torch.linalg.svd(layer.delta().double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close((up @ down).double(), best, rtol=1e-4, atol=1e-4)
    assert kept / total == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()), rel=1e-6)

    h = SPEC.hidden_size
    lora = LoraWeights(layers={
        "transformer_blocks.0.attn.to_q": LoraLayer(torch.randn(6, h, generator=g), torch.randn(h, 6, generator=g), 3),
        "transformer_blocks.0.attn.to_k": LoraLayer(torch.randn(6, h, generator=g), torch.randn(h, 6, generator=g), 3),
        "proj_out": LoraLayer(torch.randn(2, h, generator=g), torch.randn(48, 2, generator=g), 2)})
    save_lora(tmp_path / "in.safetensors", lora, "diffusers")
    summary = resize_lora(tmp_path / "in.safetensors", tmp_path / "out.safetensors", 4)
    out = load_lora(tmp_path / "out.safetensors")
    assert out.layers["transformer_blocks.0.attn.to_q"].rank == 4 and out.layers["proj_out"].rank == 2
    torch.testing.assert_close(out.layers["proj_out"].delta(), lora.layers["proj_out"].delta())
    u, s, vh = torch.linalg.svd(lora.layers["transformer_blocks.0.attn.to_k"].delta())
    torch.testing.assert_close(out.layers["transformer_blocks.0.attn.to_k"].delta(), (u[:, :4] * s[:4]) @ vh[:4],
                               rtol=1e-4, atol=1e-4)
    assert 0 < summary.fraction < 1
    # kohya output resizes the fused qkv as one matrix: rank 4 in the file
    summary = resize_lora(tmp_path / "in.safetensors", tmp_path / "k.safetensors", 4, format="kohya")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert f.get_slice("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").get_shape() == [4, h]
