"""The toy world as a component provider for `dev2pro.flux.providers`: `toy:pro` / `toy:dev` model files, and the
`"toy"` autoencoder and text encoder, so recipes and commands use the toy world through the same references as real
Flux files with no toy-only branch in `flux`."""

from __future__ import annotations

from pathlib import Path


def model_path(name: str) -> Path:
    from dev2pro.toy import assets

    return Path(assets.model_path(name))


def autoencoder():
    from dev2pro.toy.world import ToyAutoencoder

    return ToyAutoencoder()


def text_encoder():
    from dev2pro.toy.world import ToyTextEncoder

    return ToyTextEncoder()
