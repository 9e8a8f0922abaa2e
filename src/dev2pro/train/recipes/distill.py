"""`dev2pro distill`: guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models"), the
step that (most likely) made FLUX.1-dev from its CFG teacher.

    teacher  v_T(x_t, t, c): frozen; no guidance embedding (a "pro" model), or a de-distilled one used at g = 1
    student  v_S(x_t, t, c, w): the teacher's weights + a guidance embedding; w ~ U[w_min, w_max] per sample
    loss     || v_S(x_t, t, c, w) - [v_T(x_t, t, 0) + w (v_T(x_t, t, c) - v_T(x_t, t, 0))] ||^2
             + flow_weight || v_S(x_t, t, c, w) - (eps - x0) ||^2          (optional, default off)

The unconditional prediction uses the empty prompt's embedding (encoded once before the text encoders are freed).

Student initialisation (`student_from_teacher`): the guidance embedder's input layer is copied from the teacher's
(its guidance embedder if it has one, else its timestep embedder: the same sinusoidal features, so a sensible start)
and its output layer gets zero weights, with the bias set to the teacher's guidance embedding at g = 1 (zero for a
teacher without one). So at step 0 the student's output is exactly the teacher's, for every w.

Memory: under FSDP2 teacher and student are both loaded straight into their shards (`load_pair`; the frozen teacher
is sharded too, all-gathered block by block in its forward); `distill.teacher_fp8` instead keeps a whole teacher per
rank with its block linears in float8_e4m3fn (per-tensor scaled; fp8 cannot be sharded, see `dev2pro.train.fsdp`).
With DDP or one process the teacher is whole and frozen (never wrapped). Both teacher passes (conditional and
unconditional) run as one batch of 2b.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dev2pro.config import dump_toml
from dev2pro.data.config import DataConfig
from dev2pro.errors import ConfigError
from dev2pro.flux import flow
from dev2pro.flux.sampling import BASE_KIND_KEY
from dev2pro.train.checkpointing import find_resume, load_checkpoint, save_checkpoint
from dev2pro.train.config import DistributedConfig, ModelConfig, MonitorConfig, OutputConfig, SampleConfig, TrainConfig
from dev2pro.train.data_loading import TrainData, get_train_data, infinite_batches, write_samples
from dev2pro.train.distributed import (
    accumulation_context,
    distribute,
    global_draw,
    load_model,
    setup_accelerator,
    unwrap,
)
from dev2pro.train.flow_step import batch_tensors, flow_batch, forward_flux
from dev2pro.train.fsdp import load_for_training, uses_fsdp
from dev2pro.train.optim import due, finish_step, make_optimizer, set_lr
from dev2pro.train.run_logs import end_run, open_run_logs, prepare_output_dir, progress
from dev2pro.train.sharded import export_final


@dataclass(frozen=True)
class DistillSection:
    """`[distill]`. `teacher` defaults to `model.base` (the student starts from the teacher's weights)."""

    teacher: str = ""
    w_min: float = 1.0
    w_max: float = 4.0
    flow_weight: float = 0.0
    teacher_fp8: bool = False
    teacher_guidance: float = 1.0  # input of a teacher that has a guidance embedding (de-distilled: 1.0)

    def validate(self) -> None:
        if not 0.0 <= self.w_min <= self.w_max:
            raise ConfigError(f"distill.w_min ({self.w_min}) must be >= 0 and <= distill.w_max ({self.w_max})")
        if self.flow_weight < 0:
            raise ConfigError(f"distill.flow_weight must be >= 0, got {self.flow_weight}")


@dataclass(frozen=True)
class DistillRecipeConfig:
    model: ModelConfig
    train: TrainConfig
    output: OutputConfig
    data: DataConfig | None = None
    distill: DistillSection = field(default_factory=DistillSection)
    sample: SampleConfig = field(default_factory=SampleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


GE = "time_text_embed.guidance_embedder."
TE = "time_text_embed.timestep_embedder."


@torch.no_grad()
def guidance_embedder_init(embedders: dict[str, torch.Tensor], teacher_has_g: bool, teacher_guidance: float,
                           hidden: int) -> dict[str, torch.Tensor]:
    """The student's guidance embedder (module docstring) from the teacher's timestep/guidance embedder tensors:
    input layer copied, output weight zero, output bias = the teacher's guidance embedding at `teacher_guidance`
    (zero without one)."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    src = GE if teacher_has_g else TE
    ge = TimestepEmbedding(in_channels=256, time_embed_dim=hidden)
    ge.linear_1.load_state_dict({k: embedders[src + "linear_1." + k].float() for k in ("weight", "bias")})
    bias = torch.zeros(hidden)
    if teacher_has_g:
        ge.linear_2.load_state_dict({k: embedders[GE + "linear_2." + k].float() for k in ("weight", "bias")})
        proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.tensor([teacher_guidance * 1000.0]))
        bias = ge(proj)[0].float()  # diffusers feeds g * 1000, as CombinedTimestepGuidanceTextProjEmbeddings
    return {GE + "linear_1.weight": ge.linear_1.weight.detach().clone(),
            GE + "linear_1.bias": ge.linear_1.bias.detach().clone(),
            GE + "linear_2.weight": torch.zeros_like(ge.linear_2.weight), GE + "linear_2.bias": bias}


def student_weights(teacher_spec, teacher_stream, teacher_guidance: float = 1.0):
    """(student spec, student weights streamed one group at a time) from the teacher's: every tensor passed through
    except the guidance embedder, which is `guidance_embedder_init`'s. Only the small embedder tensors are kept."""

    def stream():
        kept = {}
        for k, t in teacher_stream:
            if k.startswith((GE, TE)):
                kept[k] = t
            if not k.startswith(GE):
                yield k, t
        yield from guidance_embedder_init(kept, teacher_spec.guidance_embed, teacher_guidance,
                                          teacher_spec.hidden_size).items()

    return teacher_spec.replace(guidance_embed=True), stream()


@torch.no_grad()
def student_from_teacher(teacher: torch.nn.Module, teacher_guidance: float = 1.0) -> torch.nn.Module:
    """A float32 CPU copy of `teacher` with a guidance embedding that contributes exactly what the teacher's does at
    `teacher_guidance` (nothing, for a teacher without one), whatever w is fed: student == teacher at step 0."""
    from dev2pro.flux.models import FluxSpec, build_transformer
    from dev2pro.train.fsdp import fill

    spec, stream = student_weights(FluxSpec.from_diffusers_config(dict(teacher.config)),
                                   ((k, v.detach().float().cpu()) for k, v in teacher.state_dict().items()),
                                   teacher_guidance)
    student = build_transformer(spec, device="meta").to_empty(device="cpu")
    fill(student, stream, torch.float32, "teacher")
    return student


def distill_target(v_uncond: torch.Tensor, v_cond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The teacher's CFG prediction v_u + w (v_c - v_u), w per sample."""
    return flow.cfg_combine(v_uncond.float(), v_cond.float(), w)


def load_pair(cfg: DistillRecipeConfig, acc):
    """(frozen teacher, trainable student) on this process. Under FSDP2 both are loaded straight into their shards
    (`dev2pro.train.fsdp.load_for_training`; the student streamed from the teacher's file, `student_weights`), except
    an fp8 teacher, kept whole (frozen, ~1 byte per weight, read in bf16). Otherwise the teacher is loaded whole on
    the CPU in fp32, the student copied from it, then the teacher is cast or quantized."""
    from dev2pro.flux.checkpoint import weight_stream
    from dev2pro.flux.models import has_guidance_embed

    teacher_ref = cfg.distill.teacher or cfg.model.base
    fp8 = cfg.distill.teacher_fp8 or cfg.model.dtype == "fp8"  # model.dtype: the frozen teacher's storage
    if uses_fsdp(acc, cfg.distributed):
        if fp8:  # whole on every rank: read in bf16, block linears stored in fp8 (per-tensor scales)
            teacher = load_model(teacher_ref, "fp8", acc.device).requires_grad_(False).eval()
            _fp32_rest(teacher, cfg.train)
        else:
            dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
            teacher = load_for_training(teacher_ref, acc, cfg.distributed, cfg.train, dtype=dtype, trainable=False)
        spec, stream = weight_stream(cfg.model.base)
        if cfg.model.base == teacher_ref or not spec.guidance_embed:
            spec, stream = student_weights(spec, stream, cfg.distill.teacher_guidance)
        return teacher, load_for_training(cfg.model.base, acc, cfg.distributed, cfg.train, spec=spec, stream=stream)
    teacher = load_model(teacher_ref, "fp32", "cpu")
    if cfg.distill.teacher and cfg.distill.teacher != cfg.model.base:
        init = load_model(cfg.model.base, "fp32", "cpu")
        student = init if has_guidance_embed(init) else student_from_teacher(init, cfg.distill.teacher_guidance)
        del init
    else:
        student = student_from_teacher(teacher, cfg.distill.teacher_guidance)
    student = distribute(acc, student.to(acc.device).requires_grad_(True).train(), cfg.distributed, cfg.train)
    teacher.requires_grad_(False).eval()
    if fp8 or cfg.model.dtype == "bf16":
        teacher.to(torch.bfloat16)
    if fp8:  # quantized from bf16, as `load_model(..., "fp8")` does under FSDP2: the same teacher either way
        from dev2pro.flux.fp8 import swap_linears_to_fp8

        swap_linears_to_fp8(teacher, scaling="tensor")
        _fp32_rest(teacher, cfg.train)
    return teacher.to(acc.device), student


@torch.no_grad()
def _fp32_rest(teacher: torch.nn.Module, train) -> None:
    """Without bf16 autocast an fp8 teacher computes in fp32: its bf16 weights (all but the fp8 block linears) are
    upcast so every matmul sees one dtype."""
    if train.mixed_precision == "no":
        for p in teacher.parameters():
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()


def run(cfg: DistillRecipeConfig, *, resume: bool = False, data: TrainData | None = None) -> Path:
    from dev2pro.flux.models import has_guidance_embed
    from dev2pro.train import monitor as M

    # ---- setup
    acc = setup_accelerator(cfg.train)
    out = prepare_output_dir(cfg.output.dir, acc)
    resume_from = find_resume(out, resume)
    data = get_train_data(data, cfg.data, cfg.model, acc, cfg.train, cfg.sample)
    torch.manual_seed(cfg.train.seed)
    teacher, student = load_pair(cfg, acc)
    teacher_has_g = has_guidance_embed(teacher)
    if cfg.train.gradient_checkpointing:
        unwrap(student).enable_gradient_checkpointing()
    probe = M.GuidanceProbe.build(student, data, cfg.monitor, acc.device) if cfg.monitor.every > 0 else None
    opt = acc.prepare_optimizer(make_optimizer(student.parameters(), cfg.train))
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, acc, student, opt, generator=gen, sampler=data.sampler).step
    batches = infinite_batches(data)
    log, mon_log = open_run_logs(out, acc, start if resume_from else None, monitor=probe is not None)
    config_toml = dump_toml(cfg)
    e_txt, e_pooled = data.prompts[""]
    bar = progress(cfg.train.steps, start, acc.is_main_process, "distill")

    # ---- loop
    for step in range(start, cfg.train.steps):
        if probe is not None and step % cfg.monitor.every == 0:
            M.log_probe(probe, acc, student, step, log, mon_log)
        lr = set_lr(opt, step, cfg.train)
        per_all, t_all, distill_all = [], [], []
        for micro in range(cfg.train.grad_accum):
            latents, txt, pooled = batch_tensors(next(batches))
            fb = flow_batch(latents, txt, pooled, cfg.train, gen, acc, acc.device)
            n, mine = global_draw(acc, latents.shape[0])
            w = (cfg.distill.w_min + (cfg.distill.w_max - cfg.distill.w_min) * torch.rand(n, generator=gen))[mine]
            w = w.to(acc.device)
            b = fb.x_t.shape[0]
            with acc.autocast(), torch.no_grad():
                both = forward_flux(
                    teacher, teacher_has_g, torch.cat([fb.x_t, fb.x_t]), torch.cat([fb.t, fb.t]),
                    torch.cat([fb.txt, e_txt.to(fb.txt).expand_as(fb.txt)]),
                    torch.cat([fb.pooled, e_pooled.to(fb.pooled).expand_as(fb.pooled)]),
                    fb.img_ids, fb.txt_ids, cfg.distill.teacher_guidance)
                target = distill_target(both[b:], both[:b], w)
            last_micro = micro == cfg.train.grad_accum - 1
            with accumulation_context(acc, student, last_micro, cfg.distributed), acc.autocast():
                pred = forward_flux(student, True, fb.x_t, fb.t, fb.txt, fb.pooled, fb.img_ids, fb.txt_ids, w)
                weight = flow.loss_weight(fb.t, cfg.train.loss_weighting)
                d_loss = flow.flow_loss(pred, target, weight)
                per = d_loss
                if cfg.distill.flow_weight > 0:
                    per = per + cfg.distill.flow_weight * flow.flow_loss(pred, fb.target, weight)
                acc.backward(per.mean() / cfg.train.grad_accum)
            per_all.append(per.detach())
            distill_all.append(d_loss.detach())
            t_all.append(fb.t)
        per_g, t_g = acc.gather(torch.cat(per_all)), acc.gather(torch.cat(t_all))
        d_mean = float(acc.gather(torch.cat(distill_all)).mean())
        finish_step(acc, student, opt, per_g, t_g, step=step, lr=lr, train=cfg.train, out_dir=out, bar=bar, log=log,
                    extra={"loss/distill": d_mean})
        done = step + 1
        if due(cfg.sample.every, done, cfg.train.steps):
            write_samples(acc, student, data, cfg.sample, out, done)
        if cfg.output.save_every > 0 and done % cfg.output.save_every == 0 and done < cfg.train.steps:
            save_checkpoint(out, done, acc, student, opt, generator=gen, sampler=data.sampler,
                            config_toml=config_toml, keep_last=cfg.output.keep_last, sharded=True)
    bar.close()

    # ---- save
    if probe is not None:
        M.log_probe(probe, acc, student, cfg.train.steps, log, mon_log)
    last = None
    if cfg.output.save_every > 0:
        last = save_checkpoint(out, cfg.train.steps, acc, student, opt, generator=gen, sampler=data.sampler,
                               config_toml=config_toml, keep_last=cfg.output.keep_last, sharded=True)
    final = export_final(acc, student, out, cfg.output, config_toml, checkpoint=last,
                         metadata={BASE_KIND_KEY: "distilled"})
    end_run(acc, log)
    return final
