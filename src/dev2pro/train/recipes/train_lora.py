"""`dev2pro train-lora`: a LoRA on a frozen Flux base with the plain flow-matching loss at a fixed guidance input.

    loss = || v_theta+LoRA(x_t, t, c, g = train.guidance) - (eps - x0) ||^2      (flow.py's convention)

or, with `train.guidance_loss = s` on a guidance-distilled base (dev), the guidance-preserving loss
(`dev2pro.train.flow_step.guided_target`; one extra no-grad forward per micro-batch, about +1/3 of a step's compute):

    loss = || v_theta+LoRA(x_t, t, c, g = s) - (v_u + s ((eps - x0) - v_u)) ||^2,   v_u = v_theta+LoRA(x_t,t,"",g=s)

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
diffusers/peft) and `output.save_dtype`, with kohya/modelspec/dev2pro metadata (`dev2pro.train.lora_export`). Every
`output.save_every` steps a usable `<name>-<step:06d>.safetensors` and a checkpoint `checkpoint-<step>`; `--resume`
continues exactly, optimizer and LR-scheduler state included (see `dev2pro.train.checkpointing`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dev2pro.config import dump_toml
from dev2pro.data.config import DataConfig
from dev2pro.errors import ConfigError
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
from dev2pro.train.lora_export import LoraExporter, step_file
from dev2pro.train.optim import LrSchedule, due, finish_step, make_optimizer, optimizer_label
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


def trained_guidance(train: TrainConfig) -> float:
    """The guidance input the LoRA was trained at: `train.guidance_loss` when that is on, else `train.guidance`."""
    return train.guidance_loss if train.guidance_loss > 0 else train.guidance


def check_guidance_loss(train: TrainConfig, has_guidance: bool, base: str) -> None:
    """The guidance-preserving loss trains the guidance input: a base without one (dev2pro, schnell-like) has none."""
    if train.guidance_loss > 0 and not has_guidance:
        raise ConfigError(f"train.guidance_loss = {train.guidance_loss:g} needs a base with a guidance embedding "
                          f"(FLUX.1-dev); '{base}' has none: on a de-distilled base train with the plain loss "
                          "(train.guidance_loss = 0)")


def check_compute_dtype(model: torch.nn.Module, train: TrainConfig) -> None:
    half = {p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    if half and train.mixed_precision == "no":
        raise ConfigError(f"the base holds {sorted(str(d) for d in half)} weights: set train.mixed_precision = "
                          "'bf16' (or model.dtype = 'fp32' for full precision)")


def run(cfg: TrainLoraConfig, *, resume: bool = False, data: TrainData | None = None) -> Path:
    from dev2pro.flux.models import has_guidance_embed
    from dev2pro.lora.files import load_lora
    from dev2pro.lora.inject import add_lora, apply_lora, lora_state_dict, set_lora_strength
    from dev2pro.train import monitor as M
    from dev2pro.train import speed

    # ---- setup
    acc = setup_accelerator(cfg.train)
    out = prepare_output_dir(cfg.output.dir, acc)
    resume_from = find_resume(out, resume)
    data = get_train_data(data, cfg.data, cfg.model, acc, cfg.train, cfg.sample)
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model.base, cfg.model.dtype, speed.load_device(cfg.train, acc.device))
    check_compute_dtype(model, cfg.train)
    has_g = has_guidance_embed(model)
    check_guidance_loss(cfg.train, has_g, cfg.model.base)
    add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout, seed=cfg.train.seed,
             rules=cfg.lora.rules)
    alphas = lora_state_dict(model).alphas()  # per module (lora.rules)
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
    schedule = LrSchedule(opt, cfg.train)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start, started_at = 0, time.time()
    if resume_from is not None:
        resumed = load_checkpoint(resume_from, acc, model, opt, generator=gen, sampler=data.sampler)
        start, started_at = resumed.step, resumed.state.get("training_started_at", started_at)
        schedule.load_state_dict(resumed.state)
    exporter = LoraExporter(cfg, alphas, data.info, optimizer_label(opt, cfg.train), started_at,
                            training_guidance=trained_guidance(cfg.train))
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

    def save(step: int, lora_path: Path, checkpoint: bool = True) -> None:
        """The resumable checkpoint and a LoRA file usable as is (collective: every rank calls it)."""
        if checkpoint:
            save_checkpoint(out, step, acc, model, opt, generator=gen, sampler=data.sampler, config_toml=config_toml,
                            keep_last=cfg.output.keep_last,
                            extra_state={"training_started_at": started_at, **schedule.state_dict()})
        state, _ = gather_train_state(model, opt)
        if acc.is_main_process:
            exporter.write(state, step, lora_path)

    # ---- loop
    for step in range(start, cfg.train.steps):
        if probe is not None and step % cfg.monitor.every == 0:
            M.log_probe(probe, acc, model, step, log, mon_log)
        lr = schedule.before_step(step)
        per_g, t_g = flow_micro_steps(acc, model, batches, cfg.train, gen, has_guidance=has_g,
                                      guidance=cfg.train.guidance, uncond=data.prompts[""])
        finish_step(acc, model, opt, per_g, t_g, step=step, lr=lr, train=cfg.train, out_dir=out, bar=bar, log=log)
        schedule.after_step()
        done = step + 1
        if due(cfg.sample.every, done, cfg.train.steps):
            samples(done)
        if cfg.output.save_every > 0 and done % cfg.output.save_every == 0 and done < cfg.train.steps:
            save(done, step_file(out, cfg.output.name, done))
    bar.close()

    # ---- save
    if probe is not None:
        M.log_probe(probe, acc, model, cfg.train.steps, log, mon_log)
    final = out / f"{cfg.output.name}.safetensors"
    save(cfg.train.steps, final, checkpoint=cfg.output.save_every > 0)
    if acc.is_main_process:
        (out / f"{cfg.output.name}.toml").write_text(config_toml)
    end_run(acc, log)
    return final
