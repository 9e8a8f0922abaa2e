"""`dev2pro train-base`: plain full training of a Flux transformer (from a seeded preset or continued from a
checkpoint) with caption dropout, so the result works with classifier-free guidance.

Objective: the flow-matching loss `|| v_theta(x_t, t, c) - (eps - x0) ||^2` (flow.py's convention); with probability
`base.caption_dropout` a sample's text embedding (T5 sequence and CLIP pooled) is replaced by the empty prompt's
embedding, which teaches the unconditional prediction that CFG needs (Ho & Salimans 2022). If the model has a guidance
embedding it is fed `train.guidance` (a constant). This recipe builds the toy world's "pro" teacher, so it keeps CPU
overheads low: the cached dataset is read directly, no DataLoader workers.

Pitfalls: the empty-prompt embedding must come from the same text encoder as the cache (it is encoded with the sample
prompts before the encoders are freed); dropout draws come from the run's generator, drawn for the global batch, so
2 processes x b and 1 process x 2b drop the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dev2pro.config import dump_toml
from dev2pro.data.config import DataConfig
from dev2pro.errors import ConfigError
from dev2pro.train.checkpointing import find_resume, load_checkpoint, save_checkpoint
from dev2pro.train.config import DistributedConfig, ModelConfig, MonitorConfig, OutputConfig, SampleConfig, TrainConfig
from dev2pro.train.data_loading import TrainData, get_train_data, infinite_batches, write_samples
from dev2pro.train.distributed import (
    distribute,
    global_draw,
    load_model,
    require_fp32_weights,
    save_final_model,
    setup_accelerator,
)
from dev2pro.train.flow_step import flow_micro_steps
from dev2pro.train.optim import due, finish_step, make_optimizer, set_lr
from dev2pro.train.run_logs import end_run, open_run_logs, prepare_output_dir, progress


@dataclass(frozen=True)
class BaseSection:
    """`[base]`: probability of replacing a caption by the empty prompt (0 = no CFG training)."""

    caption_dropout: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"base.caption_dropout must be in [0, 1], got {self.caption_dropout}")


@dataclass(frozen=True)
class TrainBaseConfig:
    model: ModelConfig
    train: TrainConfig
    output: OutputConfig
    data: DataConfig | None = None
    base: BaseSection = field(default_factory=BaseSection)
    sample: SampleConfig = field(default_factory=SampleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def caption_dropout(txt, pooled, empty, p: float, generator: torch.Generator, accelerator):
    """Replace each sample's (txt, pooled) by the empty prompt's with probability p (drawn for the global batch)."""
    n, mine = global_draw(accelerator, txt.shape[0])
    drop = (torch.rand(n, generator=generator) < p)[mine].to(txt.device)
    e_txt, e_pooled = (e.to(txt.device, txt.dtype) for e in empty)
    txt = torch.where(drop[:, None, None], e_txt.expand_as(txt), txt)
    pooled = torch.where(drop[:, None], e_pooled.expand_as(pooled), pooled)
    return txt, pooled


def run(cfg: TrainBaseConfig, *, resume: bool = False, data: TrainData | None = None) -> Path:
    from dev2pro.flux.models import has_guidance_embed
    from dev2pro.train import monitor as M

    # ---- setup
    require_fp32_weights(cfg.model)
    acc = setup_accelerator(cfg.train)
    out = prepare_output_dir(cfg.output.dir)
    resume_from = find_resume(out, resume)
    data = get_train_data(data, cfg.data, cfg.model, acc, cfg.train, cfg.sample)
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model.base, "fp32", acc.device)
    has_g = has_guidance_embed(model)
    model.requires_grad_(True).train()
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    probe = M.GuidanceProbe.build(model, data, cfg.monitor, acc.device) if cfg.monitor.every > 0 else None
    model = distribute(acc, model, cfg.distributed, cfg.train)
    opt = acc.prepare_optimizer(make_optimizer(model.parameters(), cfg.train))
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, acc, model, opt, generator=gen, sampler=data.sampler).step
    batches = infinite_batches(data)
    log, mon_log = open_run_logs(out, acc, start if resume_from else None, monitor=probe is not None)
    config_toml = dump_toml(cfg)
    bar = progress(cfg.train.steps, start, acc.is_main_process, "train-base")

    # ---- loop
    for step in range(start, cfg.train.steps):
        if probe is not None and step % cfg.monitor.every == 0:
            M.log_probe(probe, acc, model, step, log, mon_log)
        lr = set_lr(opt, step, cfg.train)
        per_g, t_g = flow_micro_steps(
            acc, model, batches, cfg.train, gen, has_guidance=has_g, guidance=cfg.train.guidance,
            condition=lambda fb: caption_dropout(fb.txt, fb.pooled, data.prompts[""], cfg.base.caption_dropout, gen,
                                                 acc))
        finish_step(acc, model, opt, per_g, t_g, step=step, lr=lr, train=cfg.train, out_dir=out, bar=bar, log=log)
        done = step + 1
        if due(cfg.sample.every, done, cfg.train.steps):
            write_samples(acc, model, data, cfg.sample, out, done)
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
    final = save_final_model(acc, model, out, cfg.output, config_toml)
    end_run(acc, log)
    return final

