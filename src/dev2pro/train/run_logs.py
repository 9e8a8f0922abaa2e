"""A run's output folder and logs: `output.dir` checked writable at start (one line, not a crash at the first save),
scalars to a CSV and TensorBoard from the main process (`RunLog`), the progress bar, and the end of a run.

Pitfall: on resume the CSV drops the rows after the resumed step (and TensorBoard purges them), so the log is one
consistent history rather than two interleaved ones.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dev2pro.errors import UserError


def prepare_output_dir(path: str | Path) -> Path:
    """Create `output.dir` and check it is writable: one line at start instead of a crash at the first save."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir '{out}' is not writable ({e.strerror or e}); choose another output.dir") from None
    return out


class RunLog:
    """Scalars to TensorBoard (`<dir>/tb`) and to a CSV (`<dir>/<name>.csv`), main process only. Rows are appended
    (the file is rewritten only when a new column appears, e.g. the first time a t bucket is seen, so long runs stay
    cheap); missing values are empty cells. On resume, rows after the resumed step are dropped so the CSV is one
    consistent history."""

    def __init__(self, out_dir: Path, enabled: bool, name: str = "log", resume_step: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = out_dir / f"{name}.csv"
        self.writer = None
        self._rows: list[dict] = []
        self._keys: list[str] = ["step"]
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self._keys = list(reader.fieldnames or ["step"])
                self._rows = [r for r in reader if int(float(r["step"])) <= resume_step]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step)
            except ImportError:  # tensorboard is a dependency; keep training if an install lacks it
                self.writer = None
        self._rewrite()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        row = {"step": step, **scalars}
        self._rows.append(row)
        new = [k for k in row if k not in self._keys]
        if new:
            self._keys += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._keys, restval="").writerow(row)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._keys, restval="")
            w.writeheader()
            w.writerows(self._rows)
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def open_run_logs(out_dir: Path, accelerator, resume_step: int | None, monitor: bool) -> tuple[RunLog, RunLog | None]:
    """The run's `log.csv` (+ TensorBoard) and, when the guidance monitor is on, `monitor.csv`."""
    log = RunLog(out_dir, accelerator.is_main_process, resume_step=resume_step)
    mon = RunLog(out_dir, accelerator.is_main_process, name="monitor", resume_step=resume_step,
                 tensorboard=False) if monitor else None
    return log, mon


def end_run(accelerator, log: RunLog) -> None:
    """Wait for every process, flush the logs, release accelerate's process-wide state."""
    accelerator.wait_for_everyone()
    log.close()
    accelerator.end_training()


def progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)
