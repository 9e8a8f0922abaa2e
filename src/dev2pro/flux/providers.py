"""Named stand-in components: how `toy:pro`, `model.autoencoder = "toy"` and `model.t5 = "toy"` resolve without the
`flux` layer importing the toy world.

A provider is a module, named here by its import path, that offers any of `model_path(name) -> Path`,
`autoencoder() -> Autoencoder` and `text_encoder() -> TextEncoder`. `flux` resolves a reference `NAME` or `NAME:arg`
through this table and imports the provider only when such a reference is used, so checkpoint I/O and the component
loaders have no dependency on any provider. The toy world (`dev2pro.toy.provider`) is the one built in;
`register_provider` adds others (a test double, a user's own stand-ins).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from dev2pro.errors import UserError

PROVIDERS: dict[str, str | ModuleType] = {"toy": "dev2pro.toy.provider"}


def register_provider(name: str, provider: str | ModuleType) -> None:
    """Make references `name` and `name:ARG` resolve through `provider` (a module or its import path)."""
    PROVIDERS[name] = provider


def provider(name: str) -> ModuleType | None:
    """The provider module registered as `name`, imported on first use; None when no provider has that name."""
    p = PROVIDERS.get(name)
    if p is None:
        return None
    if isinstance(p, str):
        p = PROVIDERS[name] = importlib.import_module(p)
    return p


def _need(name: str, what: str):
    p = provider(name)
    fn = getattr(p, what, None) if p is not None else None
    if fn is None:
        raise UserError(f"'{name}' provides no {what.replace('_', ' ')} (providers: {', '.join(PROVIDERS)})")
    return fn


def model_file(ref) -> Path | None:
    """`NAME:ARG` with a registered provider NAME -> the provider's model file for ARG; None for anything else."""
    if not isinstance(ref, str) or ":" not in ref:
        return None
    name, _, arg = ref.partition(":")
    if name not in PROVIDERS:
        return None
    return Path(_need(name, "model_path")(arg))


def autoencoder(ref: str):
    """The provider's autoencoder when `ref` names a provider, else None."""
    return _need(ref, "autoencoder")() if ref in PROVIDERS else None


def text_encoder(ref: str):
    """The provider's text encoder (T5 and CLIP in one) when `ref` names a provider, else None."""
    return _need(ref, "text_encoder")() if ref in PROVIDERS else None
