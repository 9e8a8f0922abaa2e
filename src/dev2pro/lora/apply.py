"""LoRA files applied to a model for inference: `FILE[:strength]` command-line arguments, and merging each file into
the model's weights at its strength (what `dev2pro sample` and `dev2pro lora merge` do before sampling or saving).

Why here and not in the sampler: the sampler (`dev2pro.flux.sampling`) is part of the `flux` layer, which knows
nothing of LoRA; callers merge first, then sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dev2pro.errors import UserError
from dev2pro.lora.files import load_lora
from dev2pro.lora.inject import merge_lora_into_model


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`FILE[:strength]` -> (FILE, strength); strength 1.0 by default. Only a trailing `:number` is a strength, so
    paths with colons (C:\\...) keep working."""
    path, sep, tail = arg.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return arg, 1.0


def apply_loras(model, loras: Sequence[tuple[str, float]]):
    """Merge each (LoRA file, strength) into `model` in place (any format the LoRA loader reads); returns `model`."""
    if not loras:
        return model
    for path, strength in loras:
        if not Path(path).is_file():
            head, sep, tail = path.rpartition(":")
            hint = (f" (if '{tail}' was meant as the strength, it must be a number: {head}:0.8)"
                    if sep and Path(head).is_file() else "")
            raise UserError(f"LoRA file '{path}' not found{hint}")
        merge_lora_into_model(model, load_lora(path), strength)
    return model
