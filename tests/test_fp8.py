"""fp8: the quantization recipe against closed-form expectations, file layouts (published plain fp8, ComfyUI scaled
fp8, our per-channel), loading fp8 files with fp8 kept in memory, and a peft LoRA on an fp8 base linear."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dev2pro.flux import checkpoint, convert, describe, fp8, keymap, models, output_check, sources
from dev2pro.flux.models import PRESETS, FluxSpec, random_transformer

E4M3 = torch.float8_e4m3fn
# Small but not tiny: hidden 256 gives rows of 256..1280 weights, enough for stable error statistics.
SMALL = FluxSpec(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64, vec_in_dim=32)


def test_quantize_matches_the_recipe():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.02
    w[3] *= 40  # an outlier row
    w8, s = fp8.quantize(w, "none")
    assert s is None and w8.dtype == E4M3 and torch.equal(w8, w.to(E4M3))
    w8, s = fp8.quantize(w, "tensor")
    assert s.shape == () and torch.equal(s, w.abs().max() / 448)
    assert w8.float().abs().max() == 448
    w8, s = fp8.quantize(w, "channel")
    assert s.shape == (64,) and torch.equal(s, w.abs().amax(1) / 448)
    assert torch.all(w8.float().abs().amax(1) == 448)
    # round to nearest: every scaled value in e4m3's normal range is within half a step (2^-4 relative)
    deq = fp8.dequantize(w8, s)
    normal = (w / s[:, None]).abs() >= 2**-6
    assert torch.all((deq - w).abs()[normal] <= 2**-4 * w.abs()[normal] * (1 + 1e-6))
    assert torch.equal(fp8.quantize(torch.full((2, 2), 1000.0), "none")[0].float(), torch.full((2, 2), 448.0))
    assert torch.all(fp8.quantize(torch.zeros(2, 2), "tensor")[1] == 1)


def _total_rel_rms(summary):
    quant = [s for s in summary.errors.values() if s.err2 > 0]
    return (sum(s.err2 for s in quant) / sum(s.ref2 for s in quant)) ** 0.5


def test_plain_vs_tensor_vs_channel_on_a_std_002_model(tmp_path):
    """(d) The issue's "done when": scaled fp8 vs plain fp8 on a model initialised like a trained one (std 0.02).

    Plain e4m3 puts the ~56% of weights below 2^-6 = 0.0156 into the subnormal range (fixed spacing 2^-9), so it
    loses precision; any scale that lifts amax to 448 leaves only the 3-bit mantissa rounding (~2.6% relative RMS).
    Per-channel scales change which binade each value lands in but not the relative rounding, so on iid weights
    channel ~= tensor (measured here: ~1% lower). Channel is clearly better only for rows whose magnitudes differ by
    more than e4m3's normal range (last part).
    docs/formats.md reports these numbers."""
    model = random_transformer(SMALL, 0)
    src = checkpoint.save_transformer(model, tmp_path / "src.safetensors")
    inputs = output_check.fixed_inputs(SMALL)
    ref = output_check.model_output(model, inputs)
    weights, outputs = {}, {}
    for scaling in fp8.SCALINGS:
        dst = tmp_path / f"{scaling}.safetensors"
        summary = convert.convert_checkpoint(src, dst, dtype="fp8_e4m3fn", scaling=scaling, progress=False)
        weights[scaling] = _total_rel_rms(summary)
        out = output_check.model_output(checkpoint.load_transformer(dst, dtype=torch.float32), inputs)
        outputs[scaling] = fp8.relative_rms(out, ref)
    print("\nfp8 on a std-0.02 model (hidden 256): weight rel RMS / output rel RMS")
    for s in fp8.SCALINGS:
        print(f"  {s:8s} {weights[s]:.4e} {outputs[s]:.4e}")
    assert 0.030 < weights["none"] < 0.036  # subnormal loss
    assert 0.024 < weights["tensor"] < 0.028  # 3-bit mantissa rounding
    assert weights["tensor"] < 0.85 * weights["none"] and weights["channel"] <= weights["tensor"]
    assert outputs["tensor"] < outputs["none"] and outputs["channel"] < outputs["none"]
    assert outputs["channel"] <= outputs["tensor"] * 1.02

    # Where channel scaling pays: e4m3's normal range spans 448 / 2^-6 = 28672 (~4.5 decades). Rows whose
    # magnitudes span less than that lose nothing under one tensor scale; rows far below amax / 28672 fall into
    # subnormals and only per-row scales rescue them.
    g = torch.Generator().manual_seed(1)
    row_err = {}
    for decades in (3, 7):
        w = torch.randn(256, 256, generator=g) * torch.logspace(-decades, 0, 256)[:, None]
        for s in ("tensor", "channel"):
            d = fp8.dequantize(*fp8.quantize(w, s)) - w
            row_err[decades, s] = d.norm(dim=1).div(w.norm(dim=1)).mean().item()
    print("  mean per-row rel error, rows spanning 3 decades: tensor {:.4e} channel {:.4e}; 7 decades: tensor "
          "{:.4e} channel {:.4e}".format(*row_err.values()))
    assert abs(row_err[3, "channel"] / row_err[3, "tensor"] - 1) < 0.05
    assert row_err[7, "channel"] < 0.2 * row_err[7, "tensor"]


def test_file_layouts_plain_comfy_scaled_and_channel(tmp_path):
    spec = PRESETS["tiny-dev"]
    src = checkpoint.save_transformer(random_transformer(spec, 0, dtype=torch.bfloat16), tmp_path / "src.safetensors")
    bfl_keys = set(describe.expected_shapes(spec, "bfl"))
    orig = checkpoint.load_transformer(src).state_dict()
    orig_bfl = keymap.diffusers_to_bfl(orig, spec.hidden_size)
    for scaling, fmt in (("none", "fp8"), ("tensor", "comfy-scaled-fp8"), ("channel", "dev2pro-channel-fp8")):
        dst = tmp_path / f"{scaling}.safetensors"
        convert.convert_checkpoint(src, dst, dtype="fp8_e4m3fn", scaling=scaling, progress=False)
        assert sources.detect_format(dst) == fmt
        with safe_open(dst, "pt") as f:  # safetensors' reader, not ours
            keys = set(f.keys())
            weights = [k for k in bfl_keys if fp8.is_quantized_key(k, orig_bfl[k].shape)]
            assert len(weights) == 10 + 3  # per double block: 2 mods, 2 qkv, 2 proj, 4 mlp; single: 3
            for k in bfl_keys:
                t = f.get_tensor(k)
                if k in weights:
                    assert t.dtype == E4M3
                else:  # embedders, final layer, biases, norms stay as they were
                    assert t.dtype == torch.bfloat16 and torch.equal(t, orig_bfl[k])
            if scaling == "none":  # the published repost's layout: the same BFL keys, weights cast to e4m3fn
                assert keys == bfl_keys
                assert all(torch.equal(f.get_tensor(k), orig_bfl[k].float().to(E4M3)) for k in weights)
                continue
            marker = "scaled_fp8" if scaling == "tensor" else "dev2pro_fp8_channel"
            assert keys == bfl_keys | {marker} | {k.replace(".weight", ".scale_weight") for k in weights}
            assert f.get_tensor(marker).dtype == E4M3
            for k in weights:
                scale = f.get_tensor(k.replace(".weight", ".scale_weight"))
                assert scale.dtype == torch.float32
                assert scale.shape == (() if scaling == "tensor" else (orig_bfl[k].shape[0],))
                real = f.get_tensor(k).float() * (scale if scale.ndim == 0 else scale[:, None])
                assert fp8.relative_rms(real, orig_bfl[k]) < 0.04  # real weight = fp8 * scale


def _reference_model(spec, bfl_float):
    """A plain model from already dequantized BFL tensors (the reference for fp8 loading)."""
    model = models.build_transformer(spec, device="cpu")
    model.load_state_dict(keymap.bfl_to_diffusers(bfl_float, spec.hidden_size))
    return model


@pytest.mark.parametrize("scaling", ["none", "tensor", "channel"])
def test_third_party_style_fp8_files_load_with_fp8_kept(tmp_path, scaling):
    """Files as others write them: ComfyUI (`model.diffusion_model.` prefix, `scaled_fp8` marker, scalar
    `scale_weight`, `scale_input`), a plain repost with *everything* in e4m3 (biases and norms too)."""
    spec = PRESETS["tiny-dev"]
    bfl = keymap.diffusers_to_bfl(random_transformer(spec, 5).state_dict(), spec.hidden_size)
    file, deq = {}, {}
    for k, v in bfl.items():
        if v.ndim == 2 and k.startswith(("double_blocks", "single_blocks")):
            w8, s = fp8.quantize(v, scaling)
            file[k] = w8
            deq[k] = w8.float() * (1 if s is None else (s if s.ndim == 0 else s[:, None]))
            if s is not None:
                file[k.replace(".weight", ".scale_weight")] = s
                file[k.replace(".weight", ".scale_input")] = torch.tensor(1.0)
        elif scaling == "none":  # Kijai-style: every tensor in e4m3
            file[k] = v.to(E4M3)
            deq[k] = file[k].float()
        else:
            file[k], deq[k] = v, v
    if scaling == "tensor":
        file["scaled_fp8"] = torch.empty(0, dtype=E4M3)
        file = {"model.diffusion_model." + k: v for k, v in file.items()}
    if scaling == "channel":
        file["dev2pro_fp8_channel"] = torch.empty(0, dtype=E4M3)
    path = tmp_path / "f.safetensors"
    save_file(file, path)
    assert sources.detect_format(path) == {"none": "fp8", "tensor": "comfy-scaled-fp8",
                                           "channel": "dev2pro-channel-fp8"}[scaling]
    info = describe.describe_checkpoint(path)
    assert info.fp8_scaling == scaling and info.num_params == spec.num_params()

    model = checkpoint.load_transformer(path, dtype=torch.float32)
    linears = fp8.fp8_linears(model)
    all_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(all_linears) == 30
    # the 20 block linears stay fp8 (double: 6 qkv pieces, 2 out, 4 mlp, 2 modulation; single: 3 qkv, mlp in,
    # out, modulation); embedders and final layer are upcast even when the file has them in e4m3
    assert len(linears) == 20
    assert all(m.weight.dtype == E4M3 and m.scaling == scaling for m in linears.values())
    assert not isinstance(model.x_embedder, fp8.Fp8Linear) and model.dtype == torch.float32
    ref = _reference_model(spec, deq)
    inputs = output_check.fixed_inputs(spec)
    assert torch.equal(output_check.model_output(model, inputs), output_check.model_output(ref, inputs))
    plain = checkpoint.load_transformer(path, dtype=torch.float32, fp8="dequantize")
    assert not fp8.fp8_linears(plain)
    assert torch.equal(output_check.model_output(plain, inputs), output_check.model_output(ref, inputs))
    # an fp8 model saves back to the same format, losslessly
    checkpoint.save_transformer(model, tmp_path / "again.safetensors")
    assert sources.detect_format(tmp_path / "again.safetensors") == sources.detect_format(path)
    again = checkpoint.load_transformer(tmp_path / "again.safetensors", dtype=torch.float32)
    assert torch.equal(output_check.model_output(again, inputs), output_check.model_output(ref, inputs))


def test_fp8_linear_forward_dtype_and_surgery():
    g = torch.Generator().manual_seed(0)
    lin0 = torch.nn.Linear(32, 48)
    torch.nn.init.normal_(lin0.weight, std=0.02, generator=g)
    for scaling in fp8.SCALINGS:
        lin = copy.deepcopy(lin0)
        q = fp8.Fp8Linear.from_linear(lin, scaling)
        assert q.bias is lin.bias and not q.weight.requires_grad
        x = torch.randn(3, 32, generator=g)
        w = fp8.dequantize(*fp8.quantize(lin.weight.detach(), scaling))
        assert torch.equal(q(x), F.linear(x, w, lin.bias))
        assert q(x.bfloat16()).dtype == torch.bfloat16
        assert set(q.state_dict()) == {"weight", "bias"} | ({"scale_weight"} if scaling != "none" else set())
        q.to(torch.bfloat16)
        assert q.weight.dtype == E4M3 and q.bias.dtype == torch.bfloat16
        assert q.scale_weight is None or q.scale_weight.dtype == torch.float32
    # gradients flow to the input (LoRA layers before this one need them), and autograd keeps only the fp8 weight
    q = fp8.Fp8Linear.from_linear(copy.deepcopy(lin0), "channel")
    x = torch.randn(4, 32, generator=g, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not any(t.numel() == 48 * 32 and t.dtype != E4M3 for t in saved)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, q.dequantized_weight(), q.bias.detach()).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-7)

    spec = PRESETS["tiny-pro"]
    model = random_transformer(spec, 0)
    inputs = output_check.fixed_inputs(spec)
    ref = output_check.model_output(model, inputs)
    fp8.swap_linears_to_fp8(model, "channel")
    names = set(fp8.fp8_linears(model))
    assert "transformer_blocks.0.attn.to_q" in names and "single_transformer_blocks.0.proj_out" in names
    assert not names & {"x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                        "time_text_embed.timestep_embedder.linear_1"}
    assert fp8.relative_rms(output_check.model_output(model, inputs), ref) < 0.01


def test_peft_lora_wraps_an_fp8_base_linear(tmp_path):
    """LoRA params fp32 and trainable, base frozen and fp8, gradients only on LoRA, output = base + LoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    spec = PRESETS["tiny-dev"]
    src = checkpoint.save_transformer(random_transformer(spec, 0), tmp_path / "src.safetensors")
    path = tmp_path / "f8.safetensors"
    convert.convert_checkpoint(src, path, dtype="fp8_e4m3fn", scaling="channel", progress=False)
    model = checkpoint.load_transformer(path, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    model = inject_adapter_in_model(cfg, model)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * (4 + 3)  # double block: to_q,k,v,out.0 ; single block: to_q,k,v
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert not any(p.requires_grad for p in base.values())
    assert base["transformer_blocks.0.attn.to_q.base_layer.weight"].dtype == E4M3

    layer = model.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base_layer, fp8.Fp8Linear)
    x = torch.randn(2, 5, spec.hidden_size, dtype=torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x).float() + (x.float() @ a.T @ b.T) * (8 / 4)
    assert torch.allclose(layer(x).float(), expected, rtol=1e-2, atol=1e-2)

    inputs = output_check.fixed_inputs(spec)
    from dev2pro.flux.models import predict

    out = predict(model, inputs["x"].bfloat16(), inputs["t"], inputs["txt"].bfloat16(), inputs["pooled"].bfloat16(),
                  inputs["img_ids"], inputs["txt_ids"], inputs["guidance"])
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None for p in base.values())


@pytest.mark.gpu
def test_scaled_mm_path_matches_the_dequantized_matmul():
    """On fp8 tensor cores (capability >= 8.9) inference may use torch._scaled_mm; activations are quantized too,
    so the result differs from the dequantized matmul by about e4m3's rounding (a few percent), not more."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 tensor cores (compute capability 8.9+)")
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 512)
    torch.nn.init.normal_(lin.weight, std=0.02, generator=g)
    x = torch.randn(64, 256, generator=g).cuda().bfloat16()
    for scaling in fp8.SCALINGS:
        q = fp8.Fp8Linear.from_linear(copy.deepcopy(lin), scaling).cuda().to(torch.bfloat16)
        with torch.no_grad():
            ref = q(x)
            q.use_scaled_mm = True
            out = q(x)
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert fp8.relative_rms(out, ref) < 0.06, scaling
