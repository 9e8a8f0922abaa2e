"""Content hashes of base checkpoints, recorded in LoRA metadata (`dev2pro.base_model_hash`).

`model_hash` is `sha256:<hex>` of the file bytes, or for a diffusers folder of the sorted `<name> <sha256>` lines of
its files. Hashes are cached per process by (path, size, mtime); those of large files also survive the process in a
small JSON file, so a training run does not re-read a 24 GB base (about a minute on a fast disk) to record its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dev2pro.errors import CheckpointError
from dev2pro.flux.sources import diffusers_dir, resolve_ref

_HASHES: dict[tuple, str] = {}


# Hashes of large files survive the process in a small JSON file (path, size, mtime -> sha256), so a training run
# does not re-read a 24 GB base just to record its hash. Small files (tests, LoRAs) are never written there.
HASH_CACHE_FILE = Path.home() / ".cache" / "dev2pro" / "sha256.json"
HASH_CACHE_MIN_BYTES = 64 * 1024 * 1024


def _disk_hash_cache(update: tuple[str, str] | None = None) -> dict[str, str]:
    try:
        cache = json.loads(HASH_CACHE_FILE.read_text()) if HASH_CACHE_FILE.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    if update is not None:
        cache[update[0]] = update[1]
        try:  # best effort: a read-only home only costs the next run a re-hash
            HASH_CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
            tmp = HASH_CACHE_FILE.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=0))
            os.replace(tmp, HASH_CACHE_FILE)
        except OSError:
            pass
    return cache


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    disk_key = f"{key[0]}|{key[1]}|{key[2]}"
    big = st.st_size >= HASH_CACHE_MIN_BYTES
    if key not in _HASHES and big:
        cached = _disk_hash_cache().get(disk_key)
        if cached:
            _HASHES[key] = cached
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(16 * 1024 * 1024), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
        if big:
            _disk_hash_cache((disk_key, _HASHES[key]))
    return _HASHES[key]


def model_hash(path) -> str:
    """A content hash for LoRA metadata: `sha256:<hex>` of the file bytes (streamed, 16 MB chunks; cached per
    process by path, size and mtime). For a diffusers folder: sha256 over the sorted lines `<name> <sha256>` of its
    config.json, index and safetensors files. A 24 GB file takes about a minute to hash on a fast disk."""
    p = resolve_ref(path)
    if p.is_file():
        return "sha256:" + _file_sha256(p)
    d = diffusers_dir(p) if p.is_dir() else None
    if d is None:
        raise CheckpointError(f"{p}: not a checkpoint file or diffusers folder")
    names = sorted(x.name for x in d.iterdir() if x.is_file() and (x.suffix in (".safetensors", ".json")))
    lines = "".join(f"{n} {_file_sha256(d / n)}\n" for n in names)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
