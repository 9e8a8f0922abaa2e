"""Sharded training state in one process: the seeded-preset stream, the sharded loader's checks, DCP shard folders read
back as a transformer source (and by `dev2pro convert`), the fp8 refusal under FSDP2. The multi-process behaviour
(resharding 2 -> 1 and 1 -> 2, per-rank files) is in test_multiprocess.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dev2pro.errors import CheckpointError, ConfigError
from dev2pro.flux.models import PRESETS, build_transformer, iter_random_weights, random_transformer
from dev2pro.train.fsdp import check_fsdp_dtypes, fill

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_random_weights_stream_equals_the_materialised_preset():
    ref = random_transformer(PRESETS["tiny-dev"], seed=3).state_dict()
    got = dict(iter_random_weights(PRESETS["tiny-dev"], seed=3))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_file_stream_fills_a_model_equal_to_load_transformer(tmp_path):
    from dev2pro.flux.checkpoint import load_transformer, save_transformer, weight_stream

    path = save_transformer(random_transformer(PRESETS["tiny-dev"], seed=1), tmp_path / "m.safetensors",
                            dtype=torch.bfloat16)
    spec, stream = weight_stream(str(path))
    model = build_transformer(spec, device="meta").to_empty(device="cpu")
    fill(model, stream, torch.float32, "m")
    ref = load_transformer(path, dtype=torch.float32).state_dict()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def test_fill_names_a_missing_or_misshapen_tensor():
    spec = PRESETS["tiny-dev"]
    model = build_transformer(spec, device="meta").to_empty(device="cpu")
    stream = list(iter_random_weights(spec))
    with pytest.raises(CheckpointError, match=r"m: missing tensors .*\(\+\d+ more\)"):
        fill(model, stream[:3], torch.float32, "m")
    bad = [(k, t[:1] if i == 0 else t) for i, (k, t) in enumerate(stream)]
    with pytest.raises(CheckpointError, match=f"m: {stream[0][0]} has shape"):
        fill(model, bad, torch.float32, "m")


def test_fp8_weights_are_refused_under_fsdp2():
    from dev2pro.flux.fp8 import swap_linears_to_fp8

    check_fsdp_dtypes(random_transformer(PRESETS["tiny-dev"]))  # fp32: accepted
    model = swap_linears_to_fp8(random_transformer(PRESETS["tiny-dev"]), scaling="tensor")
    with pytest.raises(ConfigError, match="FSDP2 cannot shard fp8 weights .* distributed.strategy = 'ddp'"):
        check_fsdp_dtypes(model)


def test_dcp_shards_of_one_process_export_through_convert(tmp_path):
    """A 1-process DCP checkpoint (model, AdamW state, EMA) holds exactly the live tensors, and `dev2pro convert`
    exports its EMA weights (the default when present) as a BFL file, read tensor by tensor."""
    from dev2pro.cli import main
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.sharded_source import ShardedSource
    from dev2pro.train.ema import Ema
    from dev2pro.train.sharded import save_shards, write_config

    model = random_transformer(PRESETS["tiny-dev"], seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = Ema(dict(model.named_parameters()), decay=0.5)
    model.x_embedder.weight.grad = torch.ones_like(model.x_embedder.weight)
    opt.step()
    ema.update(dict(model.named_parameters()))
    save_shards(tmp_path / "ckpt", model, opt, ema)
    write_config(tmp_path / "ckpt", model)
    shard = load_file(str(tmp_path / "ckpt" / "shard-00001-model-00001-of-00001.safetensors"))
    assert torch.equal(shard["model.x_embedder.weight"], model.x_embedder.weight)
    assert torch.equal(shard["optim.x_embedder.weight.exp_avg"], opt.state[model.x_embedder.weight]["exp_avg"])
    assert torch.equal(shard["ema.x_embedder.weight"], ema.shadow["x_embedder.weight"])
    assert ShardedSource(tmp_path / "ckpt").prefix == "ema"
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "out.safetensors"), "--dtype", "fp32",
                 "--no-output-check"]) == 0
    got = load_transformer(tmp_path / "out.safetensors").state_dict()
    assert all(torch.equal(got[k], ema.shadow[k]) for k in ema.shadow)


def test_pieces_are_assembled_and_a_missing_piece_is_named(tmp_path):
    from dev2pro.flux.sharded_source import ShardedSource

    key = "transformer_blocks.0.attn.norm_k.weight"  # any Flux key: the folder is then a Flux key space
    w = torch.arange(12.0).reshape(4, 3)

    def piece(rank, rows, offset):
        save_file({f"model.{key}": w[rows]}, str(tmp_path / f"shard-{rank:05d}-model-00001-of-00001.safetensors"),
                  {"DCP_SHARDING_INFO": json.dumps({f"model.{key}": {"saved_offsets": [offset, 0]}})})

    piece(1, slice(0, 2), 0)
    piece(2, slice(2, 4), 2)
    src = ShardedSource(tmp_path)
    assert src.prefix == "model" and src.infos[key] == (torch.float32, (4, 3))
    assert torch.equal(src.read(key), w)
    piece(2, slice(3, 4), 3)  # rows 2 of 4 are in no file (a node's shard file was not copied)
    with pytest.raises(CheckpointError, match=f"'model.{key}' is incomplete \\(9 of 12 values.*copy every node"):
        ShardedSource(tmp_path).read(key)
