"""`dev2pro train-lora`: a LoRA on a frozen Flux base with the plain flow-matching loss at a fixed guidance input.

    loss = || v_theta+LoRA(x_t, t, c, g = train.guidance) - (eps - x0) ||^2      (flow.py's convention)

The dev2pro recipe trains on a de-distilled base (the fp8 file) at g = 1.0 and applies the LoRA to dev; the guidance
value is recorded in the LoRA metadata. The base stays frozen in the dtype it was loaded in (bf16, or fp8 through
`dev2pro.flux.fp8.Fp8Linear`); LoRA weights are fp32 (`dev2pro.lora.inject.add_lora`);
`train.mixed_precision = "bf16"` runs the
matmuls under bf16 autocast. `train.fp8_matmul`, `train.blocks_to_swap` and `train.compile` (speed and memory on
consumer GPUs) are applied by `dev2pro.train.speed.prepare_model` once the LoRA is in place.

`model.adapter` (issue 6): a LoRA file (e.g. `dev2pro lora extract dev dev2pro` = a "de-distill adapter") attached to
the base as a frozen, unmerged peft adapter, so one trains on "dev + adapter" with one 12B file. Unmerged rather than
merged: on an fp8 base a merge would re-quantize and round most of the adapter's small delta away; unmerged it is
exact and can be switched off. It is left out of the exported LoRA and, by default, of the sample images (they show
base + trained LoRA, what users will run on dev; `sample.adapter = true` includes it).

Output: `output.dir/<output.name>.safetensors` in `output.format` (kohya for ComfyUI/Forge, diffusers for
diffusers/peft) with metadata: base model name and content hash, rank, alpha, targets, training guidance, steps,
resolution, dataset size, tool version (and the adapter, if any). Checkpoints `checkpoint-<step>` every
`output.save_every` steps; `--resume` continues exactly (see `dev2pro.train.checkpointing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dev2pro.config import dump_toml
from dev2pro.data.folders import DataConfig
from dev2pro.errors import ConfigError, UserError
from dev2pro.train.checkpointing import find_resume, gather_train_state, load_checkpoint, save_checkpoint
from dev2pro.train.config import (
    DistributedConfig,
    LoraConfig,
    LoraOutputConfig,
    ModelConfig,
    MonitorConfig,
    SampleConfig,
    TrainConfig,
)
from dev2pro.train.data_loading import TrainData, get_train_data, infinite_batches, write_samples
from dev2pro.train.distributed import distribute, load_model, setup_accelerator, unwrap
from dev2pro.train.flow_step import flow_micro_steps
from dev2pro.train.optim import due, finish_step, make_optimizer, set_lr
from dev2pro.train.run_logs import end_run, open_run_logs, prepare_output_dir, progress
from dev2pro.train.speed import LoraTrainConfig

ADAPTER_NAME = "dev2pro_adapter"  # peft adapter name of model.adapter (the trained LoRA is "default")


@dataclass(frozen=True)
class LoraSampleConfig(SampleConfig):
    """`[sample]` of train-lora: as every recipe, plus whether sample images include `model.adapter`."""

    adapter: bool = False


@dataclass(frozen=True)
class TrainLoraConfig:
    model: ModelConfig
    train: LoraTrainConfig
    output: LoraOutputConfig
    data: DataConfig | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    sample: LoraSampleConfig = field(default_factory=LoraSampleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def lora_from_state(state: dict[str, torch.Tensor], alpha: float, adapter_name: str = "default"):
    """`LoraWeights` from a full trainable state dict (`<module>.lora_A.<name>.weight` / `lora_B`)."""
    from dev2pro.lora.inject import LoraLayer, LoraWeights, clean_module_path

    downs, ups = {}, {}
    for key, v in state.items():
        for part, table in ((f".lora_A.{adapter_name}.weight", downs), (f".lora_B.{adapter_name}.weight", ups)):
            if key.endswith(part):
                table[clean_module_path(key[: -len(part)])] = v.detach().to("cpu", torch.float32)
    if not downs or set(downs) != set(ups):
        raise ValueError(f"no complete LoRA '{adapter_name}' in the trainable state ({len(downs)} A, {len(ups)} B)")
    return LoraWeights(layers={p: LoraLayer(down=downs[p], up=ups[p], alpha=float(alpha)) for p in sorted(downs)})


def base_identity(ref: str) -> tuple[str, str]:
    """(name, content hash) of the base for the LoRA metadata; presets and toy models have no file to hash."""
    from dev2pro.flux.hashing import model_hash

    name = Path(ref).name if not ref.startswith(("preset:", "toy:")) else ref
    try:
        return name, model_hash(ref)
    except (UserError, OSError, ValueError):
        return name, ""


def check_compute_dtype(model: torch.nn.Module, train: TrainConfig) -> None:
    half = {p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    if half and train.mixed_precision == "no":
        raise ConfigError(f"the base holds {sorted(str(d) for d in half)} weights: set train.mixed_precision = "
                          "'bf16' (or model.dtype = 'fp32' for full precision)")


def run(cfg: TrainLoraConfig, *, resume: bool = False, data: TrainData | None = None) -> Path:
    from dev2pro.flux.models import has_guidance_embed
    from dev2pro.lora.files import load_lora, save_lora
    from dev2pro.lora.inject import add_lora, apply_lora, set_lora_strength
    from dev2pro.lora.metadata import training_metadata
    from dev2pro.train import monitor as M
    from dev2pro.train import speed

    # ---- setup
    acc = setup_accelerator(cfg.train)
    out = prepare_output_dir(cfg.output.dir)
    resume_from = find_resume(out, resume)
    data = get_train_data(data, cfg.data, cfg.model, acc, cfg.train, cfg.sample)
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model.base, cfg.model.dtype, speed.load_device(cfg.train, acc.device))
    check_compute_dtype(model, cfg.train)
    has_g = has_guidance_embed(model)
    add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout, seed=cfg.train.seed)
    if cfg.model.adapter:
        apply_lora(model, load_lora(cfg.model.adapter), cfg.model.adapter_strength, adapter_name=ADAPTER_NAME,
                   what=cfg.model.adapter)
    model.train()
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    swap = speed.prepare_model(model, cfg.train, acc.device, acc.num_processes)
    probe = M.GuidanceProbe.build(model, data, cfg.monitor, acc.device) if cfg.monitor.every > 0 else None
    # block swap places the model itself (swapped blocks' weights stay on the CPU): accelerate must not move it
    model = acc.prepare_model(model, device_placement=False) if swap else distribute(acc, model, cfg.distributed,
                                                                                       cfg.train)
    opt = acc.prepare_optimizer(make_optimizer(model.parameters(), cfg.train))
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, acc, model, opt, generator=gen, sampler=data.sampler).step
    batches = infinite_batches(data)
    log, mon_log = open_run_logs(out, acc, start if resume_from else None, monitor=probe is not None)
    config_toml = dump_toml(cfg)
    bar = progress(cfg.train.steps, start, acc.is_main_process, "train-lora")

    def samples(step: int) -> None:
        hide = cfg.model.adapter and not cfg.sample.adapter
        if hide:
            set_lora_strength(unwrap(model), 0.0, ADAPTER_NAME)
        try:
            write_samples(acc, model, data, cfg.sample, out, step)
        finally:
            if hide:
                set_lora_strength(unwrap(model), cfg.model.adapter_strength, ADAPTER_NAME)

    # ---- loop
    for step in range(start, cfg.train.steps):
        if probe is not None and step % cfg.monitor.every == 0:
            M.log_probe(probe, acc, model, step, log, mon_log)
        lr = set_lr(opt, step, cfg.train)
        per_g, t_g = flow_micro_steps(acc, model, batches, cfg.train, gen, has_guidance=has_g,
                                      guidance=cfg.train.guidance)
        finish_step(acc, model, opt, per_g, t_g, step=step, lr=lr, train=cfg.train, out_dir=out, bar=bar, log=log)
        done = step + 1
        if due(cfg.sample.every, done, cfg.train.steps):
            samples(done)
        if cfg.output.save_every > 0 and done % cfg.output.save_every == 0 and done < cfg.train.steps:
            save_checkpoint(out, done, acc, model, opt, generator=gen, sampler=data.sampler,
                            config_toml=config_toml, keep_last=cfg.output.keep_last)
    bar.close()

    # ---- save
    if probe is not None:
        M.log_probe(probe, acc, model, cfg.train.steps, log, mon_log)
    if cfg.output.save_every > 0:
        save_checkpoint(out, cfg.train.steps, acc, model, opt, generator=gen, sampler=data.sampler,
                        config_toml=config_toml, keep_last=cfg.output.keep_last)
    state, _ = gather_train_state(model, opt)
    final = out / f"{cfg.output.name}.safetensors"
    if acc.is_main_process:
        lora = lora_from_state(state, cfg.lora.alpha)
        name, digest = base_identity(cfg.model.base)
        extra = {}
        if cfg.model.adapter:
            extra = {"dev2pro.adapter": Path(cfg.model.adapter).name,
                     "dev2pro.adapter_hash": base_identity(cfg.model.adapter)[1],
                     "dev2pro.adapter_strength": str(cfg.model.adapter_strength)}
        meta = training_metadata(
            base_model=name, base_model_hash=digest, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
            targets=cfg.lora.targets, training_guidance=cfg.train.guidance, steps=cfg.train.steps,
            resolution=data.info.get("resolution"), dataset_size=data.info.get("dataset_size"), extra=extra)
        try:
            save_lora(final, lora, cfg.output.format, metadata=meta)
        except OSError as e:
            raise UserError(f"could not write {final} ({e.strerror or e}); free disk space and resume") from None
        (out / f"{cfg.output.name}.toml").write_text(config_toml)
    end_run(acc, log)
    return final
