"""Bench f: host memory per process of a full fine-tune's start, checkpoint and export under FSDP2 on the CPU
(`dev2pro.train.fsdp.load_for_training`, `dev2pro.train.sharded`).

A `flux-mid` BFL file in bf16 is written once. Then (1) the runtime alone, (2) the old start: the whole model loaded
in fp32 by one process (what every rank did before sharding), and (3) `torchrun --nproc_per_node N` of this file's
worker: each rank builds the model on meta, shards it (FSDP2, gloo), and copies in only its slice of each tensor as
the file is streamed group by group (after a warm-up load of a tiny model, so lazy imports and the process group are
in the baseline); then writes a DCP checkpoint with AdamW state (save), and rank 0 exports the BFL
file from the shards (export). Peaks are VmHWM of each process, reset after imports and between stages (as
`bench.common.peak_rss_of`). Goal: each rank's load peak above baseline <= 1.2 x (fp32 model / N) + 2 x the largest
tensor group in fp32 (the streamed group and its fp32 copy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import _VM, ONE_THREAD_ENV, MiB, one_thread, peak_rss_of, table, verdict

GOAL = 1.2
IMPORTS = ("import torch, diffusers, safetensors.torch, accelerate\n"
           "import dev2pro.flux.checkpoint, dev2pro.train.fsdp, dev2pro.train.sharded\n"
           "dev2pro.flux.checkpoint.load_transformer('preset:tiny-dev@0')\n")  # diffusers' lazy imports
HERE = Path(__file__).resolve()


def _worker(src: str, out: str) -> None:
    """One rank: load sharded, save a DCP checkpoint with optimizer state, export (rank 0); print the peaks."""
    exec(_VM, globals())
    import torch

    import dev2pro.train.sharded  # noqa: F401  (imports before the baseline, as the other processes)
    from dev2pro.train.config import DistributedConfig, OutputConfig, TrainConfig
    from dev2pro.train.distributed import setup_accelerator
    from dev2pro.train.fsdp import load_for_training
    from dev2pro.train.optim import make_optimizer
    from dev2pro.train.sharded import export_final, save_shards

    torch.set_num_threads(1)
    train = TrainConfig(steps=1, device="cpu")
    acc = setup_accelerator(train)

    def stage() -> int:
        peak = _vm("VmHWM")  # noqa: F821 (defined by _VM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak

    load_for_training("preset:tiny-dev@0", acc, DistributedConfig(strategy="fsdp2"), train)  # lazy imports, gloo
    base = _vm("VmRSS")  # noqa: F821
    stage()
    model = load_for_training(src, acc, DistributedConfig(strategy="fsdp2"), train)
    load = stage()
    opt = make_optimizer(model.parameters(), train)
    for p in model.parameters():  # one optimizer step as in training: gradients + AdamW moments (sharded)
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    step = stage()
    (Path(out) / "ckpt").mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    save_shards(Path(out) / "ckpt", model, opt)
    save = stage()
    del opt
    export_final(acc, model, Path(out), OutputConfig(dir=out, dtype="bf16"), "")
    export = stage()
    print("RANK_PEAKS", json.dumps({"rank": acc.process_index, "base": base, "load": load, "step": step,
                                    "save": save, "export": export}), flush=True)


def measure(preset: str, folder: Path, nproc: int = 2) -> dict:
    import torch

    from dev2pro.flux import checkpoint, keymap, models
    from dev2pro.flux.safetensors_io import numel
    from dev2pro.flux.sources import open_source

    src = folder / "model-bf16.safetensors"
    spec = models.PRESETS[preset]
    checkpoint.save_transformer(models.random_transformer(spec, seed=0), src, dtype=torch.bfloat16)
    with_header = open_source(src)
    shapes = with_header.shapes()
    with_header.close()
    groups = keymap.plan_bfl_to_diffusers(list(shapes), spec.hidden_size)
    largest = max(sum(numel(shapes[k]) for k in g.inputs) for g in groups) * 4
    base, _, _ = peak_rss_of("torch.zeros(1)", setup=IMPORTS)
    full, _, _ = peak_rss_of(f"m = dev2pro.flux.checkpoint.load_transformer({str(src)!r}, dtype=torch.float32)",
                             setup=IMPORTS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 2000), str(HERE), "--worker", str(src), str(folder / "run")]
    path = os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, **ONE_THREAD_ENV, "PYTHONPATH": path})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    ranks = sorted((json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines()
                    if line.startswith("RANK_PEAKS")), key=lambda d: d["rank"])
    return {"baseline": base, "full": full, "ranks": ranks, "model_fp32": spec.num_params() * 4,
            "largest_group": largest, "nproc": nproc, "file": src.stat().st_size}


def run(quick: bool = False) -> str:
    one_thread()
    preset = "tiny-dev" if quick else "flux-mid"
    with tempfile.TemporaryDirectory() as d:
        r = measure(preset, Path(d))
    n, base = r["nproc"], r["baseline"]
    bound = GOAL * r["model_fp32"] / n + 2 * r["largest_group"]
    rows = [["runtime baseline (imports), 1 process", base / MiB, "", ""],
            ["old start: whole model in fp32 (every rank)", r["full"] / MiB, (r["full"] - base) / MiB, ""]]
    for k in r["ranks"]:
        b = k["base"]
        rows += [[f"rank {k['rank']}/{n}: load into FSDP2 shards", k["load"] / MiB, (k["load"] - b) / MiB,
                  bound / MiB],
                 [f"rank {k['rank']}/{n}: + one AdamW step (grads, moments)", k["step"] / MiB,
                  (k["step"] - b) / MiB, ""],
                 [f"rank {k['rank']}/{n}: DCP save (model + AdamW)", k["save"] / MiB, (k["save"] - b) / MiB, ""],
                 [f"rank {k['rank']}/{n}: export from the shards" + (" (reads)" if k["rank"] == 0 else ""),
                  k["export"] / MiB, (k["export"] - b) / MiB, ""]]
    worst = max(k["load"] - k["base"] for k in r["ranks"])
    return "\n\n".join([
        "## f. Host memory per process: sharded start, DCP checkpoint, streamed export (FSDP2 on CPU)",
        f"Model `{preset}`: {r['model_fp32'] / MiB:.0f} MiB in fp32 (file {r['file'] / MiB:.0f} MiB, bf16), "
        f"largest tensor group {r['largest_group'] / MiB:.1f} MiB in fp32; {n} processes (torchrun, gloo). "
        "Peaks are VmHWM of each process, reset after imports and between stages. Goal: load peak above baseline "
        f"<= {GOAL} x model / {n} + 2 x largest group.",
        table(["process / stage", "peak RSS (MiB)", "above baseline (MiB)", "bound (MiB)"], rows),
        verdict(worst <= bound, f"worst rank loads with {worst / MiB:.0f} MiB above baseline vs bound "
                f"{bound / MiB:.0f} MiB, against {(r['full'] - base) / MiB:.0f} MiB for the whole model. The step "
                "adds the shard's gradients and AdamW moments (3 x the shard); the DCP save writes one tensor at a "
                "time and the export (rank 0) reads one tensor group at a time, so each stays near the memory the "
                "process already holds (peaks are reset to the current RSS between stages, which still counts "
                "freed gradients the allocator kept)."),
    ])


if __name__ == "__main__":
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        _worker(sys.argv[i + 1], sys.argv[i + 2])
    else:
        print(run(quick="--quick" in sys.argv))
