"""The 2x2 evaluation: LoRAs (trained on some base) applied to bases, scored over prompts and seeds.

What it runs (`dev2pro compare CONFIG.toml`):

- **cells**: every LoRA x every base (the "trained-on x applied-to" grid of the article's experiment), plus each base
  without a LoRA as a baseline; each base samples in its own mode: `embedded` (dev-like: the guidance value goes into
  the guidance embedding, one pass, no negative prompt) or `cfg` (de-distilled: true classifier-free guidance with a
  negative prompt, embedded guidance fixed at 1.0 when the model has the embedding);
- **guidance sweep**: the LoRA cells at each base's `sweep` values;
- **curves**: the metrics of each LoRA's intermediate checkpoints (`checkpoint-<step>`) on each base, step 0 being
  the base without a LoRA;
- **metrics** per cell, each with its mean and a 95% interval: style fidelity (the judge's probability of the
  held-out style), prompt adherence (the judge), their product per image ("styled and on prompt"), the Frechet
  distance between the judge's features of the generated images and of reference images of the style, and
  diversity (mean pairwise feature distance between seeds of one prompt).

The parts: `plan` (config, checkpoints, the work list), `judges` and `toolkit` (the heavy parts behind interfaces),
`stats` (intervals, the metrics table), `results` (per-job scores to estimates to tables), `verdict`, `plots`,
`tables` and `report`. This module runs the jobs and ties them together (`run_compare`): each base loads once, each
LoRA is applied once per base, images are sampled in batches of whole prompts (every prompt with every seed) and only
the grid's subset is kept.

`run_compare` takes any `Toolkit` (`FluxToolkit` by default; the tests pass small fakes). Outputs: `report.md`,
`results.json`, `grid.png`, `bars.png`, `sweep.png`, `curves.png` in `output.dir`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dev2pro.errors import UserError
from dev2pro.eval.groups import pool
from dev2pro.eval.judges import Judge, reference_features
from dev2pro.eval.plan import CompareConfig, Job, SamplingSection, find_checkpoints, plan_jobs
from dev2pro.eval.plots import plot_bars, plot_lines, save_grid
from dev2pro.eval.report import write_report, write_results_json
from dev2pro.eval.results import CompareResult, JobResult, add_response, collect, summarize
from dev2pro.eval.tables import row_labels
from dev2pro.eval.toolkit import FluxToolkit, Toolkit
from dev2pro.eval.verdict import claim_verdict


def _pairs(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, int]]:
    return [(i, s) for i in range(len(prompts)) for s in seeds]


def _grid_subset(job: Job, s: SamplingSection) -> set[tuple[int, int]]:
    return {(i, sd) for i in range(min(s.grid_prompts, len(job.prompts))) for sd in job.seeds[: s.grid_seeds]}


def run_jobs(cfg: CompareConfig, jobs: list[Job], checkpoints: dict[str, list[tuple[int, Path]]], toolkit: Toolkit,
             judge: Judge | None, root: Path | None = None) -> list[JobResult]:
    from tqdm.auto import tqdm

    ckpt = {(name, step): path for name, lst in checkpoints.items() for step, path in lst}
    results: list[JobResult] = []
    total = sum(len(j.prompts) * len(j.seeds) for j in jobs)
    bar = tqdm(total=total, desc="compare: sampling", unit="img", dynamic_ncols=True)
    for base_name in dict.fromkeys(j.base for j in jobs):
        entry = cfg.base(base_name)
        bar.set_postfix_str(f"loading {base_name}")
        model = toolkit.load_base(entry)
        base_jobs = [j for j in jobs if j.base == base_name]
        for lora_key in dict.fromkeys((j.lora, j.step) for j in base_jobs):
            lora_name, step = lora_key
            if lora_name is None:
                ctx = contextlib.nullcontext()
            else:
                lx = cfg.lora(lora_name)
                path = _resolve(lx.path, root) if step is None else ckpt[(lora_name, step)]
                ctx = toolkit.apply_lora(model, path, lx.strength)
            with ctx:
                for job in (j for j in base_jobs if (j.lora, j.step) == lora_key):
                    bar.set_postfix_str(job.key.split("|n")[0])
                    results.append(_run_job(cfg, job, entry, model, toolkit, judge, bar))
        toolkit.release(model)
        del model
    bar.close()
    return results


def _resolve(path: str, root: Path | None) -> Path:
    p = Path(path)
    p = root / p if root is not None and not p.is_absolute() else p
    if not p.is_file():
        raise UserError(f"LoRA file {p} does not exist")
    return p


def _run_job(cfg, job, entry, model, toolkit, judge, bar) -> JobResult:
    import torch

    s = cfg.sampling
    pairs = _pairs(job.prompts, job.seeds)
    keep = _grid_subset(job, s)
    t0 = time.perf_counter()
    style, adher, feats, grid = [], [], [], {}
    per_call = max(1, s.batch_size // len(job.seeds))  # prompts per call; every prompt with every seed
    for k in range(0, len(job.prompts), per_call):
        idx = range(k, min(k + per_call, len(job.prompts)))
        chunk = [(i, sd) for i in idx for sd in job.seeds]
        images = toolkit.generate(model, [job.prompts[i] for i in idx], job.seeds, entry=entry,
                                  guidance=job.guidance, sampling=s)
        if len(images) != len(chunk):
            raise RuntimeError(f"generate returned {len(images)} images for {len(chunk)} prompt x seed pairs")
        prompts = [job.prompts[i] for i, _ in chunk]
        if judge is not None:
            sc = judge.score(images, prompts)
            style.append(sc["style"])
            adher.append(sc["adherence"])
            feats.append(judge.features(images))
        for img, pair in zip(images, chunk):
            if pair in keep:
                grid[pair] = img
        bar.update(len(chunk))
    res = JobResult(job, time.perf_counter() - t0, np.array([i for i, _ in pairs]), np.array([sd for _, sd in pairs]))
    if judge is not None:
        res.style, res.adherence = np.concatenate(style), np.concatenate(adher)
        res.features = np.concatenate(feats)
    if grid:
        res.images = {pair: torch.as_tensor(img) for pair, img in grid.items()}
    return res


def run_compare(cfg: CompareConfig, toolkit: Toolkit | None = None, root: str | Path | None = None,
                preface: str = "") -> CompareResult:
    """Run the whole comparison and write its outputs to `cfg.output.dir`. Relative LoRA/reference paths resolve
    against `root` (the config file's folder for `dev2pro compare`; None: the working directory)."""
    t0 = time.perf_counter()
    root = Path(root) if root is not None else None
    out = Path(cfg.output.dir)
    out = root / out if root is not None and not out.is_absolute() else out
    out.mkdir(parents=True, exist_ok=True)
    toolkit = toolkit if toolkit is not None else FluxToolkit(cfg.models)
    for x in cfg.loras:
        _resolve(x.path, root)
    checkpoints = {x.name: find_checkpoints(x.checkpoints, root) for x in cfg.loras} if cfg.curves else {}
    judge = toolkit.judge(cfg.metrics)
    ref_features = None
    if judge is not None and cfg.metrics.reference:
        ref_dir = Path(cfg.metrics.reference)
        ref_dir = root / ref_dir if root is not None and not ref_dir.is_absolute() else ref_dir
        ref_features = reference_features(judge, ref_dir, cfg.metrics.reference_limit,
                                          (cfg.sampling.height, cfg.sampling.width))
        if hasattr(judge, "set_reference"):
            judge.set_reference(ref_features)
    jobs = plan_jobs(cfg, checkpoints)
    results = run_jobs(cfg, jobs, checkpoints, toolkit, judge, root)
    for r in results:
        summarize(r, ref_features, judge, cfg.metrics)
    add_response(cfg, results)
    main, sweep, curves = collect(cfg, results)
    pooled = pool(cfg, main, sweep, curves, cfg.metrics.level) if cfg.grouped else None
    res = CompareResult(cfg, results, main, sweep, curves, None, {}, 0.0, pooled=pooled)
    vmain, vsweep, vcurves, rows = res.view()

    if cfg.claim.lora and judge is not None:
        among = set(cfg.claim.among or rows)
        cells = {k: {c: e for c, e in d.items() if c[0] in among} for k, d in vmain.items()}
        res.verdict = claim_verdict(cells, (cfg.claim.lora, cfg.claim.base), cfg.claim.metric,
                                    lambda c: f"trained on {cfg.label(c[0])}, applied to {c[1]}")
    grid_rows = {names[0]: cfg.label(g) for g, names in cfg.groups().items()} if pooled else row_labels(cfg)
    for name, fn in (
        ("grid", lambda p: save_grid(cfg, results, p, grid_rows)),
        ("bars", lambda p: plot_bars(cfg, vmain, p, rows)),
        ("sweep", lambda p: plot_lines(cfg, vsweep, "guidance", p, rows)),
        ("curves", lambda p: plot_lines(cfg, vcurves, "training step", p, rows)),
    ):
        p = fn(out / f"{name}.png")
        if p is not None:
            res.files[name] = p.name
    res.seconds = time.perf_counter() - t0
    write_results_json(res, out)
    res.files["report"] = write_report(res, out, preface).name
    res.files["results"] = "results.json"
    return res
