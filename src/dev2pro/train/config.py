"""Config sections shared by the recipes, one TOML table each (`[model]`, `[train]`, `[lora]`, `[output]`, `[sample]`,
`[monitor]`, `[ema]`, `[distributed]`): frozen dataclasses that `dev2pro.config.load_config` fills strictly (an
unknown key is an error) and whose `validate` methods check the values that types cannot. A recipe's own config
dataclass is a set of these sections plus its method-specific ones (e.g. `distill.DistillSection`).

Pitfall: `model.dtype` is only the storage of the frozen weights; the compute dtype is decided in one place,
`train.mixed_precision` (full fine-tunes refuse anything but fp32 master weights, see
`dev2pro.train.distributed.require_fp32_weights`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dev2pro.errors import ConfigError

# diffusers.optimization.get_scheduler names offered as `train.scheduler` (warmup = train.warmup_steps)
DIFFUSERS_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass(frozen=True)
class ModelConfig:
    """`[model]`: what to train and the encoders used to build the caches.

    `path`: one FLUX.1 folder (HF snapshot layout), full ComfyUI checkpoint or hub id that fills every part left
    unset (`dev2pro.flux.model_folder.fill_from_path`); a single key overrides one part. `base`: anything
    `dev2pro.flux.checkpoint.load_transformer` accepts (BFL/ComfyUI file, diffusers folder, fp8 file, hub id,
    `preset:NAME[@seed]`). `t5`, `clip`, `autoencoder`: single files (ComfyUI/kohya `t5xxl_fp16.safetensors`,
    `clip_l.safetensors`, `ae.safetensors`), folders, hub ids or "toy" (only when named: an unset encoder is an
    error when one is needed). `tokenizers`: a folder with `tokenizer/` + `tokenizer_2/` for single encoder files.
    `adapter`: a LoRA merged into the base for training only (train-lora). `dtype`: storage of the frozen weights
    ("auto" = as in the file, "fp8" = block linears quantized on load, see `load_model`); the compute dtype is
    decided in one place, `train.mixed_precision`. `kind`: how sample images are made when `[sample]` leaves `cfg`
    unset (`dev2pro.flux.sampling.sample_mode`): "distilled" (dev: embedded guidance), "dedistilled" (true CFG), or
    "auto" (the base file's `dev2pro.base_kind` marker, else dev-style for a base with a guidance embedding).
    """

    base: str | None = None
    path: str | None = None
    t5: str | None = None
    clip: str | None = None
    autoencoder: str | None = None
    tokenizers: str | None = None
    adapter: str | None = None
    adapter_strength: float = 1.0
    dtype: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    kind: Literal["auto", "distilled", "dedistilled"] = "auto"
    t5_max_length: int = 512  # T5 tokens per caption: 512 as dev was trained (schnell: 256); part of the cache key

    def base_kind(self) -> str | None:
        """`kind`, or for "auto" the `dev2pro.base_kind` the base file carries (None: decided from the model)."""
        from dev2pro.flux.sampling import base_kind_of

        return self.kind if self.kind != "auto" else base_kind_of(self.base) if self.base else None

    def __post_init__(self):
        if self.path:
            from dev2pro.flux.model_folder import fill_from_path

            parts = fill_from_path(self.path, base=self.base, t5=self.t5, clip=self.clip,
                                   autoencoder=self.autoencoder, tokenizers=self.tokenizers)
            for k, v in vars(parts).items():
                object.__setattr__(self, k, v)

    def validate(self) -> None:
        if not self.base:
            raise ConfigError("model.base is unset: set model.base (a Flux file or folder) or model.path (a FLUX.1 "
                              "folder such as /models/FLUX.1-dev)")
        if not 1 <= self.t5_max_length <= 512:
            raise ConfigError(f"model.t5_max_length = {self.t5_max_length}: must be in 1..512 (512 for dev)")

    def encoders(self) -> tuple[str, str, str]:
        """(t5, clip, autoencoder), or ConfigError naming the first unset key: nothing falls back to the toy world."""
        for key in ("t5", "clip", "autoencoder"):
            if not getattr(self, key):
                raise ConfigError(
                    f"model.{key} is unset: set it ({_ENCODER_HINT[key]}; \"toy\" for the toy world) or set "
                    f"model.path to a FLUX.1 folder holding all parts (e.g. /models/FLUX.1-dev)")
        return self.t5, self.clip, self.autoencoder

    def preflight(self) -> dict:
        """Check the base, every encoder and the tokenizers from headers only, before any caching
        (`dev2pro.flux.model_folder.preflight`)."""
        from dev2pro.flux.model_folder import Parts, preflight

        t5, clip, ae = self.encoders()
        return preflight(Parts(self.base, t5, clip, ae, self.tokenizers), model_path=self.path)


_ENCODER_HINT = {"t5": "a T5-XXL file such as t5xxl_fp16.safetensors, a folder or a hub id",
                 "clip": "a CLIP-L file such as clip_l.safetensors, a folder or a hub id",
                 "autoencoder": "the FLUX.1 ae.safetensors, a vae folder or a hub id"}


@dataclass(frozen=True)
class TrainConfig:
    """`[train]`: the optimisation. `batch_size` is per process; the global batch is batch_size x processes."""

    steps: int
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = "adamw"
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the optimizer
    scheduler: Literal["builtin", *DIFFUSERS_SCHEDULERS] = "builtin"  # builtin = lr_schedule; else diffusers'
    lr_cycles: int = 1  # scheduler = "cosine_with_restarts": number of restarts
    lr_power: float = 1.0  # scheduler = "polynomial": power of the decay
    max_grad_norm: float = 1.0
    timestep_sampling: Literal["uniform", "logit_normal", "shift", "flux_shift"] = "logit_normal"
    logit_mean: float = 0.0
    logit_scale: float = 1.0
    shift: float = 3.1582
    guidance_loss: float = 0.0  # train-lora on dev: s > 1 trains toward v_u + s (v - v_u) at g = s
    loss_weighting: Literal["none", "cosmap"] = "none"
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, got {list(self.betas)}")
        if self.optimizer == "prodigy" and self.lr < 0.1:
            raise ConfigError(f"train.lr = {self.lr} with train.optimizer = 'prodigy': Prodigy estimates the step "
                              "size itself and train.lr multiplies it; set train.lr = 1.0")
        if self.lr_cycles < 1 or self.lr_power <= 0:
            raise ConfigError(f"train.lr_cycles must be >= 1 and train.lr_power > 0, got {self.lr_cycles}, "
                              f"{self.lr_power}")

        if self.guidance_loss != 0.0 and self.guidance_loss <= 1.0:
            raise ConfigError(f"train.guidance_loss must be 0 (off) or a guidance scale > 1 such as 3.5, got "
                              f"{self.guidance_loss:g} (at 1 the guided target equals the plain one)")

@dataclass(frozen=True)
class LoraRule:
    """`[[lora.rules]]`: targeted modules whose path full-matches `pattern` get this rank and alpha (first match
    wins)."""

    pattern: str
    rank: int
    alpha: float | None = None  # default: the rule's rank (scale 1)

    def validate(self, where: str = "lora.rules") -> None:
        if self.rank < 1:
            raise ConfigError(f"{where}.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"{where}.alpha must be > 0, got {self.alpha}")
        _check_regex(self.pattern, f"{where}.pattern")


@dataclass(frozen=True)
class LoraConfig:
    """`[lora]`: adapter shape. `targets`: a preset (`attention`: q/k/v/out and their text twins; `all-linear`:
    kohya's set) or a list of module-path regexes (presets allowed in the list); `rules`: per-pattern rank/alpha."""

    rank: int = 16
    alpha: float = 16.0
    targets: str | tuple[str, ...] = "attention"
    dropout: float = 0.0
    rules: tuple[LoraRule, ...] = ()

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        entries = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if not entries:
            raise ConfigError("lora.targets is empty: use 'attention', 'all-linear' or a list of module regexes")
        for i, t in enumerate(entries):
            _check_regex(t, "lora.targets" if isinstance(self.targets, str) else f"lora.targets[{i}]")


def _check_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{where} = {pattern!r}: not a valid regex ({e})") from None


@dataclass(frozen=True)
class OutputConfig:
    """`[output]` of full-model recipes: final BFL single file `<dir>/<name>.safetensors` in `dtype` (fp8 with
    `scaling`); checkpoints `checkpoint-<step>` every `save_every` steps (0 = only at the end), the last `keep_last`
    kept."""

    dir: str
    name: str = "model"
    save_every: int = 0
    keep_last: int = 2
    dtype: Literal["bf16", "fp32", "fp8_e4m3fn"] = "bf16"
    scaling: Literal["none", "tensor", "channel"] = "none"

    def validate(self) -> None:
        _check_output(self)


@dataclass(frozen=True)
class LoraOutputConfig:
    """`[output]` of train-lora: final LoRA `<dir>/<name>.safetensors` in `format` (kohya for ComfyUI/Forge,
    diffusers for diffusers/peft) and `save_dtype`; every `save_every` steps a usable `<name>-<step:06d>.safetensors`
    (kohya's naming, all kept) beside the resumable `checkpoint-<step>` (the last `keep_last` kept)."""

    dir: str
    name: str = "lora"
    format: Literal["kohya", "diffusers"] = "kohya"
    save_every: int = 0
    keep_last: int = 2
    save_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # LoRA weights in the files (alphas stay fp32)

    def validate(self) -> None:
        _check_output(self)


def _check_output(o) -> None:
    if not o.dir:
        raise ConfigError("output.dir is empty: set it to the folder for checkpoints and the result")
    if o.save_every < 0 or o.keep_last < 1:
        raise ConfigError("output.save_every must be >= 0 and output.keep_last >= 1")
    if not re.fullmatch(r"[\w.\-]+", o.name):
        raise ConfigError(f"output.name '{o.name}' must be a plain file name (letters, digits, _ . -)")


@dataclass(frozen=True)
class SampleConfig:
    """`[sample]`: images every `every` steps (0 = never) from `prompts` x `seeds`. `guidance` feeds the guidance
    embedding of models that have one (unset: 3.5 without CFG, 1.0 with CFG); `cfg` != 1 runs true CFG with
    `negative`; `cfg` unset fits the base (`dev2pro.flux.sampling.sample_mode`, `model.kind`): one pass at
    embedded 3.5 on dev, true CFG 3.5 on a de-distilled base."""

    every: int = 0
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    guidance: float | None = None
    cfg: float | None = None
    negative: str = ""
    width: int = 512
    height: int = 512


@dataclass(frozen=True)
class MonitorConfig:
    """`[monitor]`: guidance-health probe every `every` steps (0 = off) on `probe_size` fixed inputs."""

    every: int = 0
    probe_size: int = 4
    seed: int = 1234
    t_values: tuple[float, ...] = (0.3, 0.6, 0.9)
    response_low: float = 1.0
    response_high: float = 4.0
    drift_guidances: tuple[float, ...] = (1.0, 3.5)


@dataclass(frozen=True)
class EmaConfig:
    """`[ema]`: exponential moving average of the trained weights (dedistill). The EMA weights are what is exported."""

    enabled: bool = False
    decay: float = 0.999


@dataclass(frozen=True)
class DistributedConfig:
    """`[distributed]`: how several processes share the work (ignored with one process). `ddp` replicates the model;
    `fsdp2` shards parameters, gradients and optimizer state (accelerate's FSDP plugin, fsdp_version=2).
    `replicate` (fsdp2): K > 1 = HSDP, shard within groups of processes/K (a node), replicate across the K groups.
    `defer_reduce_scatter` (fsdp2): reduce gradients only at the last micro-step of `train.grad_accum` (less
    communication, but unsharded gradients are held in between)."""

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    replicate: int = 1
    defer_reduce_scatter: bool = False

    def validate(self) -> None:
        if self.replicate < 1:
            raise ConfigError(f"distributed.replicate must be >= 1, got {self.replicate}")
