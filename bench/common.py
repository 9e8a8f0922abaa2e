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

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def one_thread() -> None:
    """Benchmarks run torch with one intra-op thread: on the shared 2-core CPU two threads were measured 10-25x
    slower than one whenever another process was running (the threads wait on each other at every op)."""
    import torch

    os.environ.update(ONE_THREAD_ENV)  # inherited by the subprocesses the benches start
    torch.set_num_threads(1)


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


_VM = ("def _vm(key):\n"
       "    with open('/proc/self/status') as f:\n"
       "        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ':'))\n")


def peak_rss_of(code: str, setup: str = "", env: dict | None = None, timeout: float = 900) -> tuple[int, int, str]:
    """Run `setup` then `code` in a fresh Python; return (peak RSS of the whole process in bytes, RSS after `setup`
    in bytes, stdout). Peak is /proc/self/status VmHWM, not getrusage: ru_maxrss survives exec, so a child of a
    large parent reports the parent's RSS (the child starts as a copy of the parent's address space until exec).
    After `setup` the high-water mark is reset (`/proc/self/clear_refs` 5) so an import-time transient does not hide
    the peak of `code`; the reported peak is max(RSS after setup, peak during code)."""
    wrapper = (_VM + setup + "\n_base = _vm('VmRSS')\n"
               "with open('/proc/self/clear_refs', 'w') as _f:\n    _f.write('5')\n"
               + code + "\nprint('PEAK_RSS_B', max(_base, _vm('VmHWM')), _base)\n")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **ONE_THREAD_ENV, **(env or {})})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    line = next(line for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_B"))
    return int(line.split()[1]), int(line.split()[2]), out.stdout


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(met: bool, text: str) -> str:
    return f"**Goal {'met' if met else 'NOT met'}**: {text}"


MiB = 2**20
