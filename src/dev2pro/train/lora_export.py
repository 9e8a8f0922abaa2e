"""Usable LoRA files out of a train-lora run: at every `output.save_every` step a `<name>-<step:06d>.safetensors`
(kohya's naming, e.g. `my_lora-000500.safetensors`) beside the resumable `checkpoint-<step>`, and `<name>.safetensors`
at the end; all in `output.format` and `output.save_dtype`, with the metadata that Civitai, ComfyUI LoRA managers and
Forge read (kohya `ss_*`, `modelspec.*`, `sshs_*` hashes: `dev2pro.lora.metadata`) plus dev2pro's own keys (base
hash, training guidance, targets and per-pattern rules).

Why a module of its own: the recipe calls it at two places (periodic and final) and the metadata gathers facts from
five config sections and the dataset scan; the recipe stays a readable loop.

Pitfall: the trainable state is gathered on every rank (a collective under FSDP2) but only the main process writes;
per-module alphas come from the model (per-pattern rules), not from `lora.alpha`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dev2pro.errors import UserError

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def lora_from_state(state: dict[str, torch.Tensor], alpha: float | dict[str, float], adapter_name: str = "default"):
    """`LoraWeights` from a full trainable state dict (`<module>.lora_A.<name>.weight` / `lora_B`); `alpha` is one
    value or a per-module-path mapping."""
    from dev2pro.lora.inject import LoraLayer, LoraWeights, clean_module_path

    downs, ups = {}, {}
    for key, v in state.items():
        for part, table in ((f".lora_A.{adapter_name}.weight", downs), (f".lora_B.{adapter_name}.weight", ups)):
            if key.endswith(part):
                table[clean_module_path(key[: -len(part)])] = v.detach().to("cpu", torch.float32)
    if not downs or set(downs) != set(ups):
        raise ValueError(f"no complete LoRA '{adapter_name}' in the trainable state ({len(downs)} A, {len(ups)} B)")
    alpha_of = alpha if isinstance(alpha, dict) else dict.fromkeys(downs, float(alpha))
    return LoraWeights(layers={p: LoraLayer(down=downs[p], up=ups[p], alpha=float(alpha_of[p])) for p in sorted(downs)})


def base_identity(ref: str) -> tuple[str, str]:
    """(name, content hash) of the base for the LoRA metadata; presets and toy models have no file to hash."""
    from dev2pro.flux.hashing import model_hash

    name = Path(ref).name if not ref.startswith(("preset:", "toy:")) else ref
    try:
        return name, model_hash(ref)
    except (UserError, OSError, ValueError):
        return name, ""


def step_file(out_dir: Path, name: str, step: int) -> Path:
    """kohya's intermediate name: `<name>-<step, 6 digits>.safetensors`."""
    return Path(out_dir) / f"{name}-{step:06d}.safetensors"


class LoraExporter:
    """Writes the LoRA files of one run; `cfg` is a `TrainLoraConfig`, `alphas` the per-module alphas of the trained
    adapter, `info` the dataset facts (`TrainData.info`), `optimizer` its kohya label, `started_at` the run's start
    (kept across resumes through the checkpoint), `training_guidance` the guidance input trained at."""

    def __init__(self, cfg: Any, alphas: dict[str, float], info: dict, optimizer: str, started_at: float,
                 training_guidance: float):
        self.cfg, self.alphas, self.info, self.optimizer, self.started_at = cfg, alphas, info, optimizer, started_at
        self.guidance = training_guidance
        self._base = None

    def metadata(self, step: int) -> dict[str, str]:
        from dev2pro.lora.metadata import kohya_metadata, training_metadata

        cfg = self.cfg
        if self._base is None:
            self._base = base_identity(cfg.model.base)
        name, digest = self._base
        extra = {"dev2pro.guidance_loss": f"{cfg.train.guidance_loss:g}"} if cfg.train.guidance_loss > 0 else {}
        if cfg.model.adapter:
            extra |= {"dev2pro.adapter": Path(cfg.model.adapter).name,
                      "dev2pro.adapter_hash": base_identity(cfg.model.adapter)[1],
                      "dev2pro.adapter_strength": str(cfg.model.adapter_strength)}
        if cfg.lora.rules:
            extra["dev2pro.lora_rules"] = [{"pattern": r.pattern, "rank": r.rank, "alpha": r.alpha or r.rank}
                                           for r in cfg.lora.rules]
        if self.info.get("trigger"):
            extra["dev2pro.trigger"] = self.info["trigger"]
        resolution = self.info.get("resolution")
        meta = training_metadata(
            base_model=name, base_model_hash=digest, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
            targets=cfg.lora.targets, training_guidance=self.guidance, steps=step, resolution=resolution,
            dataset_size=self.info.get("dataset_size"), extra=extra)
        scheduler = cfg.train.lr_schedule if cfg.train.scheduler == "builtin" else cfg.train.scheduler
        meta.update(kohya_metadata(
            output_name=cfg.output.name, steps=step, max_steps=cfg.train.steps, started_at=self.started_at,
            finished_at=time.time(), resolution=resolution, trigger=self.info.get("trigger", ""),
            training_guidance=self.guidance, base_model=name, learning_rate=cfg.train.lr,
            optimizer=self.optimizer, lr_scheduler=scheduler, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
            data=self.info))
        return meta

    def write(self, state: dict[str, torch.Tensor], step: int, path: Path) -> Path:
        """Write the LoRA in `state` (gathered trainable weights) to `path` (main process only)."""
        from dev2pro.lora.files import save_lora

        lora = lora_from_state(state, self.alphas)
        try:
            save_lora(path, lora, self.cfg.output.format, metadata=self.metadata(step),
                      dtype=SAVE_DTYPES[self.cfg.output.save_dtype])
        except OSError as e:
            raise UserError(f"could not write {path} ({e.strerror or e}); free disk space and resume") from None
        return path
