"""BFL <-> diffusers key mapping, checked against diffusers' own converter and the diffusers model."""


import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file

from dev2pro.flux import checkpoint, describe, keymap
from dev2pro.flux.models import PRESETS, random_transformer


def _distinct_rows_state_dict(spec, dtype, seed=0):
    """Every tensor `r[:, None] + c[None, :]` with random r, c: all rows differ, so any row split, swap or
    permutation shows; cheap enough for a 0.5B-parameter model (random normal would take ~10 s here)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in describe.expected_shapes(spec, "diffusers").items():
        r = torch.randn(s[0], generator=g).to(dtype)
        out[k] = r[:, None] + torch.randn(s[1], generator=g).to(dtype)[None, :] if len(s) == 2 else r
    return out


@pytest.mark.slow
def test_our_bfl_file_through_diffusers_converter_gives_back_original_tensors(fast_tmp):
    """(a) Hidden 3072 (the converter hard-codes it), one double + one single block, bf16."""
    spec = PRESETS["flux-1block"]
    sd = _distinct_rows_state_dict(spec, torch.bfloat16)
    path = checkpoint.save_transformer(sd, fast_tmp / "flux.safetensors", spec=spec)
    bfl = load_file(path)  # safetensors' own reader: independent of ours
    assert set(bfl) == set(describe.expected_shapes(spec, "bfl"))
    back = convert_flux_transformer_checkpoint_to_diffusers(bfl)
    assert set(back) == set(sd)
    bad = [k for k in sd if not torch.equal(back[k], sd[k])]
    assert not bad, bad[:5]


def test_state_dict_round_trip_and_prefix():
    spec = PRESETS["tiny-dev"]
    sd = random_transformer(spec, 1).state_dict()
    bfl = keymap.diffusers_to_bfl(sd, spec.hidden_size)
    assert set(bfl) == set(describe.expected_shapes(spec, "bfl"))
    prefixed = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    back = keymap.bfl_to_diffusers(prefixed, spec.hidden_size)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # special cases written out: qkv is [q; k; v], linear1 is [q; k; v; mlp], final adaLN halves swapped
    h = spec.hidden_size
    qkv = bfl["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(qkv[h:2 * h], sd["transformer_blocks.0.attn.to_k.weight"])
    lin1 = bfl["single_blocks.0.linear1.weight"]
    assert torch.equal(lin1[3 * h:], sd["single_transformer_blocks.0.proj_mlp.weight"])
    ada = bfl["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(ada[:h], sd["norm_out.linear.weight"][h:])
    assert torch.equal(bfl["double_blocks.0.txt_attn.norm.key_norm.scale"],
                       sd["transformer_blocks.0.attn.norm_added_k.weight"])


def test_module_level_mapping_matches_state_dict_mapping():
    """Every BFL module: `diffusers_weight == bfl_weight[rows]` for weight and bias; the inverse finds it back."""
    spec = PRESETS["tiny-dev"]
    sd = random_transformer(spec, 2).state_dict()
    bfl = keymap.diffusers_to_bfl(sd, spec.hidden_size)
    modules = {k.rpartition(".")[0] for k in bfl}
    seen = set()
    for m in sorted(modules):
        pieces = keymap.bfl_module_to_diffusers(spec, m)
        for j, (dpath, rows) in enumerate(pieces):
            for bp, dp in (("weight", "weight"), ("bias", "bias"), ("scale", "weight")):
                if f"{m}.{bp}" in bfl:
                    assert torch.equal(bfl[f"{m}.{bp}"][rows], sd[f"{dpath}.{dp}"]), (m, dpath)
            back, index = keymap.diffusers_module_to_bfl("transformer." + dpath)
            assert back == m
            assert index == (None if len(pieces) == 1 and rows == slice(None) else j)
            seen.add(dpath)
    assert seen == {k.rpartition(".")[0] for k in sd}


def test_split_sizes_and_unknown_keys():
    assert keymap.split_sizes(3072, "single_blocks.7.linear1") == (3072, 3072, 3072, 12288)
    assert keymap.split_sizes(3072, "model.diffusion_model.double_blocks.0.txt_attn.qkv") == (3072,) * 3
    assert keymap.split_sizes(3072, "img_in") is None
    rows = keymap.bfl_module_to_diffusers(4, "final_layer.adaLN_modulation.1")[0][1]
    assert rows == [4, 5, 6, 7, 0, 1, 2, 3]
    with pytest.raises(KeyError, match="not Flux"):
        keymap.plan_bfl_to_diffusers(["img_in.weight", "vae.decoder.conv.weight"], 32)
    with pytest.raises(KeyError, match="missing"):
        keymap.plan_diffusers_to_bfl(["transformer_blocks.0.attn.to_q.weight"], 32)


def test_fp8_scales_follow_their_rows():
    """Per-row scales split like biases; per-tensor scalars are shared by the pieces and fuse back only if equal."""
    h = 4
    g = keymap.plan_bfl_to_diffusers(["double_blocks.0.img_attn.qkv.scale_weight"], h)[0]
    per_row = torch.arange(3 * h, dtype=torch.float32)
    out = keymap.run_group(g, {g.inputs[0]: per_row})
    assert torch.equal(out["transformer_blocks.0.attn.to_v.scale_weight"], per_row[2 * h:])
    out = keymap.run_group(g, {g.inputs[0]: torch.tensor(0.5)})
    assert all(v.item() == 0.5 for v in out.values())
    back = keymap.plan_diffusers_to_bfl(list(out), h)[0]
    assert keymap.run_group(back, out)["double_blocks.0.img_attn.qkv.scale_weight"].item() == 0.5
    out["transformer_blocks.0.attn.to_k.scale_weight"] = torch.tensor(0.25)
    with pytest.raises(ValueError, match="different per-tensor scales"):
        keymap.run_group(back, out)
