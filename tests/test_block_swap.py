"""Block swap (`dev2pro.train.block_swap`) on the CPU: the compute and offload devices are both the CPU, a load is a
real copy into a fresh tensor, so "resident" is checked by storage identity (a swapped block's base weight must not
be the CPU master copy whenever a linear of it runs, forward, recompute and backward), the schedule is asserted
(which blocks are resident at each activation, never more than 2), and loss and LoRA gradients equal the run without
swap bit for bit, for bf16/fp32/fp8 bases, with and without gradient checkpointing, LoRA on the swapped blocks."""

import pytest
import torch

from dev2pro.errors import ConfigError
from dev2pro.flux import fp8, output_check
from dev2pro.flux.models import FluxSpec, predict, random_transformer
from dev2pro.lora.inject import add_lora, lora_parameters
from dev2pro.train.block_swap import MAX_RESIDENT_SWAPPED, BlockSwap, execution_blocks, swapped_indices

SPEC = FluxSpec(hidden_size=32, num_heads=2, depth=3, depth_single_blocks=4, context_in_dim=16, vec_in_dim=8,
                axes_dim=(4, 6, 6))


def _model(base: str, ckpt: bool):
    dtype = torch.bfloat16 if base == "bf16" else torch.float32
    model = random_transformer(SPEC, 0, dtype=dtype)
    if base == "fp8":
        fp8.swap_linears_to_fp8(model, "channel")
    add_lora(model, 4, 4, "all-linear", seed=0)
    for k, p in enumerate(lora_parameters(model)):  # B != 0 so the LoRA path changes the output and the gradients
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(k))
    if ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    return model


def _checks(model, swap, violations):
    """Record every time a linear of a swapped block computes (forward or backward) with its CPU master weight."""
    blocks, _ = execution_blocks(model)
    for i in swap.swapped:
        host = {h.data_ptr() for h in swap.host[i]}
        for m in blocks[i].modules():
            if type(m).__name__ in ("Linear", "Fp8Linear"):
                def check(where, i=i, m=m, host=host):
                    if m.weight.data_ptr() in host or not swap.is_resident(i):
                        violations.append((where, i))

                def pre(mod, args, check=check):
                    check("forward")

                def post(mod, args, out, check=check):
                    if out.requires_grad:
                        out.register_hook(lambda g, check=check: check("backward"))

                m.register_forward_pre_hook(pre)
                m.register_forward_hook(post)


def _step(model):
    i = output_check.fixed_inputs(SPEC)
    dtype = next(p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float32))
    cast = (lambda t: t.to(dtype)) if dtype == torch.bfloat16 else (lambda t: t)
    v = predict(model, cast(i["x"]), i["t"], cast(i["txt"]), cast(i["pooled"]), i["img_ids"], i["txt_ids"],
                i["guidance"])
    loss = v.float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("base,ckpt", [("fp32", False), ("bf16", True), ("fp8", True)])
def test_swap_gives_the_same_loss_and_lora_grads_and_keeps_the_schedule(base, ckpt):
    ref_loss, ref_grads = _step(_model(base, ckpt))
    model = _model(base, ckpt)
    swap = BlockSwap(model, 4, "cpu", record=True)  # of 3 double + 4 single blocks
    assert swap.swapped == [0, 1, 2, 6]  # all 3 double blocks first, then the last single block
    violations = []
    _checks(model, swap, violations)
    for _ in range(2):  # two steps: the second starts from the state the first one left
        swap.log.clear()
        loss, grads = _step(model)
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
        for p in lora_parameters(model):
            p.grad = None
        assert not violations, violations[:5]
        assert swap.max_resident == MAX_RESIDENT_SWAPPED
        # forward activates blocks 0..6 in order, backward 6..0; resident = {block if swapped, next swapped}
        fwd = [(i, r) for ph, i, r in swap.log if ph == "forward"]
        bwd = [(i, r) for ph, i, r in swap.log if ph == "backward"]
        assert fwd == [(0, (0, 1)), (1, (1, 2)), (2, (2, 6)), (3, (6,)), (4, (6,)), (5, (6,)), (6, (6,))]
        assert bwd == [(6, (2, 6)), (5, (2,)), (4, (2,)), (3, (2,)), (2, (1, 2)), (1, (0, 1)), (0, (0,))]


def test_no_grad_passes_and_errors():
    model = _model("fp32", False)
    with torch.no_grad():
        i = output_check.fixed_inputs(SPEC)
        ref = predict(model, i["x"], i["t"], i["txt"], i["pooled"], i["img_ids"], i["txt_ids"], i["guidance"])
        swap = BlockSwap(model, 2, "cpu", record=True)
        for _ in range(2):  # sampling: forward passes only, the window moves forward each time
            out = predict(model, i["x"], i["t"], i["txt"], i["pooled"], i["img_ids"], i["txt_ids"], i["guidance"])
            assert torch.equal(out, ref)
    assert swap.swapped == [1, 2] and swap.max_resident == 2
    assert [(i, r) for _, i, r in swap.log[:7]] == [(0, (1,)), (1, (1, 2)), (2, (2,)), (3, ()), (4, ()), (5, ()),
                                                  (6, ())]
    assert swapped_indices(19, 38, 25) == list(range(19)) + list(range(19 + 38 - 6, 57))
    with pytest.raises(ConfigError, match="choose 1..6"):
        BlockSwap(_model("fp32", False), 7, "cpu")
