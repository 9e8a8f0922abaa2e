"""LoRA injection, canonical state dict, merge/apply: numbers against peft and closed-form `W + s * alpha/r * B @ A`."""

import pytest
import torch

from dev2pro.errors import UserError
from dev2pro.flux import fp8
from dev2pro.flux.models import PRESETS, image_ids, predict, random_transformer, text_ids
from dev2pro.lora.inject import (
    LoraLayer,
    LoraWeights,
    add_lora,
    apply_lora,
    linear_modules,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora_into_model,
    remove_lora,
    resolve_targets,
    set_lora_strength,
    unmerge_lora_from_model,
)

SPEC = PRESETS["tiny-dev"]


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, SPEC.in_channels, generator=g).to(dtype)
    txt = torch.randn(1, 3, SPEC.context_in_dim, generator=g).to(dtype)
    pooled = torch.randn(1, SPEC.vec_in_dim, generator=g).to(dtype)
    return dict(x=x, t=torch.tensor([0.4]), txt=txt, pooled=pooled, img_ids=image_ids(4, 4), txt_ids=text_ids(3),
                guidance=1.0)


def _out(model, dtype=torch.float32):
    with torch.no_grad():
        return predict(model, **_inputs(dtype=dtype)).float()


def _random_lora(model, targets="all-linear", rank=3, alpha=5.0, seed=1, std=0.2) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, path in enumerate(resolve_targets(model, targets)):
        lin = linear_modules(model)[path]
        r = rank + (i % 2)  # mixed ranks exercise peft's rank_pattern
        layers[path] = LoraLayer(torch.randn(r, lin.in_features, generator=g) * std,
                                 torch.randn(lin.out_features, r, generator=g) * std, alpha + (i % 3))
    return LoraWeights(layers=layers)


def test_presets_select_the_documented_modules():
    model = random_transformer(SPEC)
    att = resolve_targets(model, "attention")
    assert sorted(p.split("attn.")[1] for p in att if p.startswith("transformer_blocks.0.")) == sorted(
        ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"])
    assert sorted(p for p in att if p.startswith("single")) == [f"single_transformer_blocks.0.attn.{n}"
                                                                 for n in ("to_k", "to_q", "to_v")]
    every = resolve_targets(model, "all-linear")
    blocks = [p for p in linear_modules(model) if "transformer_blocks." in p]
    assert every == blocks and len(every) == 20  # 14 per double block + 6 per single block
    for name in ("norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff_context.net.2"):
        assert f"transformer_blocks.0.{name}" in every
    for name in ("norm.linear", "proj_mlp", "proj_out"):
        assert f"single_transformer_blocks.0.{name}" in every
    assert resolve_targets(model, [r".*\.proj_mlp"]) == ["single_transformer_blocks.0.proj_mlp"]
    with pytest.raises(UserError, match="matches no Linear"):
        resolve_targets(model, [r"nothing_here"])
    with pytest.raises(UserError, match="valid regex"):
        resolve_targets(model, ["(unclosed"])


def test_add_lora_on_bf16_base_trains_only_fp32_lora():
    model = random_transformer(SPEC, dtype=torch.bfloat16)
    before = _out(model, torch.bfloat16)
    paths = add_lora(model, rank=4, alpha=8, targets="attention", seed=0)
    assert len(paths) == 11
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(paths)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert torch.equal(_out(model, torch.bfloat16), before)  # B starts at zero
    # seeded init is reproducible and independent of the global RNG
    other = random_transformer(SPEC, dtype=torch.bfloat16)
    torch.manual_seed(123)
    add_lora(other, rank=4, alpha=8, targets="attention", seed=0)
    a, b = lora_state_dict(model), lora_state_dict(other)
    assert all(torch.equal(a.layers[k].down, b.layers[k].down) for k in a.layers)
    # one step moves only LoRA parameters
    opt = torch.optim.Adam(lora_parameters(model), lr=0.05)  # normalised step: tiny random-init grads still move
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    inp = _inputs(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = predict(model, **inp).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(model))
    opt.step()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert not torch.equal(_out(model, torch.bfloat16), before)


def test_fp8_base_with_lora_trains_lora_only():
    model = random_transformer(SPEC)
    fp8.swap_linears_to_fp8(model, scaling="channel")
    assert isinstance(linear_modules(model)["transformer_blocks.0.attn.to_q"], fp8.Fp8Linear)
    add_lora(model, rank=2, alpha=2, targets="all-linear", seed=0)
    params = lora_parameters(model)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    w8 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == fp8.FP8_DTYPE}
    assert w8 and all(not p.requires_grad for n, p in model.named_parameters() if n in w8)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        loss = predict(model, **_inputs()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p.view(torch.uint8), w8[n].view(torch.uint8)) for n, p in model.named_parameters()
               if n in w8)


def test_lora_state_dict_round_trip_and_resume_copy():
    model = random_transformer(SPEC)
    add_lora(model, rank=3, alpha=6, targets="all-linear", seed=0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    lw = lora_state_dict(model)
    layer = lw.layers["transformer_blocks.0.attn.to_q"]
    assert layer.down.shape == (3, 32) and layer.up.shape == (32, 3) and layer.alpha == 6.0
    assert layer.down.dtype == torch.float32
    fresh = random_transformer(SPEC)
    add_lora(fresh, rank=3, alpha=6, targets="all-linear", seed=1)
    load_lora_state_dict(fresh, lw)
    assert torch.equal(_out(fresh), _out(model))


def test_merged_model_equals_peft_applied_lora():
    base = random_transformer(SPEC)
    lora = _random_lora(base)
    strength = 0.7

    applied = random_transformer(SPEC)
    apply_lora(applied, lora, strength=strength, adapter_name="style")
    merged = random_transformer(SPEC)
    merge_lora_into_model(merged, lora, strength=strength)
    ref = _out(applied)
    assert not torch.allclose(ref, _out(base), atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(_out(merged), ref, rtol=1e-4, atol=1e-5)

    # closed form for one layer
    path = "single_transformer_blocks.0.attn.to_q"
    w0 = linear_modules(base)[path].weight
    layer = lora.layers[path]
    expect = w0 + strength * layer.alpha / layer.rank * layer.up @ layer.down
    torch.testing.assert_close(linear_modules(merged)[path].weight, expect)

    # strength changes without touching the base; removal restores the base output
    set_lora_strength(applied, 0.0, "style")
    torch.testing.assert_close(_out(applied), _out(base))
    set_lora_strength(applied, strength, "style")
    torch.testing.assert_close(_out(applied), ref)
    remove_lora(applied, "style")
    torch.testing.assert_close(_out(applied), _out(base))

    unmerge_lora_from_model(merged, lora, strength=strength)
    torch.testing.assert_close(_out(merged), _out(base), rtol=1e-4, atol=1e-5)


def test_apply_lora_on_fp8_base_equals_dequantized_base():
    """Sampling path: a LoRA attached unmerged to an fp8 model computes exactly what it does on the dequantized
    weights (Fp8Linear computes with the dequantized weight; the adapter stays fp32)."""
    quant = random_transformer(SPEC)
    fp8.swap_linears_to_fp8(quant, scaling="tensor")
    plain = random_transformer(SPEC)
    with torch.no_grad():
        for path, lin in linear_modules(quant).items():
            if isinstance(lin, fp8.Fp8Linear):
                linear_modules(plain)[path].weight.copy_(lin.dequantized_weight())
    lora = _random_lora(plain, targets="all-linear", std=0.1)
    apply_lora(quant, lora, 0.8)
    apply_lora(plain, lora, 0.8)
    assert all(p.dtype == torch.float32 for n, p in quant.named_parameters() if ".lora_" in n)
    torch.testing.assert_close(_out(quant), _out(plain), rtol=1e-5, atol=1e-6)


def test_merge_into_fp8_base_requantizes_with_layer_scaling():
    model = random_transformer(SPEC)
    ref = random_transformer(SPEC)
    fp8.swap_linears_to_fp8(model, scaling="channel")
    lora = _random_lora(ref, targets="attention", std=0.1)
    path = "transformer_blocks.0.attn.to_k"
    lin = linear_modules(model)[path]
    w_before = lin.dequantized_weight()
    merge_lora_into_model(ref, lora)
    merge_lora_into_model(model, lora)
    assert lin.weight.dtype == fp8.FP8_DTYPE and lin.scale_weight.shape == (32,)
    # dequantize, add the delta in fp32, re-quantize per channel
    expect_w8, expect_scale = fp8.quantize(w_before + lora.layers[path].delta(), "channel")
    assert torch.equal(lin.weight.view(torch.uint8), expect_w8.view(torch.uint8))
    assert torch.equal(lin.scale_weight, expect_scale)
    assert fp8.relative_rms(lin.dequantized_weight(), linear_modules(ref)[path].weight.detach()) < 0.05


def test_training_adapter_merged_then_new_lora_on_top():
    """A LoRA merged into the base (training adapter) plus a trainable LoRA equals both applied through peft."""
    adapter_model = random_transformer(SPEC)
    adapter = _random_lora(adapter_model, seed=5, std=0.1)
    merge_lora_into_model(adapter_model, adapter)
    add_lora(adapter_model, rank=2, alpha=2, targets="attention", seed=0)
    peft_model = random_transformer(SPEC)
    apply_lora(peft_model, adapter, adapter_name="adapter")
    add_lora(peft_model, rank=2, alpha=2, targets="attention", seed=0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # the applied adapter stays frozen
    with torch.no_grad():
        for a, b in zip(lora_parameters(adapter_model), lora_parameters(peft_model)):
            a.normal_()
            b.copy_(a)
    torch.testing.assert_close(_out(adapter_model), _out(peft_model), rtol=1e-4, atol=1e-5)


def test_unknown_keys_and_shape_mismatch_are_errors():
    model = random_transformer(SPEC)
    bad = LoraWeights(layers={"transformer_blocks.7.attn.to_q": LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2), 2),
                              "nonsense.layer": LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2), 2)})
    with pytest.raises(UserError, match=r"2 of 2 layers match no Linear.*transformer_blocks\.7\.attn\.to_q"):
        merge_lora_into_model(model, bad)
    wrong = LoraWeights(layers={"transformer_blocks.0.attn.to_q": LoraLayer(torch.zeros(2, 64), torch.zeros(64, 2),
                                                                            2)})
    with pytest.raises(UserError, match=r"transformer_blocks\.0\.attn\.to_q.*out 64, in 64.*out 32, in 32"):
        apply_lora(model, wrong)
    inconsistent = LoraWeights(layers={"proj_out": LoraLayer(torch.zeros(2, 32), torch.zeros(48, 3), 2)})
    with pytest.raises(UserError, match="proj_out"):
        merge_lora_into_model(model, inconsistent)


def test_adapter_applied_after_the_trainable_lora_stays_frozen_and_active():
    """train-lora's order: trainable LoRA first, then the de-distill adapter unmerged; strength 0 hides it."""
    model = random_transformer(SPEC)
    adapter = _random_lora(model, seed=5, std=0.1)
    add_lora(model, rank=2, alpha=2, targets="attention", seed=0)
    apply_lora(model, adapter, 1.0, adapter_name="adapter")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 22 and all(".default." in n for n in trainable)
    merged = random_transformer(SPEC)
    merge_lora_into_model(merged, adapter)
    torch.testing.assert_close(_out(model), _out(merged), rtol=1e-4, atol=1e-5)
    set_lora_strength(model, 0.0, "adapter")
    torch.testing.assert_close(_out(model), _out(random_transformer(SPEC)), rtol=1e-5, atol=1e-6)
