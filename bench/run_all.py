"""Run every CPU benchmark side by side and write docs/benchmarks.md (command, machine, date, one section each).

    .venv/bin/python bench/run_all.py            # full sizes (tens of minutes on a 2-core CPU)
    .venv/bin/python bench/run_all.py --quick    # tiny sizes, a smoke run (results not meaningful)

bench/gpu_lora_step.py is separate: it needs a CUDA GPU (see its docstring).
"""

from __future__ import annotations

import datetime
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common, convert_rss, fp8_error, lora_memory, sampling_speed, sharded_rss, train_step  # noqa: E402

BENCHES = [("a", train_step), ("b", lora_memory), ("c", fp8_error), ("d", convert_rss), ("e", sampling_speed),
           ("f", sharded_rss)]

GPU_NOTE = """## GPU: `bench/gpu_lora_step.py`

Real-size random-init FLUX.1-dev transformer (no download; built on meta, cast to bf16, materialised on the GPU),
LoRA rank 16 (attention), 512 and 1024 px, batch 1, gradient checkpointing, bf16 autocast. Variants
`base[+swapN][+compile]`: bases `bf16`, `fp8` (dequantize + bf16 matmul), `fp8-mm` (train.fp8_matmul: `_scaled_mm`
forward, bf16 input gradient), `fp8-mm-e5m2` (input gradient through `_scaled_mm` too); `swapN` = train.blocks_to_swap,
`compile` = train.compile. Reported: steps/s, `torch.cuda.max_memory_allocated`, plan-memory's estimate, TFLOP per
step (forward + input-gradient backward, no recompute) and MFU against `--peak-tflops` (989: H100/H200 dense bf16).
Commands (each under the 10-minute limit of one call; the default variant list is
`bf16,bf16+compile,fp8,fp8-mm,fp8-mm+compile,fp8-mm-e5m2+compile,fp8-mm+swap20`):
`.venv/bin/python bench/gpu_lora_step.py --resolutions 512 --out docs/gpu_lora_step_512.md` and
`.venv/bin/python bench/gpu_lora_step.py --resolutions 1024 --bases fp8-mm+swap10,fp8-mm+swap20,bf16,fp8-mm+compile
--out docs/gpu_lora_step_1024.md`.
**Not run yet**: no H100/H200 was lent to the sessions that wrote these benchmarks. The script was checked
on the CPU with `--preset tiny-dev --device cpu --steps 2` (tests/test_bench_smoke.py)."""


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    common.one_thread()
    only = [a for a in argv if not a.startswith("--")]
    out = REPO / "docs" / "benchmarks.md"
    for i, a in enumerate(argv):
        if a == "--out":
            out = Path(argv[i + 1])
            only = [x for x in only if x != argv[i + 1]]
    sections = []
    for key, mod in BENCHES:
        if only and key not in only:
            continue
        t = time.perf_counter()
        try:
            body = mod.run(quick=quick)
        except Exception:  # a failing bench is reported, not hidden
            body = f"## {key}. {mod.__name__}\n\nFAILED:\n\n```\n{traceback.format_exc()[-3000:]}\n```"
        sections.append(body + f"\n\n_({time.perf_counter() - t:.0f} s)_")
        print(sections[-1], flush=True)
    head = ["# Benchmarks", "",
            f"Command: `.venv/bin/python bench/run_all.py{' --quick' if quick else ''}`  ",
            f"Machine: {common.machine()}  ",
            f"Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}", "",
            "Each goal is stated with its section and reported as measured, met or not. The CPU is shared with other "
            "jobs, so absolute times are noisy; ratios are measured side by side in one run. Every bench runs torch "
            "with one intra-op thread (`torch.set_num_threads(1)`, `OMP_NUM_THREADS=1`, `MKL_NUM_THREADS=1`): on the "
            "shared 2-core CPU two threads were 10-25x slower than one whenever another process was running.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head) + "\n\n".join(sections + [GPU_NOTE]) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
