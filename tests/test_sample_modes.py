"""Training samples fit the base when [sample] leaves guidance and CFG unset: dev-style (embedded 3.5, one pass) on a
guidance-distilled base, true CFG on a de-distilled one (marked in its file by `dev2pro dedistill`, or by
`model.kind`) and on a base without a guidance embedding."""

from __future__ import annotations

import pytest

from dev2pro.flux import sampling
from dev2pro.flux.checkpoint import load_transformer, save_transformer
from dev2pro.train.config import ModelConfig, SampleConfig, TrainConfig
from helpers import toy_data


@pytest.mark.parametrize("preset, kind, guidance, cfg, expected", [
    ("tiny-dev", None, None, None, (3.5, 1.0)),          # dev: embedded 3.5, one pass
    ("tiny-dev", "dedistilled", None, None, (1.0, 3.5)),  # dev2pro: true CFG, guidance input 1.0
    ("tiny-pro", None, None, None, (None, 3.5)),          # no guidance embedding: true CFG
    ("tiny-pro", "distilled", None, None, (None, 1.0)),   # schnell-like: named distilled, no CFG
    ("tiny-dev", "dedistilled", 2.0, None, (2.0, 3.5)),   # guidance always feeds the embedding
    ("tiny-dev", "dedistilled", None, 1.0, (3.5, 1.0)),   # an explicit cfg wins over the kind
])
def test_sample_mode(preset, kind, guidance, cfg, expected):
    model = load_transformer(f"preset:{preset}")
    assert sampling.sample_mode(model, guidance, cfg, kind) == expected


def test_dedistilled_marker_round_trips_through_files(tmp_path):
    from dev2pro.flux.convert import convert_checkpoint

    model = load_transformer("preset:tiny-dev")
    plain = save_transformer(model, tmp_path / "dev.safetensors")
    marked = save_transformer(model, tmp_path / "dev2pro.safetensors",
                              metadata={sampling.BASE_KIND_KEY: "dedistilled"})
    assert ModelConfig(base=str(plain)).base_kind() is None
    assert ModelConfig(base=str(marked)).base_kind() == "dedistilled"
    assert ModelConfig(base=str(marked), kind="distilled").base_kind() == "distilled"
    convert_checkpoint(marked, tmp_path / "dev2pro-fp8.safetensors", dtype="fp8_e4m3fn")  # `dev2pro convert` keeps it
    assert sampling.base_kind_of(tmp_path / "dev2pro-fp8.safetensors") == "dedistilled"


def test_write_samples_uses_the_mode_of_the_base(tmp_path):
    from dev2pro.toy.world import ToyAutoencoder
    from dev2pro.train.data_loading import write_samples
    from dev2pro.train.distributed import setup_accelerator

    model = load_transformer("preset:tiny-dev@0")
    prompts = ["a red circle", "a blue square"]
    acc = setup_accelerator(TrainConfig(steps=1, device="cpu"))
    sample = SampleConfig(every=1, prompts=tuple(prompts), seeds=(0,), steps=2, width=32, height=32)
    grids = {}
    for kind in (None, "dedistilled"):
        data = toy_data(2, prompts=prompts)
        data.autoencoder, data.info["base_kind"] = ToyAutoencoder(), kind
        path = write_samples(acc, model, data, sample, tmp_path / str(kind), 1)
        grids[kind] = path.read_bytes()
        mode = dict(guidance=3.5, cfg=1.0) if kind is None else dict(guidance=1.0, cfg=3.5)
        ref = sampling.generate(model, data.autoencoder, data.prompts, prompts, height=32, width=32, steps=2,
                                seeds=[0], progress=False, **mode)
        sampling.save_grid(ref, tmp_path / f"ref-{kind}.png", ncols=1)
        assert grids[kind] == (tmp_path / f"ref-{kind}.png").read_bytes()
    assert grids[None] != grids["dedistilled"]
