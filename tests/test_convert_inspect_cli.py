"""`dev2pro convert` and `dev2pro inspect` through the CLI entry point: outputs, summaries, and one-line errors."""

import pickle
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dev2pro.cli import main
from dev2pro.commands.convert import output_check_decision
from dev2pro.flux import checkpoint, convert, output_check, sources
from dev2pro.flux.models import PRESETS, random_transformer

SPEC = PRESETS["tiny-dev"]


@pytest.fixture(scope="module")
def bfl(tmp_path_factory):
    return checkpoint.save_transformer(random_transformer(SPEC, 0, dtype=torch.bfloat16),
                                       tmp_path_factory.mktemp("src") / "tiny.safetensors")


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_layouts_round_trip_through_the_cli(bfl, tmp_path, capsys):
    code, out, _ = _run(capsys, "convert", bfl, tmp_path / "diff", "--format", "diffusers")
    assert code == 0 and "(bfl) ->" in out and "(diffusers)" in out
    assert "model output relative RMS error vs source (fixed input): 0.000e+00" in out
    code, out, _ = _run(capsys, "convert", tmp_path / "diff", tmp_path / "back.safetensors", "--no-output-check")
    assert code == 0 and "skipped (--no-output-check)" in out
    a, b = load_file(bfl), load_file(tmp_path / "back.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    code, out, _ = _run(capsys, "convert", bfl, tmp_path / "fp32.safetensors", "--dtype", "fp32")
    assert code == 0 and all(v.dtype == torch.float32 for v in load_file(tmp_path / "fp32.safetensors").values())


def test_convert_fp8_summary(bfl, tmp_path, capsys):
    code, out, _ = _run(capsys, "convert", bfl, tmp_path / "f8.safetensors", "--dtype", "fp8_e4m3fn",
                        "--scaling", "tensor")
    assert code == 0
    lines = out.splitlines()
    assert "(comfy-scaled-fp8)" in lines[0] and lines[1].startswith("size: ")
    rows = {m[1]: (float(m[2]), m[3]) for m in re.finditer(r"^  (.+?)\s{2,}(\S+) .* (\S+)$", out, re.M)}
    for kind in ("attn qkv", "attn proj", "mlp", "modulation", "single linear1 (qkv+mlp in)", "embedders",
                 "final layer", "biases", "qk norms"):
        assert kind in rows, out
    assert 0.02 < rows["attn qkv"][0] < 0.03 and rows["attn qkv"][1] == "float8_e4m3fn"
    assert rows["embedders"] == (0.0, "bfloat16") and rows["final layer"] == (0.0, "bfloat16")
    err = float(out.split("vs source (fixed input): ")[1].split()[0])
    assert 0 < err < 0.05
    assert err == pytest.approx(output_check.model_output_error(bfl, tmp_path / "f8.safetensors"), rel=1e-3)


def test_output_check_is_skipped_for_large_models():
    run, note = output_check_decision(PRESETS["flux-dev"].num_params(), "auto")
    assert not run and "11.90B parameters" in note and "--output-check" in note
    assert output_check_decision(PRESETS["flux-dev"].num_params(), "yes") == (True, "")
    assert output_check_decision(SPEC.num_params(), "auto") == (True, "")


def test_inspect_formats(bfl, tmp_path, capsys):
    checkpoint.save_transformer(load_file(bfl), tmp_path / "pipe" / "transformer", format="diffusers", spec=SPEC,
                                max_shard_bytes=50_000)
    for scaling in ("none", "tensor", "channel"):
        convert.convert_checkpoint(bfl, tmp_path / f"{scaling}.safetensors", dtype="fp8_e4m3fn", scaling=scaling,
                                   progress=False)
    n = f"{SPEC.num_params():,}"
    cases = {
        bfl: ["bfl (BFL single file)", "bfloat16: 52"],
        tmp_path / "pipe": ["diffusers", "bfloat16: 66"],
        tmp_path / "none.safetensors": ["fp8 (fp8 single file", "plain cast", "float8_e4m3fn: 13"],
        tmp_path / "tensor.safetensors": ["comfy-scaled-fp8", "per-tensor scales", "bfloat16: 39, float8_e4m3fn: 13"],
        tmp_path / "channel.safetensors": ["dev2pro-channel-fp8", "per-output-channel scales"],
    }
    for path, expect in cases.items():
        code, out, _ = _run(capsys, "inspect", path)
        assert code == 0
        for s in expect + ["model:      tiny-dev (hidden 32", f"parameters: {n}", "guidance embedding: yes"]:
            assert s in out, (path, s, out)
    pro = checkpoint.save_transformer(random_transformer(PRESETS["tiny-pro"], 0), tmp_path / "pro.safetensors")
    assert "guidance embedding: no" in _run(capsys, "inspect", pro)[1]


def _kohya_lora(path):
    h, r = SPEC.hidden_size, 4
    save_file({
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(r, h),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * h, r),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
    }, path, metadata={"ss_network_dim": "4"})
    return path


def test_inspect_hands_lora_files_over(tmp_path, capsys, monkeypatch):
    path = _kohya_lora(tmp_path / "lora.safetensors")
    assert sources.detect_format(path) == "lora"
    code, out, _ = _run(capsys, "inspect", path)
    assert code == 0 and "rank" in out and "kohya" in out.lower()
    monkeypatch.setitem(sys.modules, "dev2pro.lora.describe", None)  # the LoRA module missing: generic description
    code, out, _ = _run(capsys, "inspect", path)
    assert code == 0 and "LoRA (3 tensors)" in out and "ss_network_dim = 4" in out
    code, _, err = _run(capsys, "convert", path, tmp_path / "x.safetensors")
    assert code == 2 and "is a LoRA file" in err


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_errors_are_one_line_with_exit_code_2(bfl, tmp_path, capsys):
    save_file({"text_model.embeddings.weight": torch.zeros(4, 4)}, tmp_path / "clip.safetensors")
    data = bfl.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    marker = tmp_path / "UNPICKLED"
    (tmp_path / "model.ckpt").write_bytes(pickle.dumps(_Marker(str(marker))))
    sd = load_file(bfl)
    sd["single_blocks.0.linear2.weight"] = torch.zeros(32, 7, dtype=torch.bfloat16)
    save_file(sd, tmp_path / "shape.safetensors")
    cases = [
        (["inspect", tmp_path / "clip.safetensors"], "not a Flux transformer checkpoint"),
        (["convert", tmp_path / "cut.safetensors", tmp_path / "o.safetensors"], "truncated"),
        (["inspect", tmp_path / "model.ckpt"], "pickle"),
        (["convert", tmp_path / "model.ckpt", tmp_path / "o.safetensors"], "convert it to safetensors"),
        (["inspect", tmp_path / "shape.safetensors"], "single_blocks.0.linear2.weight has shape [32, 7]"),
        (["convert", tmp_path / "shape.safetensors", tmp_path / "o.safetensors"], "expected [32, 160]"),
        (["convert", bfl, tmp_path / "o.safetensors", "--scaling", "tensor"], "needs --dtype fp8_e4m3fn"),
        (["convert", bfl, tmp_path / "o", "--format", "diffusers", "--dtype", "fp8_e4m3fn", "--scaling", "channel"],
         "use --format bfl"),
        (["convert", bfl, bfl], "output is the input"),
        (["convert", bfl, tmp_path / "o.bin"], "must end in .safetensors"),
    ]
    for argv, msg in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 2, (argv, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err, (argv, err)
        named = [str(a) for a in argv[1:] if str(a) in lines[0]] or argv[0] == "convert" and "--scaling" in argv
        assert named, (argv, err)
    assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o").exists()
