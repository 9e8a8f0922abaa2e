"""Block swap for LoRA training (`train.blocks_to_swap = N`): the frozen weights of N transformer blocks live in CPU
memory (pinned on CUDA) and each is copied to the GPU just before it runs, forward and backward, on a side CUDA
stream so the copy overlaps the compute of the blocks before it.

Which blocks (`swapped_indices`, shared with the memory estimate): blocks count in execution order, the 19 double
blocks then the 38 single blocks of FLUX.1; double blocks are swapped first (they are the larger, 2x a single
block), the last N of them, then the last single blocks. kohya's `--blocks_to_swap` counts the same blocks but in
double-block units (a single block counts half); dev2pro counts blocks.

Schedule (`activate`): when block i is about to run, the resident swapped blocks become {i (if swapped), the next
swapped block in the direction of the pass}: any other swapped block is evicted (its GPU copy dropped; the CPU copy
is kept, the weights are frozen so nothing is copied back), block i is made resident and waited for, and the next
one is prefetched. At most `MAX_RESIDENT_SWAPPED` = 2 swapped blocks are on the GPU at any time (the planner counts
the same). The forward pass activates blocks from a forward pre-hook on each block. For backward, a forward hook
wraps each block's outputs in an identity autograd function whose backward activates the block (direction -1):
autograd runs it once every gradient w.r.t. the block's outputs is ready, i.e. after the next block's backward has
finished and before any of this block's backward nodes run. With gradient checkpointing the block is re-run inside
its own backward (after that activation), so it is resident for the recompute too; the pre-hook sees that we are in
backward (`phase`) and does not move the window then. A forward pre-hook on the root model starts each pass.

What moves: only the block's frozen tensors (parameters without grad, buffers): base weights in any storage (bf16,
fp32, fp8 `Fp8Linear` weights and their scales). LoRA weights (trainable) stay on the GPU where the optimizer holds
them. Swapping is by `param.data = tensor`: autograd saves frozen leaf parameters by reference, so a weight needed by
the input gradient is read through the parameter at backward time, when its block is resident again.

Compared with kohya's `ModelOffloader` (sd-scripts `library/custom_offloading_utils.py`): kohya keeps
`n - N` blocks on the GPU and, after block i has run, exchanges its weights with block `n - N + i` (a GPU->CPU and a
CPU->GPU copy of a whole block, both ways, including frozen weights that never change) on a thread pool, with a
backward hook per block for the reverse order. Here frozen weights are copied one way only (half the PCIe traffic)
and the staging is 2 blocks instead of one exchange buffer. diffusers' group offloading (`apply_group_offloading`,
block_level, `use_stream=True`) also prefetches on a side stream, but it offloads every group (no resident set),
moves trainable LoRA parameters with the block (the optimizer then sees CPU tensors) and its hooks do not cover the
backward order with recompute; for training it is not the same job.

Devices are parameters: on the CPU both devices are "cpu" and a load is a real copy into a fresh tensor, so tests
can check the schedule (which block is resident when, by storage identity) and compare results bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from dev2pro.errors import ConfigError

MAX_RESIDENT_SWAPPED = 2  # the block that runs + the one being prefetched


def swapped_indices(n_double: int, n_single: int, n_swap: int) -> list[int]:
    """Execution-order indices (double blocks 0..D-1, then single blocks) of the blocks `blocks_to_swap` swaps."""
    n_d = min(n_swap, n_double)
    n_s = n_swap - n_d
    return list(range(n_double - n_d, n_double)) + list(range(n_double + n_single - n_s, n_double + n_single))


def execution_blocks(model: nn.Module) -> tuple[list[nn.Module], int]:
    """(blocks in the order they run, number of double blocks) of a diffusers `FluxTransformer2DModel`."""
    double, single = list(model.transformer_blocks), list(model.single_transformer_blocks)
    return double + single, len(double)


def _frozen_tensors(block: nn.Module) -> list[torch.Tensor]:
    params = [p for p in block.parameters() if not p.requires_grad]
    return params + [b for b in block.buffers() if b is not None]


class _ActivateInBackward(torch.autograd.Function):
    """Identity on a block's outputs; its backward makes the block resident before the block's own backward."""

    @staticmethod
    def forward(ctx, swap, index, *tensors):
        ctx.swap, ctx.index = swap, index
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.swap.phase = "backward"
        ctx.swap.activate(ctx.index, -1)
        return (None, None, *grads)


class BlockSwap:
    """Attach block swap to `model` (hooks) and place it: everything on `device` except the frozen tensors of the
    swapped blocks, which stay on `offload_device` (pinned when `device` is CUDA). `log` records the resident
    swapped blocks after every activation: (phase, block index, sorted resident indices)."""

    def __init__(self, model: nn.Module, blocks_to_swap: int, device, offload_device="cpu", record: bool = False):
        blocks, n_double = execution_blocks(model)
        if not 0 < blocks_to_swap < len(blocks):
            raise ConfigError(f"train.blocks_to_swap = {blocks_to_swap}: this model has {len(blocks)} blocks "
                              f"({n_double} double + {len(blocks) - n_double} single); choose 1..{len(blocks) - 1}")
        self.device, self.offload = torch.device(device), torch.device(offload_device)
        self.cuda = self.device.type == "cuda"
        self.swapped = swapped_indices(n_double, len(blocks) - n_double, blocks_to_swap)
        self.frozen = {i: _frozen_tensors(blocks[i]) for i in self.swapped}
        self.host: dict[int, list[torch.Tensor]] = {}
        self.resident: set[int] = set()
        self.events: dict[int, torch.cuda.Event] = {}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.phase, self.max_resident, self.record, self.log = "forward", 0, record, []
        self.loads = 0
        self._place(model)
        self.handles = [model.register_forward_pre_hook(self._start_pass)]
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self.handles.append(block.register_forward_hook(self._post_hook(i)))

    def _place(self, model: nn.Module) -> None:
        offloaded = {id(t) for ts in self.frozen.values() for t in ts}
        for i, ts in self.frozen.items():
            host = [t.data.to(self.offload) for t in ts]
            self.host[i] = [h.pin_memory() for h in host] if self.cuda else host
            for t, h in zip(ts, self.host[i]):
                t.data = h
        for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
            if id(t) not in offloaded:
                t.data = t.data.to(self.device)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    # ---- the schedule

    def next_swapped(self, i: int, direction: int) -> int | None:
        later = [j for j in self.swapped if (j > i if direction > 0 else j < i)]
        return (min(later) if direction > 0 else max(later)) if later else None

    def activate(self, i: int, direction: int) -> None:
        """Block i is about to run in a pass going `direction` (+1 forward, -1 backward): see the module docstring."""
        nxt = self.next_swapped(i, direction)
        keep = ({i} if i in self.frozen else set()) | ({nxt} if nxt is not None else set())
        for j in sorted(self.resident - keep):
            self._evict(j)
        if i in self.frozen:
            self._load(i)
            self._wait(i)
        if nxt is not None:
            self._load(nxt)
        self.max_resident = max(self.max_resident, len(self.resident))
        if self.record:
            self.log.append((self.phase, i, tuple(sorted(self.resident))))

    def is_resident(self, i: int) -> bool:
        return i not in self.frozen or i in self.resident

    def _load(self, i: int) -> None:
        if i in self.resident:
            return
        self.loads += 1
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = [torch.empty_like(h, device=self.device).copy_(h, non_blocking=True) for h in self.host[i]]
                self.events[i] = torch.cuda.Event()
                self.events[i].record(self.stream)
        else:
            copies = [h.to(self.device, copy=True) for h in self.host[i]]
        for t, c in zip(self.frozen[i], copies):
            t.data = c
        self.resident.add(i)

    def _wait(self, i: int) -> None:
        event = self.events.pop(i, None)
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in self.frozen[i]:  # allocated on the side stream, used on the compute stream
            t.data.record_stream(compute)

    def _evict(self, i: int) -> None:
        for t, h in zip(self.frozen[i], self.host[i]):
            t.data = h
        self.resident.discard(i)
        self.events.pop(i, None)

    # ---- hooks

    def _start_pass(self, module, args):
        self.phase = "forward"

    def _pre_hook(self, i: int):
        def hook(module, args):
            if self.phase == "backward":  # gradient-checkpointing recompute inside this block's backward
                if not self.is_resident(i):
                    self._load(i)
                    self._wait(i)
                return None
            self.activate(i, +1)
            return None

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if self.phase == "backward" or not torch.is_grad_enabled():
                return None
            outs = output if isinstance(output, tuple) else (output,)
            grad_idx = [k for k, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
            if not grad_idx:
                return None
            wrapped = _ActivateInBackward.apply(self, i, *(outs[k] for k in grad_idx))
            wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
            new = list(outs)
            for k, w in zip(grad_idx, wrapped):
                new[k] = w
            return tuple(new) if isinstance(output, tuple) else new[0]

        return hook
