"""Regional compilation for training (`train.compile = true`): each `FluxTransformerBlock` and
`FluxSingleTransformerBlock` gets a `torch.compile`d `forward`; the 19 + 38 blocks of FLUX.1 share two compiled
graphs (one per block class), as diffusers' `ModelMixin.compile_repeated_blocks` does.

Why not `model.compile_repeated_blocks()` itself: it calls `block.compile()`, which compiles the module's whole
`__call__`, hooks included. Block swap's hooks (`dev2pro.train.block_swap`) move tensors between devices, switch
CUDA streams and touch Python state: dynamo would break the graph there or guard on them. Compiling `forward` only
keeps every hook eager around a compiled body. peft's LoRA layers and `Fp8Linear` (a custom autograd function) are
inside the compiled body; gradient checkpointing calls the block through `__call__`, so the recompute in backward
runs the same compiled forward. With `torch._dynamo.config.inline_inbuilt_nn_modules` (on by default since torch
2.5) parameters are graph inputs, guarded on shape/dtype/device but not on identity or storage: all blocks of one
class reuse one graph, and block swap can replace a weight's storage between calls without a recompile.

Aspect-ratio buckets change the number of image tokens, i.e. the sequence dimension. A forward pre-hook marks dim 1
of the hidden states (and dim 0 of the rotary embedding) dynamic (`torch._dynamo.maybe_mark_dynamic`) before the
first call, so each block class compiles once with a symbolic sequence length instead of once per bucket (automatic
dynamic shapes would compile a static graph first and a dynamic one on the second shape). Measured in
tests/test_compile_blocks.py with `torch._dynamo.utils.counters` over three bucket shapes. Batch and width stay
static (they do not change within a run).
"""

from __future__ import annotations

import torch
from torch import nn

REPEATED_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def _mark_sequence_dynamic(module, args, kwargs):
    from torch._dynamo import maybe_mark_dynamic

    for name, value in list(zip(("hidden_states", "encoder_hidden_states"), args)) + list(kwargs.items()):
        if name in ("hidden_states", "encoder_hidden_states") and isinstance(value, torch.Tensor) and value.ndim == 3:
            maybe_mark_dynamic(value, 1)
    rope = kwargs.get("image_rotary_emb", args[3] if len(args) > 3 else None)
    for t in rope if isinstance(rope, tuple) else ():
        maybe_mark_dynamic(t, 0)
    return None


def compile_blocks(model: nn.Module, backend: str = "inductor", **kwargs) -> int:
    """Compile the `forward` of every repeated block of `model` (in place); returns how many. `kwargs` go to
    `torch.compile` (e.g. `mode="max-autotune-no-cudagraphs"`); tests pass a cheaper `backend`."""
    n = 0
    for block in model.modules():
        if type(block).__name__ in REPEATED_BLOCKS:
            block.forward = torch.compile(type(block).forward.__get__(block), backend=backend, **kwargs)
            block.register_forward_pre_hook(_mark_sequence_dynamic, with_kwargs=True)
            n += 1
    return n
