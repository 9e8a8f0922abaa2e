"""The value check every input file passes at load time: a tensor holding NaN, +-Inf or an absurd magnitude is an error
naming the file and the tensor, before any model computes with it.

Why: a half-written download, a bad merge or an fp16 overflow in someone's conversion gives weights that load
without complaint and then produce black images or a NaN loss an hour later. One `aminmax` per floating tensor (one
pass, no temporary of the tensor's size) catches all three cases: NaN makes the comparison fail, Inf and |x| >
`ABSURD` exceed the bound. fp8 tensors are checked on their bit patterns (e4m3fn has no Inf; NaN is 0x7f/0xff;
e5m2 has Inf and NaN where all five exponent bits are set); their scales are ordinary fp32 tensors.

`ABSURD` = 1e4: trained weights of Flux, T5-XXL, CLIP and the autoencoder stay orders of magnitude below it (the
largest are norm scales and embeddings, tens at most), and fp16 cannot hold more than 65504, so anything beyond is a
broken file. Integer tensors (position ids) are not checked.

Callers: `dev2pro.flux.checkpoint` (transformers), `dev2pro.flux.autoencoder`, `dev2pro.flux.encoder_files` and
`dev2pro.flux.text_encoders` (text encoders), `dev2pro.lora.files.load_lora` (LoRAs and adapters).
"""

from __future__ import annotations

import torch

from dev2pro.errors import CheckpointError

ABSURD = 1e4


def bad_value(t: torch.Tensor) -> str | None:
    """A short description of what is wrong with `t` ('NaN', 'Inf', 'max |x| = 3e+05'), or None when it is fine."""
    if t.numel() == 0 or not (t.is_floating_point()):
        return None
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        # Special values sit at the top of the magnitude bits: as int8 the positive ones are the largest values,
        # as uint8 the negative ones are. Two max passes (~4 GB/s), no temporary tensor.
        pos, neg = int(t.view(torch.int8).max()), int(t.view(torch.uint8).max()) - 128
        top = max(pos, neg)  # largest magnitude pattern, 0..127
        if t.dtype == torch.float8_e4m3fn:
            return "NaN" if top == 0x7F else None  # e4m3fn: no Inf, NaN = S.1111.111
        return None if top < 0x7C else ("Inf" if top == 0x7C else "NaN")  # e5m2: exponent 11111
    lo, hi = torch.aminmax(t.detach())
    lo, hi = float(lo), float(hi)
    if lo >= -ABSURD and hi <= ABSURD:
        return None
    if lo != lo or hi != hi:
        return "NaN"
    if abs(lo) == float("inf") or abs(hi) == float("inf"):
        return "Inf"
    return f"max |x| = {max(abs(lo), abs(hi)):.3g} (> {ABSURD:g})"


def check_tensor(t: torch.Tensor, file, key: str) -> torch.Tensor:
    """`t` unchanged, or CheckpointError naming `file` and tensor `key` if it holds NaN, Inf or absurd values."""
    why = bad_value(t)
    if why is not None:
        raise CheckpointError(f"{file}: tensor '{key}' holds {why}: the file is corrupt or was converted wrongly "
                              "(download or convert it again)")
    return t


def check_module(module: torch.nn.Module, file) -> None:
    """`check_tensor` over every parameter and buffer of a module loaded by a third-party `from_pretrained`."""
    for key, t in list(module.state_dict().items()):
        if t.device.type != "meta":
            check_tensor(t, file, key)
