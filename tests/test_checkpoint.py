"""Checkpoint I/O: round trips with bit-identical outputs, diffusers interop, architecture from headers only,
streaming memory, atomic writes, errors, hashing."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from dev2pro.errors import CheckpointError
from dev2pro.flux import checkpoint, convert, describe, hashing, keymap, output_check, safetensors_io, sources
from dev2pro.flux.models import PRESETS, random_transformer


def _out(model, spec):
    return output_check.model_output(model, output_check.fixed_inputs(spec, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bfl_file_round_trip_is_bit_identical(tmp_path, dtype):
    """(b) save BFL -> detect -> read_spec -> load: same tensors, same outputs, dtype kept."""
    spec = PRESETS["tiny-dev"]
    model = random_transformer(spec, 0, dtype=dtype)
    path = checkpoint.save_transformer(model, tmp_path / "m.safetensors")
    assert sources.detect_format(path) == "bfl"
    assert describe.read_spec(path) == spec
    back = checkpoint.load_transformer(path)
    assert all(p.dtype == dtype for p in back.parameters())
    assert torch.equal(_out(back, spec), _out(model, spec))
    sd, sd2 = model.state_dict(), back.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_comfy_prefixed_checkpoint_loads_and_ignores_other_components(tmp_path):
    spec = PRESETS["tiny-pro"]
    model = random_transformer(spec, 4)
    bfl = keymap.diffusers_to_bfl(model.state_dict(), spec.hidden_size)
    full = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.ones(2, 2)  # the VAE of a full ComfyUI checkpoint
    save_file(full, tmp_path / "comfy.safetensors")
    assert sources.detect_format(tmp_path / "comfy.safetensors") == "bfl"
    back = checkpoint.load_transformer(tmp_path / "comfy.safetensors", dtype="bf16")
    assert next(back.parameters()).dtype == torch.bfloat16
    ref = random_transformer(spec, 4).to(torch.bfloat16)
    assert torch.equal(_out(back, spec), _out(ref, spec))


def test_diffusers_folder_sharded_round_trip_and_diffusers_interop(tmp_path):
    """(b) our sharded diffusers folder loads bit-identically with our loader and with diffusers' from_pretrained."""
    from diffusers import FluxTransformer2DModel

    spec = PRESETS["tiny-dev"]
    model = random_transformer(spec, 2)
    folder = tmp_path / "pipe" / "transformer"
    checkpoint.save_transformer(model, folder, format="diffusers", max_shard_bytes=64 * 1024)
    index = json.loads((folder / sources.DIFFUSERS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((folder / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    for ref in (folder, tmp_path / "pipe"):  # transformer folder, or the pipeline folder above it
        assert sources.detect_format(ref) == "diffusers"
        assert describe.read_spec(ref) == spec
        assert torch.equal(_out(checkpoint.load_transformer(ref), spec), _out(model, spec))
    theirs = FluxTransformer2DModel.from_pretrained(folder)
    assert torch.equal(_out(theirs, spec), _out(model, spec))
    # and a folder diffusers wrote (single file) reads with our loader
    theirs.save_pretrained(tmp_path / "theirs")
    assert torch.equal(_out(checkpoint.load_transformer(tmp_path / "theirs"), spec), _out(model, spec))
    # diffusers folder -> BFL file -> same model
    convert.convert_checkpoint(folder, tmp_path / "b.safetensors", progress=False)
    assert torch.equal(_out(checkpoint.load_transformer(tmp_path / "b.safetensors"), spec), _out(model, spec))


def _sparse_checkpoint(path, spec, dtype="BF16", prefix=""):
    """A real-size safetensors file of `spec`: a real header, then zeros as a sparse hole (no disk, no RAM)."""
    header, pos = {}, 0
    for k, shape in describe.expected_shapes(spec, "bfl").items():
        n = 2
        for s in shape:
            n *= s
        header[prefix + k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + pos)
    return pos


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_read_spec_of_a_real_size_header_allocates_nothing(tmp_path, name):
    import resource

    path = tmp_path / f"{name}.safetensors"
    nbytes = _sparse_checkpoint(path, PRESETS[name], prefix="model.diffusion_model.")
    assert nbytes > 23e9 if name == "flux-dev" else nbytes > 23e9 - 2e7
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert describe.read_spec(path) == PRESETS[name]
    info = describe.describe_checkpoint(path)
    assert (info.preset, info.format, info.dtypes) == (name, "bfl", {"bfloat16": len(describe.expected_shapes(
        PRESETS[name], "bfl"))})
    assert info.num_params == PRESETS[name].num_params()
    if name == "flux-dev":
        assert info.num_params == 11_901_408_320  # flux-facts.md
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: far below 24 GB


def test_preset_and_toy_references(monkeypatch, tmp_path):
    spec = PRESETS["tiny-pro"]
    a = checkpoint.load_transformer("preset:tiny-pro@3")
    b = random_transformer(spec, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    bf16 = checkpoint.load_transformer("preset:tiny-pro", dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="unknown preset"):
        checkpoint.load_transformer("preset:nope")
    path = checkpoint.save_transformer(b, tmp_path / "toy.safetensors")
    from dev2pro.toy import assets

    monkeypatch.setattr(assets, "model_path", lambda name: path if name == "pro" else None)
    assert torch.equal(_out(checkpoint.load_transformer("toy:pro"), spec), _out(b, spec))


STREAM_SCRIPT = textwrap.dedent("""
    import gc, json, sys, torch
    from pathlib import Path
    from dev2pro.flux import checkpoint, convert, describe
    from dev2pro.flux.models import PRESETS
    torch.set_num_threads(2)
    d, spec = Path(sys.argv[1]), PRESETS["flux-mid"]

    def kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024

    def reset_peak():  # Linux: writing 5 resets VmHWM (peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    shapes = describe.expected_shapes(spec, "diffusers")  # values do not matter here: zeros skip the RNG
    sd = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    model_bytes = sum(t.numel() * 2 for t in sd.values())
    checkpoint.save_transformer(sd, d / "mid.safetensors", spec=spec)
    del sd
    gc.collect()
    base = kib("VmRSS"); reset_peak()
    convert.convert_checkpoint(d / "mid.safetensors", d / "mid8.safetensors", dtype="fp8_e4m3fn",
                               scaling="channel", progress=False)
    convert_extra = kib("VmHWM") - base
    gc.collect()
    base = kib("VmRSS"); reset_peak()
    m = checkpoint.load_transformer(d / "mid.safetensors")
    load_extra = kib("VmHWM") - base - model_bytes
    print(json.dumps(dict(model_bytes=model_bytes, convert_extra=convert_extra, load_extra=load_extra)))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_convert_and_load_stream_one_group_at_a_time(fast_tmp):
    """(c) flux-mid (0.16B params, 320 MB in bf16): converting to fp8 and loading need about one tensor group of
    extra memory (the largest, single-block linear1 in fp32, is 16.5 MB), measured as peak RSS in a subprocess."""
    res = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(fast_tmp)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    print(m)
    assert m["model_bytes"] > 300e6
    assert m["convert_extra"] < 150e6, m  # whole model in fp32 would be 640 MB
    assert m["load_extra"] < 100e6, m


def test_save_is_atomic(tmp_path, monkeypatch):
    spec = PRESETS["tiny-dev"]
    path = checkpoint.save_transformer(random_transformer(spec, 0), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(self, key, t):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors_io.StreamWriter, "write", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save_transformer(random_transformer(spec, 1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_errors_are_one_line_and_name_the_file(tmp_path):
    spec = PRESETS["tiny-dev"]
    good = checkpoint.save_transformer(random_transformer(spec, 0), tmp_path / "good.safetensors")
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    sd = load_file(good)
    sd["double_blocks.0.img_attn.qkv.weight"] = torch.zeros(5, 32)
    save_file(sd, tmp_path / "shape.safetensors")
    del sd["double_blocks.0.img_attn.qkv.weight"], sd["double_blocks.0.img_attn.qkv.bias"]
    save_file(sd, tmp_path / "missing.safetensors")
    cases = {
        "other": "not a Flux transformer", "cut": "truncated", "junk": "not a safetensors file",
        "shape": "has shape [5, 32], expected [96, 32]", "missing": "missing double_blocks.0.img_attn.qkv",
    }
    for name, msg in cases.items():
        path = tmp_path / f"{name}.safetensors"
        for fn in (checkpoint.load_transformer, describe.read_spec):
            with pytest.raises(CheckpointError) as e:
                fn(path)
            assert msg in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load_transformer(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="not a diffusers transformer folder"):
        checkpoint.load_transformer(tmp_path)


class _Payload:
    """Unpickling this creates a marker file: the test proves we never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "pytorch_model.bin", "disguised.safetensors"])
def test_pickle_files_are_refused_without_unpickling(tmp_path, name):
    import pickle

    marker = tmp_path / "UNPICKLED"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"state_dict": _Payload(str(marker))}, protocol=4))
    for fn in (sources.detect_format, checkpoint.load_transformer, describe.read_spec):
        with pytest.raises(CheckpointError, match="pickle") as e:
            fn(path)
        assert "convert it to safetensors" in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
    # the payload is real: unpickling it would have created the marker
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_torch_save_zip_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        sources.detect_format(path)


def test_model_hash_is_sha256_of_the_file(tmp_path):
    spec = PRESETS["tiny-dev"]
    a = checkpoint.save_transformer(random_transformer(spec, 0), tmp_path / "a.safetensors")
    b = checkpoint.save_transformer(random_transformer(spec, 1), tmp_path / "b.safetensors")
    assert hashing.model_hash(a) == "sha256:" + hashlib.sha256(a.read_bytes()).hexdigest()
    assert hashing.model_hash(a) != hashing.model_hash(b)
    f = checkpoint.save_transformer(random_transformer(spec, 0), tmp_path / "f", format="diffusers")
    h = hashing.model_hash(f)
    assert h.startswith("sha256:") and h == hashing.model_hash(tmp_path / "f")


def test_model_hash_disk_cache_follows_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import json
    import os

    from dev2pro.flux import hashing as ck

    monkeypatch.setattr(ck, "HASH_CACHE_FILE", tmp_path / "cache" / "sha256.json")
    monkeypatch.setattr(ck, "HASH_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(ck, "_HASHES", {})
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"0123456789" * 100)
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert ck._file_sha256(f) == real
    cache = json.loads(ck.HASH_CACHE_FILE.read_text())
    assert list(cache.values()) == [real]
    # a later process (empty in-memory table) takes the stored value without reading the file
    ck._HASHES.clear()
    key = next(iter(cache))
    ck.HASH_CACHE_FILE.write_text(json.dumps({key: "stored"}))
    assert ck._file_sha256(f) == "stored"
    # a changed file (new mtime) is hashed again
    ck._HASHES.clear()
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert ck._file_sha256(f) == real
