"""LoRA file formats: exact kohya <-> diffusers round trips (shared and block-diagonal fused qkv), ComfyUI and XLabs
inputs, and diffusers' own loaders as oracles (its kohya/XLabs converters, and `FluxPipeline.load_lora_weights` into a
fresh transformer)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux.models import PRESETS, image_ids, predict, random_transformer, text_ids
from dev2pro.lora.describe import describe_lora
from dev2pro.lora.files import detect_format, load_lora, save_lora
from dev2pro.lora.formats import fuse_pieces, kohya_name_to_bfl, split_fused, to_state_dict
from dev2pro.lora.inject import LoraLayer, LoraWeights, add_lora, linear_modules, lora_parameters, lora_state_dict
from dev2pro.lora.metadata import METADATA_KEYS, training_metadata

SPEC = PRESETS["tiny-dev"]
H = SPEC.hidden_size


def _assert_same(a: LoraWeights, b: LoraWeights):
    assert set(a.layers) == set(b.layers)
    for k in a.layers:
        x, y = a.layers[k], b.layers[k]
        assert torch.equal(x.down, y.down), k
        assert torch.equal(x.up, y.up), k
        assert x.alpha == y.alpha, (k, x.alpha, y.alpha)


def _deltas(lora: LoraWeights) -> dict[str, torch.Tensor]:
    return {k: v.delta() for k, v in lora.layers.items()}


def _layer(g, out, inn, r, alpha):
    return LoraLayer(torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g), alpha)


def _all_linear_lora(hidden: int, rank: int = 2, seed: int = 0, alpha: float = 3.0) -> LoraWeights:
    """Separately trained LoRAs on every block Linear of a 1+1 block model, plus the final layer (swap case)."""
    g = torch.Generator().manual_seed(seed)
    m = 4 * hidden
    shapes = {
        "transformer_blocks.0.norm1.linear": (6 * hidden, hidden),
        "transformer_blocks.0.norm1_context.linear": (6 * hidden, hidden),
        "transformer_blocks.0.ff.net.0.proj": (m, hidden), "transformer_blocks.0.ff.net.2": (hidden, m),
        "transformer_blocks.0.ff_context.net.0.proj": (m, hidden), "transformer_blocks.0.ff_context.net.2": (hidden, m),
        "single_transformer_blocks.0.norm.linear": (3 * hidden, hidden),
        "single_transformer_blocks.0.proj_mlp": (m, hidden),
        "single_transformer_blocks.0.proj_out": (hidden, hidden + m),
        "norm_out.linear": (2 * hidden, hidden),
        "proj_out": (SPEC.in_channels, hidden),
    }
    for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        shapes[f"transformer_blocks.0.attn.{n}"] = (hidden, hidden)
    for n in ("to_q", "to_k", "to_v"):
        shapes[f"single_transformer_blocks.0.attn.{n}"] = (hidden, hidden)
    return LoraWeights(layers={k: _layer(g, o, i, rank, alpha) for k, (o, i) in shapes.items()})


def test_kohya_names_come_from_the_keymap_table():
    assert kohya_name_to_bfl("double_blocks_12_img_attn_qkv") == "double_blocks.12.img_attn.qkv"
    assert kohya_name_to_bfl("single_blocks_3_modulation_lin") == "single_blocks.3.modulation.lin"
    assert kohya_name_to_bfl("final_layer_adaLN_modulation_1") == "final_layer.adaLN_modulation.1"
    assert kohya_name_to_bfl("time_in_in_layer") == "time_in.in_layer"
    assert kohya_name_to_bfl("double_blocks_0_img_attn_norm_query_norm") is None  # norms carry no LoRA
    assert kohya_name_to_bfl("down_blocks_0_attentions_0") is None


def test_split_and_fuse_are_inverse_for_both_layouts():
    g = torch.Generator().manual_seed(0)
    sizes = [4, 4, 4, 16]
    # block-diagonal, unequal ranks, missing last piece
    pieces = {0: _layer(g, 4, 8, 2, 4.0), 1: _layer(g, 4, 8, 3, 6.0), 2: _layer(g, 4, 8, 1, 2.0)}
    down, up, alpha = fuse_pieces(pieces, sizes)
    assert down.shape == (6, 8) and up.shape == (28, 6) and alpha == 12.0
    assert torch.count_nonzero(up[12:]) == 0 and torch.count_nonzero(up[:4, 2:]) == 0
    back = split_fused(down, up, alpha, ["q", "k", "v", "mlp"], sizes)
    assert list(back) == ["q", "k", "v"]
    for i, n in enumerate("qkv"):
        assert torch.equal(back[n].down, pieces[i].down) and torch.equal(back[n].up, pieces[i].up)
        assert back[n].alpha == pieces[i].alpha
    # shared down (kohya's default training layout) round-trips as shared
    shared = _layer(g, 28, 8, 3, 5.0)
    parts = split_fused(shared.down, shared.up, shared.alpha, ["q", "k", "v", "mlp"], sizes)
    assert all(torch.equal(p.down, shared.down) and p.alpha == 5.0 for p in parts.values())
    d2, u2, a2 = fuse_pieces(dict(enumerate(parts.values())), sizes)
    assert torch.equal(d2, shared.down) and torch.equal(u2, shared.up) and a2 == 5.0
    # a fresh LoRA (up all zero) keeps every piece
    assert len(split_fused(shared.down, torch.zeros(28, 3), 3.0, ["q", "k", "v", "mlp"], sizes)) == 4
    # different alpha/rank per piece: mathematically equal after fusing (up rescaled)
    odd = {0: _layer(g, 4, 8, 2, 1.0), 1: _layer(g, 4, 8, 2, 8.0)}
    d3, u3, a3 = fuse_pieces(odd, [4, 4, 4])
    fused_delta = a3 / d3.shape[0] * u3 @ d3
    torch.testing.assert_close(fused_delta[:8], torch.cat([odd[0].delta(), odd[1].delta()]))


def test_kohya_diffusers_round_trips_are_exact(tmp_path):
    lora = _all_linear_lora(H)
    save_lora(tmp_path / "k.safetensors", lora, "kohya", {"dev2pro.rank": "2"})
    k = load_lora(tmp_path / "k.safetensors")
    assert k.source_format == "kohya"
    _assert_same(lora, k)
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        qkv_down = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
        alpha = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in keys
    assert qkv_down.shape == (6, H) and float(alpha) == 9.0  # block-diagonal: rank 3r, alpha 3 * alpha
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "3" and meta["dev2pro.rank"] == "2"
    assert meta["dev2pro.lora_format"] == "kohya"

    save_lora(tmp_path / "d.safetensors", k, "diffusers")
    d = load_lora(tmp_path / "d.safetensors")
    assert d.source_format == "diffusers"
    _assert_same(lora, d)
    save_lora(tmp_path / "k2.safetensors", d, "kohya")
    sd1, sd2 = to_state_dict(k, "kohya"), to_state_dict(load_lora(tmp_path / "k2.safetensors"), "kohya")
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[x], sd2[x]) for x in sd1)

    # a kohya file with shared-down fused layers (as kohya trains) round-trips byte for byte through diffusers
    g = torch.Generator().manual_seed(3)
    kohya_sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, H, generator=g),
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * H, 4, generator=g),
                "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
                "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4, H, generator=g),
                "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(7 * H, 4, generator=g),
                "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(4.0)}
    save_file(kohya_sd, tmp_path / "shared.safetensors")
    s = load_lora(tmp_path / "shared.safetensors")
    assert len(s) == 7 and s.layers["single_transformer_blocks.0.proj_mlp"].up.shape == (4 * H, 4)
    save_lora(tmp_path / "shared_d.safetensors", s, "diffusers")
    save_lora(tmp_path / "shared_k.safetensors", load_lora(tmp_path / "shared_d.safetensors"), "kohya")
    with safe_open(str(tmp_path / "shared_k.safetensors"), "pt") as f:
        assert set(f.keys()) == set(kohya_sd)
        assert all(torch.equal(f.get_tensor(x), kohya_sd[x]) for x in kohya_sd)


def test_our_kohya_file_matches_diffusers_kohya_converter(tmp_path):
    """Oracle: diffusers' kohya loader (hard-coded Flux-dev widths, so the LoRA is hidden-3072-shaped; no model is
    built) gives the same per-module deltas as our reader, for shared and block-diagonal fused layers and the
    final layer's shift/scale swap. Deltas are compared through random probes (B @ (A @ v)) to stay cheap."""
    from diffusers.loaders import FluxLoraLoaderMixin

    hidden = 3072
    ours = _all_linear_lora(hidden, rank=2, alpha=8.0)
    for k in list(ours.layers):  # the 12288-wide MLPs add nothing the attention/linear1 cases do not test
        if ".ff" in k or k.endswith(("proj_mlp", "proj_out")):
            del ours.layers[k]
    # diffusers ignores kohya's alpha for final_layer keys ("TODO: alphas" in its converter): use alpha == rank there
    ours.layers["norm_out.linear"].alpha = 2.0
    g = torch.Generator().manual_seed(9)  # a shared-down linear1 in another block (kohya's training layout)
    shared_down = torch.randn(2, hidden, generator=g)
    for n, rows in (("attn.to_q", hidden), ("attn.to_k", hidden), ("attn.to_v", hidden), ("proj_mlp", 4 * hidden)):
        ours.layers[f"single_transformer_blocks.1.{n}"] = LoraLayer(shared_down, torch.randn(rows, 2, generator=g),
                                                                     8.0)
    path = tmp_path / "kohya.safetensors"
    save_lora(path, ours, "kohya")
    reference = FluxLoraLoaderMixin.lora_state_dict(str(path))  # kohya -> diffusers, alpha folded into weights
    mine = load_lora(path)
    seen = set()
    for key in reference:
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        a, b = reference[key].float(), reference[key.replace("lora_A", "lora_B")].float()
        v = torch.randn(a.shape[1], 3, generator=g)
        theirs = b @ (a @ v)
        if name not in mine.layers:  # diffusers keeps an all-zero proj_mlp piece of a block-diagonal linear1
            assert name == "single_transformer_blocks.0.proj_mlp" and not theirs.any()
            continue
        seen.add(name)
        layer = mine.layers[name]
        torch.testing.assert_close(theirs, layer.scale * (layer.up @ (layer.down @ v)), rtol=1e-5, atol=1e-3)
    assert seen == set(mine.layers) == set(ours.layers)
    assert mine.layers["single_transformer_blocks.0.attn.to_k"].rank == 2  # block-diagonal split back
    assert torch.equal(mine.layers["single_transformer_blocks.1.attn.to_k"].down, shared_down)


def _model_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(1, 4, SPEC.in_channels, generator=g), t=torch.tensor([0.3]),
                txt=torch.randn(1, 3, SPEC.context_in_dim, generator=g),
                pooled=torch.randn(1, SPEC.vec_in_dim, generator=g), img_ids=image_ids(4, 4), txt_ids=text_ids(3),
                guidance=1.0)


@pytest.mark.parametrize("alpha", [4.0, 6.0])  # alpha == rank (no alpha keys) and alpha != rank (alpha keys)
def test_diffusers_pipeline_loads_our_diffusers_file_to_the_same_outputs(tmp_path, alpha):
    """Oracle: `FluxPipeline.load_lora_weights` (diffusers' own reader, into a fresh transformer) reproduces the output
    of our in-memory peft model."""
    from diffusers import FluxPipeline

    trained = random_transformer(SPEC, seed=1)
    add_lora(trained, rank=4, alpha=alpha, targets="all-linear", seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(trained):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / "lora_diffusers.safetensors"
    save_lora(path, lora_state_dict(trained), "diffusers", training_metadata(rank=4, alpha=alpha))
    with safe_open(str(path), "pt") as f:
        assert any(k.endswith(".alpha") for k in f.keys()) == (alpha != 4.0)
    fresh = random_transformer(SPEC, seed=1)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=fresh)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        ours, theirs = predict(trained, **_model_inputs()), predict(fresh, **_model_inputs())
        plain = predict(random_transformer(SPEC, seed=1), **_model_inputs())
    assert not torch.allclose(ours, plain, atol=1e-3)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    if alpha == 4.0:  # no alpha keys: the model-level loader reads the file as it is, too
        direct = random_transformer(SPEC, seed=1)
        direct.load_lora_adapter(str(path), prefix="transformer")
        with torch.no_grad():
            torch.testing.assert_close(predict(direct, **_model_inputs()), ours, rtol=1e-5, atol=1e-6)


def test_xlabs_and_comfyui_inputs(tmp_path):
    """XLabs processor keys (no alpha: scale 1) and ComfyUI `diffusion_model.` keys read as the documented layouts;
    XLabs also checked against diffusers' XLabs converter."""
    from diffusers.loaders import FluxLoraLoaderMixin

    g = torch.Generator().manual_seed(4)
    r = 3
    xl = {}
    for name, out, inn in (("double_blocks.0.processor.qkv_lora1", 3 * H, H),
                           ("double_blocks.0.processor.proj_lora1", H, H),
                           ("double_blocks.0.processor.qkv_lora2", 3 * H, H),
                           ("double_blocks.0.processor.proj_lora2", H, H),
                           ("single_blocks.0.processor.qkv_lora", 3 * H, H),
                           ("single_blocks.0.processor.proj_lora", H, 5 * H)):
        xl[f"{name}.down.weight"] = torch.randn(r, inn, generator=g)
        xl[f"{name}.up.weight"] = torch.randn(out, r, generator=g)
    save_file(xl, tmp_path / "xlabs.safetensors")
    lora = load_lora(tmp_path / "xlabs.safetensors")
    assert lora.source_format == "xlabs"
    up = xl["double_blocks.0.processor.qkv_lora2.up.weight"]
    assert torch.equal(lora.layers["transformer_blocks.0.attn.add_k_proj"].up, up[H:2 * H])
    assert torch.equal(lora.layers["transformer_blocks.0.attn.to_out.0"].down,
                       xl["double_blocks.0.processor.proj_lora1.down.weight"])
    assert torch.equal(lora.layers["single_transformer_blocks.0.attn.to_v"].up,
                       xl["single_blocks.0.processor.qkv_lora.up.weight"][2 * H:])
    assert lora.layers["single_transformer_blocks.0.proj_out"].in_features == 5 * H
    assert "single_transformer_blocks.0.proj_mlp" not in lora.layers
    assert all(v.alpha == r for v in lora.layers.values())
    reference = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path / "xlabs.safetensors"))
    ref = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"): reference[k.replace("lora_A", "lora_B")]
           .float() @ reference[k].float() for k in reference if k.endswith("lora_A.weight")}
    assert set(ref) == set(lora.layers)
    for k, v in ref.items():
        torch.testing.assert_close(lora.layers[k].delta(), v)

    # ComfyUI: BFL module paths under diffusion_model., lora_A/lora_B naming; equals the kohya reading
    comfy = _all_linear_lora(H, seed=7)
    kohya_sd = to_state_dict(comfy, "kohya")
    comfy_sd = {}
    for k, v in kohya_sd.items():
        name, _, suffix = k.partition(".")
        bfl = kohya_name_to_bfl(name.removeprefix("lora_unet_"))
        suffix = suffix.replace("lora_down", "lora_A").replace("lora_up", "lora_B")
        comfy_sd[f"diffusion_model.{bfl}.{suffix}"] = v
    save_file(comfy_sd, tmp_path / "comfy.safetensors")
    c = load_lora(tmp_path / "comfy.safetensors")
    assert c.source_format == "comfyui"
    _assert_same(comfy, c)

    # kohya-style keys on diffusers module names (OneTrainer): lora_transformer_<path with _>
    ot = {}
    for k, layer in comfy.layers.items():
        name = "lora_transformer_" + k.replace(".", "_")
        ot.update({f"{name}.lora_down.weight": layer.down, f"{name}.lora_up.weight": layer.up,
                   f"{name}.alpha": torch.tensor(layer.alpha)})
    save_file(ot, tmp_path / "onetrainer.safetensors")
    _assert_same(comfy, load_lora(tmp_path / "onetrainer.safetensors"))


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_lora(tmp_path / "missing.safetensors")
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_lora(tmp_path / "x.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_lora(tmp_path / "broken.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, H),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(H, 2),
               "lora_unet_double_blocks_0_img_banana.lora_down.weight": torch.zeros(2, H),
               "lora_unet_double_blocks_0_img_banana.lora_up.weight": torch.zeros(H, 2)}, tmp_path / "u.safetensors")
    with pytest.raises(CheckpointError, match="lora_unet_double_blocks_0_img_banana"):
        load_lora(tmp_path / "u.safetensors")
    save_file({"model.weight": torch.zeros(2)}, tmp_path / "n.safetensors")
    with pytest.raises(CheckpointError, match="not a recognised Flux LoRA"):
        load_lora(tmp_path / "n.safetensors")
    with pytest.raises(UserError, match="unknown LoRA format"):
        save_lora(tmp_path / "o.safetensors", _all_linear_lora(H), "comfy")
    assert not list(tmp_path.glob(".o.safetensors*"))  # nothing half-written


def test_diffusers_alpha_from_peft_metadata_and_detection(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"transformer.proj_out.lora_A.weight": torch.randn(4, H, generator=g),
          "transformer.proj_out.lora_B.weight": torch.randn(48, 4, generator=g),
          "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, H, generator=g),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 4, generator=g)}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                 "transformer.alpha_pattern": {"proj_out": 2}})}
    save_file(sd, tmp_path / "p.safetensors", metadata=meta)
    lora = load_lora(tmp_path / "p.safetensors")
    assert lora.layers["proj_out"].alpha == 2.0 and lora.layers["transformer_blocks.0.attn.to_q"].alpha == 8.0
    save_file(sd, tmp_path / "plain.safetensors")
    assert all(v.alpha == 4.0 for v in load_lora(tmp_path / "plain.safetensors").layers.values())
    assert detect_format(["lora_te1_text_model_x.lora_down.weight", "lora_unet_img_in.lora_down.weight"]) == "kohya"
    assert detect_format(["diffusion_model.img_in.lora_A.weight"]) == "comfyui"
    assert detect_format(["unrelated.weight"]) == "unknown"


def test_describe_lora_summarises(tmp_path):
    lora = _all_linear_lora(H)
    meta = training_metadata(base_model="dev2pro-fp8.safetensors", base_model_hash="ab12", rank=2, alpha=3.0,
                             targets="all-linear", training_guidance=1.0, steps=500, resolution=512, dataset_size=20)
    assert set(meta) <= set(METADATA_KEYS)
    save_lora(tmp_path / "l.safetensors", lora, "kohya", meta)
    text = describe_lora(tmp_path / "l.safetensors")
    assert "format: kohya" in text
    assert f"modules: {len(lora)}" in text
    assert f"rank: 2 (all {len(lora)} layers)" in text and f"alpha: 3 (all {len(lora)} layers)" in text
    assert "15 LoRA modules in the file" in text  # fused qkv / linear1 / final layer counted once
    assert "attention 11" in text and "mlp 6" in text and "modulation 4" in text and "output 1" in text
    assert "dev2pro.training_guidance = 1.0" in text and "dev2pro.base_model = dev2pro-fp8.safetensors" in text


def test_model_keys_check_uses_file_names(tmp_path):
    """A LoRA read from a file for a bigger model fails against a tiny model with the key and both shapes."""
    from dev2pro.lora.inject import merge_lora_into_model

    save_lora(tmp_path / "big.safetensors", _all_linear_lora(64), "kohya")
    model = random_transformer(SPEC)
    assert len(linear_modules(model)) > 0
    with pytest.raises(UserError, match=r"big.safetensors: layer '.+' has shape \(out \d+, in 64\).*in 32\)"):
        merge_lora_into_model(model, load_lora(tmp_path / "big.safetensors"), what=str(tmp_path / "big.safetensors"))


def test_diffusers_loads_our_kohya_file_into_a_full_width_model(tmp_path):
    """Oracle through the real loader: `FluxPipeline.load_lora_weights` on our kohya file, into a hidden-3072
    one-block transformer (flux-1block: diffusers' kohya converter hard-codes Flux-dev widths), puts on every module
    the same LoRA delta as ours (to bf16 rounding: diffusers casts adapters to the base dtype). Base weights are left
    uninitialised (only shapes matter here; output equality is tested at tiny size above). The final layer is left
    out: diffusers' converter emits its keys without the `transformer.` prefix, so its own loader drops them."""
    from diffusers import FluxPipeline
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from dev2pro.flux.models import build_transformer
    from dev2pro.lora.inject import resolve_targets

    model = build_transformer(PRESETS["flux-1block"], device="meta").to_empty(device="cpu").to(torch.bfloat16)
    lin = linear_modules(model)
    g = torch.Generator().manual_seed(1)
    lora = LoraWeights(layers={p: LoraLayer(torch.randn(2, lin[p].in_features, generator=g) * 0.05,
                                            torch.randn(lin[p].out_features, 2, generator=g) * 0.05, 8.0)
                               for p in resolve_targets(model, "all-linear")})
    save_lora(tmp_path / "k.safetensors", lora, "kohya")
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    pipe.load_lora_weights(str(tmp_path / "k.safetensors"))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, PeftLoraLayer)}
    assert set(wrapped) == set(lora.layers)
    for name, m in wrapped.items():
        adapter = next(iter(m.lora_A))
        a, b = m.lora_A[adapter].weight.detach().float(), m.lora_B[adapter].weight.detach().float()
        v = torch.randn(a.shape[1], 2, generator=g)
        mine = lora.layers[name]
        expect = mine.scale * (mine.up @ (mine.down @ v))
        got = m.scaling[adapter] * (b @ (a @ v))
        assert float((got - expect).norm() / expect.norm()) < 1e-2, name
