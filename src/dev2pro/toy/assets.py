"""Where the toy world's shipped files live: `src/dev2pro/assets/toy/` inside the installed package.

`model_path("pro")` / `model_path("dev")` are the toy transformers as BFL-layout safetensors (what
`dev2pro.flux.checkpoint.load_transformer("toy:NAME")` opens), `asset_path("judge.safetensors")` the judge's weights and
`asset_path("toy.json")` the description of what was built, how, and how well it scores. Rebuild them with
`dev2pro toy build`. Pitfall: a missing file raises a `CheckpointError` naming the command that makes it, rather than
a bare FileNotFoundError.
"""

from __future__ import annotations

import json
from pathlib import Path

from dev2pro.errors import CheckpointError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
MODELS = {"pro": "toy-pro.safetensors", "dev": "toy-dev.safetensors"}


def asset_path(name: str, must_exist: bool = True) -> Path:
    p = ASSET_DIR / name
    if must_exist and not p.exists():
        raise CheckpointError(f"toy asset {p} is missing: run `dev2pro toy build` (or reinstall the package)")
    return p


def model_path(name: str, must_exist: bool = True) -> Path:
    """Path of the shipped toy transformer `name` ('pro' or 'dev')."""
    if name not in MODELS:
        raise CheckpointError(f"unknown toy model 'toy:{name}' (known: {', '.join('toy:' + k for k in MODELS)})")
    return asset_path(MODELS[name], must_exist)


def description() -> dict:
    """Contents of toy.json (sizes, training settings, build time, judge scores); {} when not built."""
    p = asset_path("toy.json", must_exist=False)
    return json.loads(p.read_text()) if p.exists() else {}
