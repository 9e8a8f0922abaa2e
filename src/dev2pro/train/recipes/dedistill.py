"""`dev2pro dedistill`: de-distillation (FLUX.1-dev -> "dev2pro"), a full fine-tune with the guidance input fixed.

    loss = || v_theta(x_t, t, c, g = train.guidance) - (eps - x0) ||^2      (plain flow matching, g = 1.0)

At g = 1 classifier-free guidance is the identity, so the distillation target equals the plain flow target: training
every weight on it, on a large diverse dataset, walks the model back towards an undistilled one that works with true
CFG and a negative prompt, and is a stable base for LoRAs (the published Flux-Dev2Pro: ~3M images, 2 epochs).

Options: EMA of the weights (`[ema]`, the EMA is what gets exported), gradient checkpointing, bf16 autocast, DDP or
FSDP2 across processes (`[distributed]`; the model is loaded straight into its shards, `dev2pro.train.fsdp`).
Checkpoints are DCP shards of the weights, AdamW state and EMA plus per-rank RNG and data position
(`dev2pro.train.sharded`), so `--resume` continues exactly, on any number of processes. The final model is a BFL single
file in `output.dtype` (bf16 by default; fp8 with `output.scaling`), streamed from the shards (the EMA's when kept).
Pitfall: the guidance embedding only ever sees g = train.guidance here; the guidance monitor (`[monitor]`) shows how
the response to other g values fades, which is expected for a de-distilled model used with CFG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dev2pro.config import dump_toml
from dev2pro.data.config import DataConfig
from dev2pro.errors import ConfigError
from dev2pro.flux.sampling import BASE_KIND_KEY
from dev2pro.train.checkpointing import find_resume, load_checkpoint, save_checkpoint
from dev2pro.train.config import (
    DistributedConfig,
    EmaConfig,
    ModelConfig,
    MonitorConfig,
    OutputConfig,
    SampleConfig,
    TrainConfig,
)
from dev2pro.train.data_loading import TrainData, get_train_data, infinite_batches, write_samples
from dev2pro.train.distributed import require_fp32_weights, setup_accelerator, unwrap
from dev2pro.train.ema import Ema
from dev2pro.train.flow_step import flow_micro_steps
from dev2pro.train.fsdp import load_for_training
from dev2pro.train.optim import due, finish_step, make_optimizer, set_lr
from dev2pro.train.run_logs import end_run, open_run_logs, prepare_output_dir, progress
from dev2pro.train.sharded import export_final


@dataclass(frozen=True)
class DedistillConfig:
    model: ModelConfig
    train: TrainConfig
    output: OutputConfig
    data: DataConfig | None = None
    ema: EmaConfig = field(default_factory=EmaConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def run(cfg: DedistillConfig, *, resume: bool = False, data: TrainData | None = None) -> Path:
    from dev2pro.flux.models import has_guidance_embed
    from dev2pro.train import monitor as M

    # ---- setup
    require_fp32_weights(cfg.model)
    acc = setup_accelerator(cfg.train)
    out = prepare_output_dir(cfg.output.dir, acc)
    resume_from = find_resume(out, resume)
    data = get_train_data(data, cfg.data, cfg.model, acc, cfg.train, cfg.sample)
    torch.manual_seed(cfg.train.seed)
    model = load_for_training(cfg.model.base, acc, cfg.distributed, cfg.train)
    if not has_guidance_embed(unwrap(model)):
        raise ConfigError(f"model.base '{cfg.model.base}' has no guidance embedding: de-distillation starts from a "
                          "guidance-distilled model such as FLUX.1-dev (use train-base to continue other models)")
    if cfg.train.gradient_checkpointing:
        unwrap(model).enable_gradient_checkpointing()
    probe = M.GuidanceProbe.build(model, data, cfg.monitor, acc.device) if cfg.monitor.every > 0 else None
    opt = acc.prepare_optimizer(make_optimizer(model.parameters(), cfg.train))
    ema = Ema(dict(unwrap(model).named_parameters()), cfg.ema.decay) if cfg.ema.enabled else None
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, acc, model, opt, generator=gen, sampler=data.sampler, ema=ema).step
    batches = infinite_batches(data)
    log, mon_log = open_run_logs(out, acc, start if resume_from else None, monitor=probe is not None)
    config_toml = dump_toml(cfg)
    bar = progress(cfg.train.steps, start, acc.is_main_process, "dedistill")

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out, step, acc, model, opt, generator=gen, sampler=data.sampler,
                               config_toml=config_toml, keep_last=cfg.output.keep_last, sharded=True, ema=ema)

    # ---- loop
    for step in range(start, cfg.train.steps):
        if probe is not None and step % cfg.monitor.every == 0:
            M.log_probe(probe, acc, model, step, log, mon_log)
        lr = set_lr(opt, step, cfg.train)
        per_g, t_g = flow_micro_steps(acc, model, batches, cfg.train, gen, has_guidance=True,
                                      guidance=cfg.train.guidance, dist=cfg.distributed)
        finish_step(acc, model, opt, per_g, t_g, step=step, lr=lr, train=cfg.train, out_dir=out, bar=bar, log=log)
        if ema is not None:
            ema.update(dict(unwrap(model).named_parameters()))
        done = step + 1
        if due(cfg.sample.every, done, cfg.train.steps):
            write_samples(acc, model, data, cfg.sample, out, done)
        if cfg.output.save_every > 0 and done % cfg.output.save_every == 0 and done < cfg.train.steps:
            checkpoint(done)
    bar.close()

    # ---- save
    if probe is not None:
        M.log_probe(probe, acc, model, cfg.train.steps, log, mon_log)
    last = checkpoint(cfg.train.steps) if cfg.output.save_every > 0 else None
    final = export_final(acc, model, out, cfg.output, config_toml, ema=ema, checkpoint=last,
                         metadata={BASE_KIND_KEY: "dedistilled"})
    end_run(acc, log)
    return final
