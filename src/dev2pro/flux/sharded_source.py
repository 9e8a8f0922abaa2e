"""A sharded training checkpoint (`checkpoint-<step>` of dedistill / distill / train-base) read as a transformer
`Source`, one tensor at a time: what exports the final model and what `dev2pro convert checkpoint-<step> ...` reads.

The folder is in the layout of `torch.distributed.checkpoint`'s (DCP) safetensors storage (written by
`dev2pro.train.sharded.save_shards`): each rank writes `shard-<rank+1>-model-00001-of-00001.safetensors` with the
pieces of every tensor it owns, keyed `model.<name>`, `optim.<name>.<state>`, `ema.<name>`, and the header metadata
`DCP_SHARDING_INFO` gives each piece's offset in the full tensor. `transformer_config.json` is the model's diffusers
config. Nothing is pickled: the headers are JSON and are all that is parsed before a tensor is read.

Reading tensor `k` allocates it once and copies each piece (read with one `readinto`, no mmap) to its offset, so peak
memory is one tensor group, never the model. `prefix` chooses which weights: `ema` when the run kept an EMA (what the
recipes export), else `model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dev2pro.errors import CheckpointError
from dev2pro.flux.safetensors_io import open_safetensors
from dev2pro.flux.sources import Source, _key_space

SHARD_GLOB = "shard-*-model-*.safetensors"
SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
CONFIG_FILE = "transformer_config.json"


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob(SHARD_GLOB))


class ShardedSource(Source):
    """Logical tensors `<prefix>.<name>` of a DCP safetensors checkpoint folder, assembled from the ranks' pieces."""

    def __init__(self, path, prefix: str | None = None):
        super().__init__()
        self.path, self.format = Path(path), "dcp-shards"
        self.files = [open_safetensors(p) for p in sorted(self.path.glob(SHARD_GLOB))]
        if not self.files:
            raise CheckpointError(f"{self.path}: no {SHARD_GLOB} files: not a sharded dev2pro checkpoint")
        # pieces[name] = [(file, key in file, offsets)]
        self._pieces: dict[str, list[tuple]] = {}
        all_keys = set()
        for f in self.files:
            try:
                sharding = json.loads(f.metadata.get(SHARDING_KEY, "{}"))
            except ValueError:
                raise CheckpointError(f"{f.path}: corrupt {SHARDING_KEY} metadata") from None
            for k in f.keys():
                all_keys.add(k)
                offsets = tuple(sharding.get(k, {}).get("saved_offsets", [0] * len(f.info(k).shape)))
                self._pieces.setdefault(k, []).append((f, k, offsets))
        if prefix is None:
            prefix = "ema" if any(k.startswith("ema.") for k in all_keys) else "model"
        self.prefix = prefix
        for k, pieces in self._pieces.items():
            if not k.startswith(prefix + "."):
                continue
            shape = [0] * len(pieces[0][0].info(k).shape)
            for f, fk, off in pieces:
                for d, (o, s) in enumerate(zip(off, f.info(fk).shape)):
                    shape[d] = max(shape[d], o + s)
            self.infos[k[len(prefix) + 1 :]] = (pieces[0][0].info(k).dtype, tuple(shape))
        if not self.infos:
            raise CheckpointError(f"{self.path}: no '{prefix}.' tensors in the shards")
        cfg = self.path / CONFIG_FILE
        self.config = json.loads(cfg.read_text()) if cfg.is_file() else None
        self.space = _key_space(self.infos, str(self.path))

    def _raw(self, key: str) -> torch.Tensor:
        dtype, shape = self.infos[key]
        out = torch.empty(shape, dtype=dtype)
        covered = 0
        for f, fk, off in self._pieces[f"{self.prefix}.{key}"]:
            piece = f.get(fk)
            view = out
            for d, (o, s) in enumerate(zip(off, piece.shape)):
                view = view.narrow(d, o, s)
            view.copy_(piece)
            covered += piece.numel()
        if covered < out.numel():
            raise CheckpointError(f"{self.path}: '{self.prefix}.{key}' is incomplete ({covered} of {out.numel()} "
                                  "values in the shards): a rank's shard file is missing; copy every node's shard "
                                  "files into this folder")
        return out

    def close(self):
        for f in self.files:
            f.close()

    def nbytes(self) -> int:
        return sum(f.header.size for f in self.files)
