"""Shared helpers for the benchmark scripts: timing, peak RSS of a subprocess, machine description, markdown tables.

Every script exposes `run(quick: bool) -> str` (a markdown section: goal, command, table, verdict) and can be run on
its own; `bench/run_all.py` runs them side by side and writes docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}, Python {platform.python_version()}")


def timed(fn, *args, repeat: int = 1, warmup: int = 0, **kw) -> float:
    """Best wall time of `repeat` calls after `warmup` calls (seconds)."""
    for _ in range(warmup):
        fn(*args, **kw)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args, **kw)
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_of(code: str, env: dict | None = None, timeout: float = 900) -> tuple[int, str]:
    """Run `code` in a fresh Python; return (peak RSS in bytes from getrusage, stdout)."""
    wrapper = code + ("\nimport resource, sys\n"
                      "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    kib = next(int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return kib * 1024, out.stdout


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(met: bool, text: str) -> str:
    return f"**Goal {'met' if met else 'NOT met'}**: {text}"


MiB = 2**20
