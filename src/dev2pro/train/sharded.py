"""Sharded training state of the full fine-tunes (dedistill, distill, train-base) through `torch.distributed.checkpoint`
(DCP): model weights, AdamW state and EMA written by every rank as its own pieces, read back by every rank as the
pieces it owns now (DCP re-slices, so N processes resume on M), and the final model exported by streaming from them.

Storage is the layout of DCP's safetensors storage (`HuggingFaceStorageWriter(save_distributed=True)`): rank r writes
`shard-<r+1>-model-00001-of-00001.safetensors` holding its slices (keys `model.<name>`, `optim.<name>.<state>`,
`ema.<name>`, offsets in the header's `DCP_SHARDING_INFO`), so nothing is pickled and every file is readable by
`dev2pro.flux.sharded_source`. We write it ourselves, tensor by tensor (`save_shards`); DCP reads it back
(`dcp.load` with `HuggingFaceStorageReader`), re-slicing for the current process layout.
Only tensors are stored: AdamW's param groups (lr, betas, ...) are rebuilt from the config (the LR is a pure function of
the step, `dev2pro.train.optim.set_lr`), the step counters are tensors.

Memory: saving and loading touch only this rank's slices (DTensor local shards under FSDP2); no rank ever holds a full
model, optimizer or EMA. The export (`export_final`) runs on the main process and reads one tensor group at a time.

Pitfall: the loader needs the optimizer state to exist (`get_state_dict` initialises it with a zero-LR step on a fresh
optimizer; its values are then overwritten by the checkpoint's).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dev2pro.flux.sharded_source import CONFIG_FILE, SHARDING_KEY, ShardedSource
from dev2pro.train.config import OutputConfig
from dev2pro.train.distributed import save_model, unwrap

FINAL_TMP = ".final-shards"


def _no_dist() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def train_state(model, optimizer=None, ema=None, weights: bool = True) -> tuple[dict, dict | None]:
    """The tensors DCP saves/loads, as views of this rank's live state: {"model": ..., "optim": {name: {exp_avg,
    exp_avg_sq, step}}, "ema": ...} (DTensors under FSDP2), and the optimizer's own state dict (its param groups)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state, osd = {}, None
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state["optim"] = {n: {k: v for k, v in st.items() if torch.is_tensor(v)} for n, st in osd["state"].items()}
    else:
        msd = get_model_state_dict(model) if weights else None
    if weights:
        state["model"] = msd
    if ema is not None:
        state["ema"] = ema.shadow
    return state, osd


def write_config(folder: Path, model) -> None:
    """The model's diffusers config next to the shards (what `ShardedSource` reads the architecture from)."""
    import json

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unwrap(model).config).items()
           if not k.startswith("_")}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))


def _flatten(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """DCP's flat keys: nested dict keys joined with '.' (`optim.<name>.exp_avg`)."""
    flat = {}
    for k, v in state.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        flat.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return flat


def _my_slice(t: torch.Tensor, rank: int) -> tuple[torch.Tensor, list[int]] | None:
    """(this rank's piece, its offset in the full tensor), or None when another rank writes it: a DTensor replica
    is written by coordinate 0 of each replicated mesh dimension, a plain (replicated) tensor by rank 0."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return (t, [0] * t.ndim) if rank == 0 else None
    coord = t.device_mesh.get_coordinate()
    if coord is None or any(isinstance(p, Replicate) and c != 0 for p, c in zip(t.placements, coord)):
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local()
    if local.numel() == 0:
        return None
    return local.reshape(shape), list(offset)


def save_shards(path: Path, model, optimizer=None, ema=None, weights: bool = True) -> None:
    """Every rank writes its slices of the model (and optimizer, EMA) into `path/shard-<rank+1>-...safetensors`, in
    the layout of DCP's safetensors storage (`DCP_SHARDING_INFO` offsets; read back by `HuggingFaceStorageReader`).
    Written tensor by tensor after a header planned from the shapes (`StreamWriter`), so a save holds one tensor's
    host copy at a time (torch's own writer keeps a copy of everything until the file is closed). Collective."""
    import json

    import torch.distributed as dist

    from dev2pro.flux.safetensors_io import StreamWriter

    rank = dist.get_rank() if not _no_dist() else 0
    state, _ = train_state(model, optimizer, ema, weights=weights)
    mine = {k: s for k, t in _flatten(state).items() if (s := _my_slice(t, rank)) is not None}
    if mine:
        path.mkdir(parents=True, exist_ok=True)
        entries = [(k, t.dtype, tuple(t.shape)) for k, (t, _) in mine.items()]
        info = {k: {"saved_offsets": off} for k, (_, off) in mine.items()}
        writer = StreamWriter(path / f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors", entries,
                              {"format": "pt", SHARDING_KEY: json.dumps(info), "DCP_VERSION": "1.0"})
        try:
            for k, (t, _) in mine.items():
                writer.write(k, t.detach())
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        writer.commit()
    if not _no_dist():
        dist.barrier()


def load_shards(path: Path, model, optimizer, ema=None) -> None:
    """Every rank reads the slices it owns now of what `save_shards` wrote, with any number of writers (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state, osd = train_state(model, optimizer, ema)
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=_no_dist())
    for name, st in state["optim"].items():
        osd["state"][name].update(st)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=osd)


def export_final(accelerator, model, out_dir: Path, output: OutputConfig, config_toml: str, *, ema=None,
                 checkpoint: Path | None = None, metadata: dict | None = None) -> Path:
    """Write `<out_dir>/<name>.safetensors` (BFL, `output.dtype`) by streaming from sharded weights: the run's final
    `checkpoint` when there is one, else a weights-only shard folder written now and deleted after. The EMA weights
    are exported when `ema` is kept; `metadata` goes into the file (e.g. `dev2pro.base_kind`). Only the main process
    reads, one tensor group at a time. Collective."""
    source_dir = checkpoint
    if source_dir is None:
        source_dir = out_dir / FINAL_TMP
        if accelerator.is_main_process:
            shutil.rmtree(source_dir, ignore_errors=True)
            source_dir.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_shards(source_dir, model, ema=ema, weights=ema is None)
        if accelerator.is_main_process:
            write_config(source_dir, model)
    accelerator.wait_for_everyone()
    final = out_dir / f"{output.name}.safetensors"
    if accelerator.is_main_process:
        src = ShardedSource(source_dir, prefix="ema" if ema is not None else "model")
        try:
            save_model(src, final, output, metadata)
        finally:
            src.close()
        (out_dir / f"{output.name}.toml").write_text(config_toml)
        if checkpoint is None:
            shutil.rmtree(source_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
