"""Checkpoints with exact resume: folders `checkpoint-<step>` holding the trainable weights, the optimizer state, the
RNG states (torch, numpy, python, the objective's generator; per rank), the data sampler's position, the resolved
config and recipe extras (e.g. EMA weights). Everything is safetensors or JSON; no pickle anywhere.

- The *full* (unsharded) state keyed by parameter name, through `torch.distributed.checkpoint.state_dict` (which also
  gathers FSDP2 shards), so a checkpoint written by N processes resumes in M.
- Written under a temporary name and renamed when complete (`state.json` last), so `checkpoint-<step>` folders are
  always whole; a full disk leaves the previous one intact and stops with one line.

Pitfall: Python's and numpy's RNG states are saved too (LoRA dropout and peft use torch's global RNG); a rank that did
not exist when the checkpoint was written gets rank 0's generator state (the objective's draws are global, see
`dev2pro.train.distributed`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dev2pro.errors import UserError
from dev2pro.train.distributed import is_fsdp

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path | None) -> Path | None:
    found = list_checkpoints(out_dir) if out_dir is not None else []
    return found[-1][1] if found else None


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def gather_train_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Full trainable weights and optimizer state keyed by parameter name (collective under FSDP2: call on every
    rank; rank 0 receives the tensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_sd_options())
    return msd, osd


def _flatten_optim(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat `param::key[::subkey...]` tensors and JSON scalars (bitsandbytes nests its
    quantization state in a dict per parameter)."""
    tensors, scalars, seen = {}, {}, set()

    def put(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                put(f"{prefix}::{k}", x)
        elif torch.is_tensor(v):
            t = v.detach().cpu().contiguous()
            if t.untyped_storage().data_ptr() in seen:  # shared (bitsandbytes' qmaps): safetensors wants copies
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[prefix] = t
        else:
            scalars[prefix] = v

    for name, st in osd.get("state", {}).items():
        put(str(name), st)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in [*tensors.items(), *meta.get("scalars", {}).items()]:
        name, *path = key.split("::")  # parameter names hold dots, never "::"
        node = state.setdefault(name, {})
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state(generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict]:
    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if generator is not None:
        tensors["generator"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, pstate, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(pstate), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generator: torch.Generator | None) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch"])
    if generator is not None and "generator" in tensors:
        generator.set_state(tensors["generator"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states and len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pstate, gauss = meta["python"]
    random.setstate((version, tuple(pstate), gauss))


def save_checkpoint(out_dir: Path, step: int, accelerator, model, optimizer, *, generator: torch.Generator,
                    sampler=None, config_toml: str = "", extra_tensors: dict[str, torch.Tensor] | None = None,
                    extra_state: dict | None = None, keep_last: int = 2) -> Path:
    """Write `out_dir/checkpoint-<step>` atomically (temp folder, then rename) and delete all but the last
    `keep_last`. Holds trainable weights, optimizer state, RNG states (torch/numpy/python/generator, per rank),
    sampler state, step, the resolved config and recipe extras (e.g. EMA weights). Collective: call on every rank.
    A full disk (OSError) leaves earlier checkpoints intact and raises one line."""
    from safetensors.torch import save_file

    msd, osd = gather_train_state(model, optimizer)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    rank = accelerator.process_index
    try:
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rng_t, rng_meta = rng_state(generator)
        save_file(rng_t, str(tmp / f"rng-{rank}.safetensors"))
        (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_meta))
        (tmp / f"sampler-{rank}.json").write_text(json.dumps(sampler.state_dict() if sampler is not None else None))
        if accelerator.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in msd.items()}, str(tmp / "trainable.safetensors"))
            opt_t, opt_meta = _flatten_optim(osd)
            save_file(opt_t, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
            if extra_tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()},
                          str(tmp / "extra.safetensors"))
            (tmp / "config.toml").write_text(config_toml)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "world_size": accelerator.num_processes, "time": time.time(),
                     "distributed": ("fsdp2" if is_fsdp(model) else "ddp") if accelerator.num_processes > 1 else "none",
                     **(extra_state or {})}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(out_dir)
        raise UserError(f"could not write checkpoint {final} ({e.strerror or e}); "
                        f"{'previous ' + prev.name + ' is intact' if prev else 'no earlier checkpoint'}; "
                        "free disk space and resume with --resume") from None
    return final


@dataclass
class Resumed:
    step: int
    path: Path
    extra_tensors: dict[str, torch.Tensor]
    state: dict


def load_checkpoint(path: Path, accelerator, model, optimizer, *, generator: torch.Generator,
                    sampler=None) -> Resumed:
    """Restore what `save_checkpoint` wrote into a freshly set-up model/optimizer (any number of processes). RNG
    states are restored for this rank when the checkpoint has them; a rank that did not exist when it was written
    gets rank 0's generator state (the objective's draws are global, see the module docstring)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = json.loads((path / STATE_FILE).read_text())
    msd = load_file(str(path / "trainable.safetensors"))
    osd = _unflatten_optim(load_file(str(path / "optimizer.safetensors")),
                           json.loads((path / "optimizer.json").read_text()))
    for group, saved in zip(optimizer.param_groups, osd["param_groups"]):  # keys an optimizer adds on its first
        for k, v in saved.items():  # step (Prodigy's d_denom, ...) must exist before torch maps the saved groups
            if k != "params":
                group.setdefault(k, v)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_sd_options(strict=False))
    rank = accelerator.process_index
    rank_file = path / f"rng-{rank}.safetensors"
    if not rank_file.exists():
        rank, rank_file = 0, path / "rng-0.safetensors"
    set_rng_state(load_file(str(rank_file)), json.loads((path / f"rng-{rank}.json").read_text()), generator)
    if sampler is not None:
        sampler_state = json.loads((path / f"sampler-{rank}.json").read_text())
        if sampler_state is not None:
            sampler.load_state_dict(sampler_state)
    extra = path / "extra.safetensors"
    return Resumed(step=int(state["step"]), path=path, state=state,
                   extra_tensors=load_file(str(extra)) if extra.exists() else {})


def find_resume(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (`--resume`), or None for a fresh run. `--resume` with no complete checkpoint
    yet (a run stopped before its first save) starts from step 0 with a note; a fresh run into a folder that already
    holds checkpoints is refused so two runs never interleave."""
    import sys

    latest = latest_checkpoint(out_dir)
    if resume:
        if latest is None:
            print(f"--resume: no complete checkpoint-<step> folder in {out_dir}: starting from step 0",
                  file=sys.stderr)
        return latest
    if latest is not None:
        raise UserError(f"{out_dir} already holds {latest.name}; pass --resume to continue it or choose a new "
                        "output.dir")
    return None
