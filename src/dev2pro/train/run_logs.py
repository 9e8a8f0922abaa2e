"""A run's output folder and logs: `output.dir` checked writable at start (one line, not a crash at the first save)
and, with several processes, shared by all of them (`check_shared_dir`),
scalars to a CSV and TensorBoard from the main process (`RunLog`), the progress bar, and the end of a run.

Pitfall: on resume the CSV drops the rows after the resumed step (and TensorBoard purges them), so the log is one
consistent history rather than two interleaved ones.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dev2pro.errors import UserError


def prepare_output_dir(path: str | Path, accelerator=None) -> Path:
    """Create `output.dir` and check it is writable (and shared by all processes when `accelerator` is given): one
    line at start instead of a crash or a hang at the first save."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir '{out}' is not writable ({e.strerror or e}); choose another output.dir") from None
    if accelerator is not None:
        check_shared_dir(out, accelerator)
    return out


def check_shared_dir(out: Path, accelerator) -> None:
    """With several processes: rank 0 writes a token file into `out`, the others look for it after a barrier. Sharded
    checkpoints (every rank writes its shard into one folder that rank 0 then renames) and the final export (rank 0
    reads every shard) need one folder all processes see; a node-local `output.dir` would otherwise hang or lose
    shards at the first checkpoint. Collective."""
    if accelerator.num_processes == 1:
        return
    import secrets

    import torch
    import torch.distributed as dist

    nonce = [secrets.token_hex(8) if accelerator.is_main_process else None]
    dist.broadcast_object_list(nonce, src=0)
    token = out / f".shared-check-{nonce[0]}"
    if accelerator.is_main_process:
        token.write_text("written by process 0 to check that output.dir is shared\n")
    accelerator.wait_for_everyone()
    seen = accelerator.gather(torch.tensor([float(token.exists())], device=accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        token.unlink(missing_ok=True)
    missing = [r for r, v in enumerate(seen) if v == 0.0]
    if missing:
        raise UserError(f"output.dir '{out}' is not shared: process(es) {missing} do not see the file process 0 wrote "
                        "there; set output.dir to a folder every node mounts (NFS, Lustre, a cloud file store), as "
                        "checkpoints and the final export need one shared folder")


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
