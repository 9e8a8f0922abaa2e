"""`dev2pro lora ...` end to end on tiny files: convert, merge, extract, resize, inspect, and one-line errors."""

import torch

from dev2pro.cli import main
from dev2pro.flux.checkpoint import load_transformer, save_transformer
from dev2pro.flux.models import PRESETS, random_transformer
from dev2pro.lora.files import load_lora, save_lora
from dev2pro.lora.inject import LoraLayer, LoraWeights, linear_modules, merge_lora_into_model

SPEC = PRESETS["tiny-dev"]


def _lora(seed=0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    h = SPEC.hidden_size
    names = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.norm.linear")
    outs = (h, h, h, h, 3 * h)
    return LoraWeights(layers={n: LoraLayer(torch.randn(2, h, generator=g) * 0.1, torch.randn(o, 2, generator=g) * 0.1,
                                            1.0) for n, o in zip(names, outs)})


def test_convert_inspect_resize(tmp_path, capsys):
    save_lora(tmp_path / "d.safetensors", _lora(), "diffusers")
    assert main(["lora", "convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"),
                 "--to", "kohya"]) == 0
    assert "(diffusers, 5 modules)" in capsys.readouterr().out
    assert main(["lora", "convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d2.safetensors"),
                 "--to", "diffusers"]) == 0
    a, b = load_lora(tmp_path / "d.safetensors"), load_lora(tmp_path / "d2.safetensors")
    assert all(torch.equal(a.layers[k].up, b.layers[k].up) and torch.equal(a.layers[k].down, b.layers[k].down)
               for k in a.layers)
    assert main(["lora", "inspect", str(tmp_path / "k.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format: kohya" in out and "alpha: 1 (all 5 layers)" in out
    assert main(["lora", "resize", str(tmp_path / "k.safetensors"), str(tmp_path / "r.safetensors"), "--rank",
                 "1"]) == 0
    assert "kept energy" in capsys.readouterr().out
    assert max(v.rank for v in load_lora(tmp_path / "r.safetensors").layers.values()) == 1


def test_merge_and_extract(tmp_path, capsys):
    base = random_transformer(SPEC)
    save_transformer(base, tmp_path / "base.safetensors")
    lora = _lora()
    save_lora(tmp_path / "l.safetensors", lora, "kohya")
    assert main(["lora", "merge", str(tmp_path / "base.safetensors"), str(tmp_path / "m.safetensors"),
                 f"{tmp_path / 'l.safetensors'}:0.5"]) == 0
    assert "merged 1 LoRA(s)" in capsys.readouterr().out
    expect = random_transformer(SPEC)
    merge_lora_into_model(expect, lora, 0.5)
    got = load_transformer(tmp_path / "m.safetensors")
    p = "single_transformer_blocks.0.norm.linear"
    torch.testing.assert_close(linear_modules(got)[p].weight, linear_modules(expect)[p].weight)
    assert main(["lora", "extract", str(tmp_path / "base.safetensors"), str(tmp_path / "m.safetensors"),
                 str(tmp_path / "x.safetensors"), "--energy", "0.9999", "--format", "diffusers", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "overall 1.0000" in out and "per layer" not in out
    x = load_lora(tmp_path / "x.safetensors")
    torch.testing.assert_close(x.layers[p].delta(), lora.layers[p].delta(0.5), rtol=1e-4, atol=1e-6)


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["lora", "inspect", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    save_lora(tmp_path / "l.safetensors", _lora(), "kohya")
    assert main(["lora", "convert", str(tmp_path / "l.safetensors"), str(tmp_path / "l.safetensors"),
                 "--to", "kohya"]) == 2
    assert "output is one of the inputs" in capsys.readouterr().err
    assert main(["lora", "merge", str(tmp_path / "l.safetensors"), str(tmp_path / "o.safetensors"),
                 str(tmp_path / "l.safetensors")]) == 2
    assert "is a LoRA file, not a transformer checkpoint" in capsys.readouterr().err
