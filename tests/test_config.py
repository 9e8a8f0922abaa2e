from dataclasses import dataclass, field
from typing import Literal

import pytest

from dev2pro.config import dump_toml, from_dict, load_config, parse_override
from dev2pro.errors import ConfigError


@dataclass(frozen=True)
class Train:
    steps: int = 10
    lr: float = 1e-4
    guidance: float = 1.0
    schedule: Literal["constant", "cosine"] = "constant"
    prompts: tuple[str, ...] = ()
    name: str | None = None


@dataclass(frozen=True)
class Cfg:
    train: Train = field(default_factory=Train)


def test_defaults_and_overrides_are_typed():
    cfg = from_dict(Cfg, {"train": {"steps": 5}}, ["train.lr=3e-4", "train.schedule=cosine", 'train.prompts=["a","b"]'])
    assert cfg.train.steps == 5 and cfg.train.lr == 3e-4 and cfg.train.schedule == "cosine"
    assert cfg.train.prompts == ("a", "b")
    assert from_dict(Cfg, {}, ["train.guidance=3"]).train.guidance == 3.0  # int accepted for float


@pytest.mark.parametrize(
    "data,overrides,needle",
    [
        ({"train": {"stesp": 5}}, [], "train.stesp: unknown key (did you mean 'steps'?)"),
        ({"trian": {}}, [], "trian: unknown key"),
        ({}, ["train.steps=ten"], "train.steps: expected an integer, got 'ten'"),
        ({}, ["train.steps=1.5"], "train.steps: expected an integer"),
        ({}, ["train.schedule=linear"], "expected one of 'constant', 'cosine'"),
        ({}, ["train.steps"], "not of the form section.key=value"),
    ],
)
def test_strict_errors_name_the_key(data, overrides, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, data, overrides)
    assert needle in str(e.value)


def test_file_roundtrip(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nsteps = 7\nprompts = ["x"]\n')
    cfg = load_config(Cfg, p, ["train.name=run"])
    q = tmp_path / "resolved.toml"
    q.write_text(dump_toml(cfg))
    assert load_config(Cfg, q) == cfg
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.toml")
    assert parse_override("a.b='s p'") == (["a", "b"], "s p")
