"""Sharded caches for large datasets: written once by `dev2pro cache`, streamed by trainers rank by rank.

Layout of OUT (one bucket per shard, so every batch drawn from a shard stacks):
    dataset.json              format, encoder identities, resolution, and one line per shard (name, bucket, count)
    shard-000000.safetensors  latents (n, C, h, w) float32, txt (n, seq, ctx), pooled (n, vec)
    shard-000000.json         the shard's manifest: bucket, count, keys, captions, source images (relative paths)
No per-item index is ever loaded as a whole: a stream opens one shard at a time (safetensors is memory-mapped and read
row by row), and only the shard list (a few bytes per shard) is global.

Writing: items are sorted by (bucket, path) and cut into shards of at most `shard_size` items per bucket, so shard i's
content is a pure function of the data folder; a rerun keeps every shard whose manifest already lists the same keys
(content hash + encoder identities + bucket + crop), which makes an interrupted `dev2pro cache` resumable. Shards hold
one version of each image (the centre crop, or one fixed random crop) and ignore `repeats`: at scale the stream's
epochs replace them. Parallel writing (`process_index` I of `num_processes` N, one slice per process): process I
encodes shards I, I + N, ... of the plan, so the files are byte-identical to a one-process run; dataset.json is written
once every shard is complete: after `barrier` by process 0 when there is a process group, else by whichever process
finds every shard's manifest complete when it is done (the last to finish; atomically, so two writers are harmless).

Streaming (`ShardStream`): epoch e shuffles the shard list with `random.Random(f"{seed}:{e}")`, rank r takes shards
r, r + W, r + 2W, ... of that order (disjoint across ranks, every shard once per epoch), and reads each in a shuffled
order in batches of `batch_size` (a shard's incomplete last batch is dropped). The stream is endless: ranks never wait
for each other at epoch ends (step-based training). State is (epoch, shard position, batch position): exact resume.
Reference: WebDataset-style shard-per-worker assignment; torch DistributedSampler for the disjointness rule.
Pitfalls: real Flux text embeddings are big (512 x 4096 values per caption: 4 MiB in bf16), so choose the shard size
for the file size you want (256 items ~ 1 GiB); with fewer shards than ranks some rank would have no data (an error).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from dev2pro.data.cache import latent_key, save_atomic, text_key, variant_params
from dev2pro.data.folders import DatasetIndex, load_image
from dev2pro.errors import DataError

SHARD_FORMAT = "dev2pro-shards-1"
INDEX_FILE = "dataset.json"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def plan_shards(index: DatasetIndex, shard_size: int) -> list[list]:
    """Items grouped by bucket (sorted by bucket, then path) and cut into shards of at most `shard_size`."""
    by_bucket: dict[tuple[int, int], list] = {}
    for it in sorted(index.items, key=lambda it: (it.bucket, str(it.path))):
        by_bucket.setdefault(it.bucket, []).append(it)
    return [items[s : s + shard_size] for b in sorted(by_bucket) for items in [by_bucket[b]]
            for s in range(0, len(items), shard_size)]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # per process: parallel writers never share a temp file
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _shard_complete(out: Path, name: str, keys: list[str]) -> bool:
    try:
        manifest = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        if manifest.get("keys") != keys:
            return False
        with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
            return all(f.get_slice(k).get_shape()[0] == len(keys) for k in ("latents", "txt", "pooled"))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return False
    except Exception:  # safetensors' own error for damaged files
        return False


def write_shards(
    index: DatasetIndex,
    ae,
    text,
    out_dir: str | Path,
    *,
    shard_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    barrier=None,
) -> dict:
    """Encode `index` into shards under `out_dir` (this process's slice: shards `process_index`, + `num_processes`,
    ...); returns the dataset.json content plus counts of work done and `complete` (whether dataset.json was written
    by this call). `barrier` (a process group's): wait for every process, then process 0 writes dataset.json."""
    from tqdm import tqdm

    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be at least 1")
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise DataError(f"--process-index {process_index} --num-processes {num_processes}: the index must be in "
                        f"0..{num_processes - 1}")
    cfg = index.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(index, shard_size)
    root = Path(cfg.dir)
    shards, all_keys, written, kept = [], [], 0, 0
    mine = sum(len(items) for i, items in enumerate(plan) if i % num_processes == process_index)
    with tqdm(total=mine, desc="writing shards", unit="img", disable=not progress) as bar:
        for i, items in enumerate(plan):
            name = shard_name(i)
            keys = [latent_key(it, ae.identity, cfg.crop, 0) + ":" + text_key(it.caption, text.identity)[:16]
                    for it in items]
            shards.append({"name": name, "bucket": list(items[0].bucket), "count": len(items)})
            all_keys.append(keys)
            if i % num_processes != process_index:
                continue
            if _shard_complete(out, name, keys):
                kept += 1
                bar.update(len(items))
                continue
            lat, txt, pooled = [], [], []
            for s in range(0, len(items), batch_size):
                chunk = items[s : s + batch_size]
                images = []
                for it in chunk:
                    rng, _ = variant_params(it, 0, cfg.crop, False)
                    images.append(load_image(it, it.bucket, cfg.crop, rng))
                with torch.inference_mode():
                    lat.append(ae.encode(torch.stack(images).to(device=device, dtype=dtype)).float().cpu())
                    t, p = text.encode([it.caption for it in chunk])
                txt.append(t.to(dtype).cpu())
                pooled.append(p.to(dtype).cpu())
                bar.update(len(chunk))
            tensors = {"latents": torch.cat(lat), "txt": torch.cat(txt), "pooled": torch.cat(pooled)}
            save_atomic(out / f"{name}.safetensors", tensors, {"format": SHARD_FORMAT})
            manifest = {
                "format": SHARD_FORMAT,
                "bucket": list(items[0].bucket),
                "count": len(items),
                "ae": ae.identity,
                "text": text.identity,
                "keys": keys,
                "captions": [it.caption for it in items],
                "images": [str(it.path.relative_to(root)) for it in items],
            }
            _write_json(out / f"{name}.json", manifest)
            written += 1
    # shards left over from a larger earlier run would be streamed: remove them (no process writes them)
    for p in out.glob("shard-*"):
        stem = p.name.split(".")[0]
        if stem[6:].isdigit() and int(stem[6:]) >= len(plan):
            p.unlink(missing_ok=True)
    info = {
        "format": SHARD_FORMAT,
        "ae": ae.identity,
        "text": text.identity,
        "resolution": cfg.resolution,
        "bucket_step": index.bucket_step,
        "crop": cfg.crop,
        "items": len(index.items),
        "shards": shards,
        "scan": index.report.summary(),
    }
    if barrier is not None:
        barrier()
    complete = False
    if num_processes == 1 or (barrier is None or process_index == 0) and all(
            _shard_complete(out, sh["name"], keys) for sh, keys in zip(shards, all_keys)):
        _write_json(out / INDEX_FILE, info)
        complete = True
    if barrier is not None:
        barrier()  # dataset.json exists for every process once this returns
    return {**info, "written": written, "kept": kept, "complete": complete}


def read_info(out_dir: str | Path) -> dict:
    path = Path(out_dir) / INDEX_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found: build the shards first with `dev2pro cache DATA {out_dir}`") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}): rebuild the shards with `dev2pro cache`") from None
    if info.get("format") != SHARD_FORMAT:
        raise DataError(f"{path}: format {info.get('format')!r}, expected {SHARD_FORMAT!r}: rebuild the shards")
    return info


def rank_share(items: list, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool = True) -> list:
    """Rank `rank`'s whole files in epoch `epoch`: the list shuffled with `random.Random(f"{seed}:{epoch}")` (the same
    order on every rank), then every `world_size`-th from position `rank` (disjoint across ranks, together every item
    once). Cache shards and tar shards are shared out this way."""
    order = list(range(len(items)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return [items[i] for i in order[rank::world_size]]


class ShardStream:
    """Endless same-bucket batches for one rank (see the module docstring). Each batch is a dict like
    `dev2pro.data.cache.collate`'s:
    latents (b, C, h, w), txt / t5 (b, seq, ctx), pooled (b, vec) float32, captions, keys."""

    def __init__(
        self, out_dir: str | Path, rank: int = 0, world_size: int = 1, seed: int = 0, batch_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad stream arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.dir = Path(out_dir)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size, self.shuffle = batch_size, shuffle
        self.info = read_info(self.dir)
        usable = [s for s in self.info["shards"] if s["count"] >= batch_size]
        if len(usable) < world_size:
            raise DataError(
                f"{self.dir}: {len(usable)} shards with at least {batch_size} items for {world_size} processes: "
                "rebuild with a smaller --shard-size or lower the batch size"
            )
        self.shards = usable
        self.epoch, self.shard_pos, self.batch_pos = 0, 0, 0

    def shards_of_epoch(self, epoch: int) -> list[dict]:
        """This rank's shards in epoch `epoch` (disjoint across ranks, together every shard once)."""
        return rank_share(self.shards, epoch, self.seed, self.rank, self.world_size, self.shuffle)

    def _batches_of_shard(self, shard: dict, epoch: int) -> list[list[int]]:
        rows = list(range(shard["count"]))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}:{shard['name']}").shuffle(rows)
        b = self.batch_size
        return [rows[s : s + b] for s in range(0, len(rows) - b + 1, b)]

    def _read(self, shard: dict, rows: list[int], manifest: dict, f) -> dict:
        def gather(name: str) -> torch.Tensor:
            sl = f.get_slice(name)
            return torch.cat([sl[r : r + 1] for r in rows]).float()

        txt = gather("txt")
        return {
            "latents": gather("latents"),
            "txt": txt,
            "t5": txt,
            "pooled": gather("pooled"),
            "captions": [manifest["captions"][r] for r in rows],
            "keys": [manifest["keys"][r] for r in rows],
        }

    def __iter__(self) -> Iterator[dict]:
        while True:
            shards = self.shards_of_epoch(self.epoch)
            while self.shard_pos < len(shards):
                shard = shards[self.shard_pos]
                batches = self._batches_of_shard(shard, self.epoch)
                manifest = json.loads((self.dir / f"{shard['name']}.json").read_text(encoding="utf-8"))
                with safe_open(str(self.dir / f"{shard['name']}.safetensors"), "pt") as f:
                    while self.batch_pos < len(batches):
                        rows = batches[self.batch_pos]
                        self.batch_pos += 1
                        yield self._read(shard, rows, manifest, f)
                self.shard_pos, self.batch_pos = self.shard_pos + 1, 0
            self.epoch, self.shard_pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Position of the next batch of this rank (counting batches handed out: iterate it directly, not through a
        prefetching DataLoader, when the state is saved for resume)."""
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "batch_pos": self.batch_pos, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "rank", "world_size", "batch_size"):
            if k in state and state[k] != getattr(self, k):
                raise DataError(f"shard stream state has {k} = {state[k]}, this run has {getattr(self, k)}: "
                                "resume with the same settings")
        self.epoch, self.shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self.batch_pos = int(state["batch_pos"])
