"""Peak-memory model of one training step of Flux (LoRA or full fine-tune), from the architecture alone: `estimate(job)`
returns a byte-level breakdown (weights by dtype, trainable parameters, gradients, AdamW state, saved activations
with and without gradient checkpointing, block swap, text encoders / autoencoder when latents are not cached). The
planner (`dev2pro.train.plan_memory`) builds on it; tests/test_plan_memory.py and bench/lora_memory.py check it
against peaks measured on the CPU.

Weights. Base weights take `numel x bytes(dtype)`. On an fp8 base only the 2-D weights of the linears inside the
double/single blocks are fp8 (`dev2pro.flux.fp8.is_quantized_key`: 36 h^2 per double block, 15 h^2 per single block);
biases, norm scales, embedders and the final layer stay in the compute dtype (`fp8.py` explains why).
`Fp8Linear` dequantizes its weight in `forward` and calls `F.linear`, so autograd keeps the dequantized copy for the
input gradient whenever the input requires grad (every block after the first LoRA); `fp8_saves_dequantized_weight()`
checks this on a tiny layer and the estimate then adds those copies to the activations. With block swap, `swap` of
the `depth + depth_single_blocks` blocks live on the CPU (double blocks first) and at most two of them are on the
GPU at a time (the one running and the one being prefetched), the rule `dev2pro.train.block_swap` runs.

Trainable state (AdamW, `torch.optim.AdamW`: two moments in the parameter dtype). LoRA: `r (in + out)` fp32
parameters per wrapped linear, plus fp32 grads and two fp32 moments: 16 bytes per LoRA parameter. Full fine-tune:
parameters in the weight dtype, gradients the same, moments the same, divided by the number of shards (FSDP).
Peak of the step: max(end of forward + first backward block, optimizer step with all grads + one foreach temporary).

Activations (per token, per block; derived by listing the tensors autograd saves in diffusers'
`FluxTransformerBlock` / `FluxSingleTransformerBlock` with peft LoRA and a frozen base; checked with
`saved_tensors_hooks` in tests/test_plan_memory.py). `c` = compute bytes (2 under bf16 autocast, else the weight
dtype's), `h` hidden, `m = 4h` MLP width, `d` head dim, `r` rank. Each stream (image tokens, text tokens) of a double
block saves per token:

    LayerNorm-1 input h, SDPA q,k,v,out 4h, LayerNorm-2 input h, GELU input m     ->  c (10 h)   [= c (6h + m)]
    RMSNorm inputs q, k (computed in fp32)                                        ->  4 (2 h)
    LoRA inputs: plain compute 1 h (q/k/v share the modulated norm, to_out shares the SDPA output);
                 under autocast every LoRA-wrapped linear keeps its own bf16 cast: q,k,v,out 4 h  -> c k_in h
    all-linear targets add: LN-1 output, gated attn output, LN-2 output, ff.0 input, ff.2 input (m), ff output
                                                                                  ->  c (5 h + m) = 9 c h

A single block (joint sequence) saves per token: LN input h, GELU input m, SDPA 4h (c (5h + m)), RMSNorm 8h bytes,
LoRA inputs (plain 1 h, autocast 3 h for q,k,v); all-linear adds LN output h, proj_out input h + m, gated output h
(7 c h, autocast +1 c h for proj_mlp's cast). Once per step: RoPE cos/sin 2 d fp32 per token, the final norm ~2 c h
per image token, `r` per LoRA linear per token for the LoRA-A outputs. Attention is flash/memory-efficient SDPA (no
N^2 term; logsumexp 4 bytes per head per token). Full fine-tune saves what all-linear does plus the embedder inputs.

Gradient checkpointing (diffusers checkpoints each block): per block only its inputs (image + text hidden states,
c h per token), plus, during backward, one block's full activations recomputed.

Transient: the first backward block holds its gradients next to the saved activations; we count one block's
activations for it (two with checkpointing: recompute + grads), plus one dequantized weight for fp8 bases.

Encoders: with cached latents and text embeddings (dev2pro's trainers always cache) nothing; otherwise T5-XXL
(4.76 B), CLIP-L (123 M) and the autoencoder (84 M) in the compute dtype plus the autoencoder's encode activations
(~3 tensors of 128 channels at full resolution).

GPU totals add 0.75 GiB (CUDA context, cuBLAS workspace) and 5% allocator fragmentation before comparing with a card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dev2pro.errors import UserError
from dev2pro.flux.models import FluxSpec

GiB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
CUDA_OVERHEAD = int(0.75 * GiB)
FRAGMENTATION = 1.05

# Parameter counts of the components a trainer holds when latents/text are not cached (public model configs):
# T5 v1.1 XXL encoder, CLIP ViT-L/14 text model, FLUX.1 autoencoder.
ENCODER_PARAMS = {"t5": 4_762_310_656, "clip": 123_060_480, "autoencoder": 83_819_683}


@dataclass(frozen=True)
class Job:
    """One training job, the planner's input. Resolution is the image side in pixels (area = resolution^2)."""

    spec: FluxSpec
    method: Literal["lora", "full"] = "lora"
    weight_dtype: Literal["fp32", "bf16", "fp8"] = "bf16"
    autocast: bool = True  # bf16 autocast (compute bf16); False: compute in the weight dtype (fp32 for fp8)
    rank: int = 16
    targets: Literal["attention", "all-linear"] = "attention"
    batch_size: int = 1
    resolution: int = 1024
    text_len: int = 512
    gradient_checkpointing: bool = False
    blocks_to_swap: int = 0
    cached: bool = True  # latents and text embeddings cached: encoders not in memory
    shards: int = 1  # FSDP shards for full fine-tune state

    def validate(self) -> None:
        n = self.spec.depth + self.spec.depth_single_blocks
        if not 0 <= self.blocks_to_swap < n:
            raise UserError(f"blocks_to_swap must be in [0, {n - 1}], got {self.blocks_to_swap}")
        if self.resolution % 16:
            raise UserError(f"resolution must be a multiple of 16, got {self.resolution}")
        if self.rank < 1 or self.batch_size < 1 or self.shards < 1:
            raise UserError("rank, batch size and shards must be >= 1")

    @property
    def image_tokens(self) -> int:
        return (self.resolution // 16) ** 2

    @property
    def compute_bytes(self) -> int:
        if self.autocast:
            return 2
        return 4 if self.weight_dtype == "fp8" else BYTES[self.weight_dtype]


# ---------------------------------------------------------------------------------------------------------------------
# Architecture tables (diffusers module layout, (in, out) per linear as multiples of h and m)


def block_linears(spec: FluxSpec) -> dict[str, list[tuple[str, int, int]]]:
    """(name, in, out) of every linear in one double and one single block."""
    h, m = spec.hidden_size, spec.mlp_hidden
    attn = ["to_q", "to_k", "to_v"]
    double = [("norm1.linear", h, 6 * h), ("norm1_context.linear", h, 6 * h)]
    double += [(f"attn.{n}", h, h) for n in attn + ["add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                                                     "to_add_out"]]
    double += [(f"{ff}.net.0.proj", h, m) for ff in ("ff", "ff_context")] + [(f"{ff}.net.2", m, h)
                                                                             for ff in ("ff", "ff_context")]
    single = [("norm.linear", h, 3 * h)] + [(f"attn.{n}", h, h) for n in attn]
    single += [("proj_mlp", h, m), ("proj_out", h + m, h)]
    return {"double": double, "single": single}


ATTENTION_TARGETS = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                     "attn.to_out.0", "attn.to_add_out"}


def lora_linears(spec: FluxSpec, targets: str) -> dict[str, list[tuple[str, int, int]]]:
    lin = block_linears(spec)
    if targets == "all-linear":
        return lin
    return {k: [x for x in v if x[0] in ATTENTION_TARGETS] for k, v in lin.items()}


def lora_params(spec: FluxSpec, rank: int, targets: str) -> int:
    sel = lora_linears(spec, targets)
    per = {k: sum(rank * (i + o) for _, i, o in v) for k, v in sel.items()}
    return spec.depth * per["double"] + spec.depth_single_blocks * per["single"]


def quantized_params(spec: FluxSpec) -> int:
    """Parameters stored in fp8 on an fp8 base: the 2-D weights of block linears (36 h^2 + 15 h^2 per block pair)."""
    lin = block_linears(spec)
    per = {k: sum(i * o for _, i, o in v) for k, v in lin.items()}
    return spec.depth * per["double"] + spec.depth_single_blocks * per["single"]


def weights_saved_for_backward(spec: FluxSpec, job_targets: str, method: str) -> int:
    """Weight elements of block linears whose *input* requires grad, i.e. whose weight autograd keeps for the input
    gradient. The modulation linears (`norm*.linear`) take `temb`, which never requires grad here; with attention
    targets the first double block's q/k/v inputs do not either (no LoRA upstream)."""
    lin = block_linears(spec)
    per = {k: sum(i * o for n, i, o in v if not n.startswith("norm")) for k, v in lin.items()}
    n = spec.depth * per["double"] + spec.depth_single_blocks * per["single"]
    if method == "lora" and job_targets == "attention" and spec.depth:
        n -= sum(i * o for name, i, o in lin["double"] if name.split(".")[-1] in
                 ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))
    return n


def block_params(spec: FluxSpec) -> dict[str, int]:
    """All parameters of one double / one single block (weights, biases, norm scales)."""
    h, d = spec.hidden_size, spec.head_dim
    lin = block_linears(spec)
    dbl = sum(i * o + o for _, i, o in lin["double"]) + 4 * d
    sgl = sum(i * o + o for _, i, o in lin["single"]) + 2 * d
    assert h  # keep h referenced for readers comparing with FluxSpec.num_params
    return {"double": dbl, "single": sgl}


# ---------------------------------------------------------------------------------------------------------------------
# Activations


def activation_bytes_per_token(job: Job) -> dict[str, float]:
    """Saved bytes per token for one double block (per token of either stream) and one single block (joint
    sequence), from the table in the module docstring. Full fine-tune counts like all-linear."""
    h, m, c = job.spec.hidden_size, job.spec.mlp_hidden, job.compute_bytes
    all_linear = job.method == "full" or job.targets == "all-linear"
    heads = job.spec.num_heads
    double = c * (6 * h + m) + 4 * 2 * h + 4 * heads
    single = c * (5 * h + m) + 4 * 2 * h + 4 * heads
    if job.autocast:
        double += c * 4 * h
        single += c * (3 + (1 if all_linear else 0)) * h
    else:
        double += c * h
        single += c * h
    if all_linear:
        double += c * (5 * h + m)
        single += c * (2 * h + (h + m))
    if job.method == "lora":
        n = lora_linears(job.spec, job.targets)
        double += c * job.rank * len(n["double"]) / 2  # each stream holds half of the double block's linears
        single += c * job.rank * len(n["single"])
    return {"double": double, "single": single}


def fp8_saves_dequantized_weight() -> bool:
    """Does `dev2pro.flux.fp8.Fp8Linear` leave a dequantized weight copy in the autograd graph? (tiny-layer probe)"""
    import torch

    try:
        from dev2pro.flux.fp8 import Fp8Linear
    except ImportError:
        return False
    lin = Fp8Linear.from_linear(torch.nn.Linear(32, 48), "tensor")
    x = torch.randn(2, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x)
    return any(t.numel() == 48 * 32 and t.dtype != torch.float8_e4m3fn for t in saved)


@dataclass(frozen=True)
class Breakdown:
    """Peak-memory breakdown in bytes. `peak` is the step's peak; `gpu_total` adds CUDA context and fragmentation."""

    weights: int
    trainable: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    encoders: int
    peak: int
    gpu_total: int
    notes: tuple[str, ...] = ()

    def rows(self) -> list[tuple[str, int]]:
        return [("base weights", self.weights), ("trainable params", self.trainable), ("gradients", self.grads),
                ("AdamW state", self.optimizer), ("activations", self.activations),
                ("backward transient", self.transient), ("encoders (uncached)", self.encoders),
                ("peak (tensors)", self.peak), ("GPU total (+context, +5%)", self.gpu_total)]


def estimate(job: Job, fp8_weight_copies: bool | None = None) -> Breakdown:
    """Peak memory of one training step of `job` (see the module docstring for every term)."""
    job.validate()
    spec, c = job.spec, job.compute_bytes
    notes = []
    nblocks = spec.depth + spec.depth_single_blocks
    bp = block_params(spec)
    total = spec.num_params()
    # Base weights, by dtype.
    if job.weight_dtype == "fp8":
        q = quantized_params(spec)
        hp_bytes = 2 if job.autocast else 4
        weights_of = lambda n_q, n_other: n_q + n_other * hp_bytes  # noqa: E731
        block_bytes = {k: weights_of(sum(i * o for _, i, o in block_linears(spec)[k]),
                                     bp[k] - sum(i * o for _, i, o in block_linears(spec)[k])) for k in bp}
        weights = weights_of(q, total - q)
    else:
        wb = BYTES[job.weight_dtype]
        block_bytes = {k: v * wb for k, v in bp.items()}
        weights = total * wb
    if job.blocks_to_swap:
        # The trainer's rule (dev2pro.train.block_swap): double blocks first, at most 2 swapped blocks resident.
        from dev2pro.train.block_swap import MAX_RESIDENT_SWAPPED, swapped_indices

        sizes = sorted((block_bytes["double"] if i < spec.depth else block_bytes["single"]
                        for i in swapped_indices(spec.depth, spec.depth_single_blocks, job.blocks_to_swap)),
                       reverse=True)
        stage = sum(sizes[:MAX_RESIDENT_SWAPPED])
        weights = weights - sum(sizes) + stage
        notes.append(f"block swap: {job.blocks_to_swap} of {nblocks} blocks on the CPU, up to "
                     f"{min(MAX_RESIDENT_SWAPPED, len(sizes))} of them on the GPU at a time")
    # Trainable state.
    if job.method == "lora":
        n_train = lora_params(spec, job.rank, job.targets)
        trainable = grads = 4 * n_train
        optimizer = 8 * n_train
        opt_temp = 4 * n_train
    else:
        wb = 4 if job.weight_dtype == "fp32" else 2
        if job.weight_dtype == "fp8":
            raise UserError("full fine-tuning needs bf16 or fp32 weights (fp8 weights are frozen storage)")
        trainable = 0  # the weights are the trainable parameters, already counted
        grads = total * wb // job.shards
        optimizer = 2 * total * wb // job.shards
        opt_temp = total * wb // job.shards
        if job.shards > 1:
            weights = weights // job.shards + max(block_bytes.values())  # one gathered block at a time
    # Activations.
    b = job.batch_size
    n_img, n_txt = job.image_tokens, job.text_len
    n_all = n_img + n_txt
    per_tok = activation_bytes_per_token(job)
    full_blocks = b * (spec.depth * per_tok["double"] * n_all + spec.depth_single_blocks * per_tok["single"] * n_all)
    one_block = b * n_all * max(per_tok["double"], per_tok["single"])
    glob = b * (n_all * 2 * spec.head_dim * 4 + n_img * 2 * c * spec.hidden_size + n_img * spec.in_channels * 4 * 4)
    if job.method == "full":
        glob += b * n_txt * spec.context_in_dim * c
    fp8_copies = 0
    if job.weight_dtype == "fp8":
        if fp8_weight_copies is None:
            fp8_weight_copies = fp8_saves_dequantized_weight()
        if fp8_weight_copies:
            fp8_copies = weights_saved_for_backward(spec, job.targets, job.method) * c
            notes.append("fp8 base: Fp8Linear keeps a dequantized weight copy per linear for backward "
                         f"(+{fp8_copies / GiB:.2f} GiB); a custom autograd function would avoid it")
    if job.gradient_checkpointing:
        activations = b * nblocks * n_all * spec.hidden_size * c + glob
        transient = 2 * one_block
        if fp8_copies:  # only the recomputed block's copies are alive
            fp8_copies = fp8_copies // nblocks
    else:
        activations = full_blocks + glob
        transient = one_block
    activations += fp8_copies
    if job.autocast and job.weight_dtype == "fp32":
        # autocast casts frozen fp32 weights to bf16 at every call and does not cache them (only leaves that require
        # grad are cached): each block linear's bf16 copy is saved for the input gradient.
        copies = weights_saved_for_backward(spec, job.targets, job.method) * 2
        activations += copies // nblocks if job.gradient_checkpointing else copies
        notes.append("fp32 weights under bf16 autocast: bf16 weight copies are kept for backward")
    if job.weight_dtype == "fp8" and not fp8_weight_copies:
        # backward dequantizes again, next to the saved activations (dequantize goes through fp32, then casts)
        largest = max(i * o for v in block_linears(spec).values() for _, i, o in v)
        transient += largest * (4 + c)
    # Encoders.
    encoders = 0
    if not job.cached:
        encoders = sum(ENCODER_PARAMS.values()) * 2 + 3 * 128 * job.resolution**2 * 2 * b
        notes.append("latents/text not cached: T5-XXL, CLIP-L and the autoencoder stay resident")
    # Gradients are set to None after each step, so the forward peak holds no gradients (they grow during backward
    # while the activations are freed; the optimizer peak covers the end state).
    fwd_peak = weights + trainable + optimizer + activations + transient
    opt_peak = weights + trainable + grads + optimizer + opt_temp
    peak = max(fwd_peak, opt_peak) + encoders
    gpu_total = int(peak * FRAGMENTATION) + CUDA_OVERHEAD
    return Breakdown(weights, trainable, grads, optimizer, int(activations), int(transient), encoders, int(peak),
                     gpu_total, tuple(notes))
