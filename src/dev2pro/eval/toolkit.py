"""The heavy parts of the comparison behind an interface (`Toolkit`): loading a base, sampling, applying a LoRA
and releasing it, the judge. `FluxToolkit` wires the project's own modules (the tests pass small fakes). Also how a
LoRA is read for the comparison (a LoRA file or a train-lora checkpoint folder) and how many CPU threads small models
should use.

Pitfall: a LoRA is merged into fp32 base weights (fastest sampling, unmerging exact to rounding) but applied as an
unmerged adapter to bf16/fp16/fp8 bases, whose weights merge + unmerge would round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from dev2pro.errors import ConfigError, UserError
from dev2pro.eval.judges import ClipJudge, Judge, ToyJudgeAdapter, as_images
from dev2pro.eval.plan import BaseEntry, MetricsSection, ModelsSection, SamplingSection


def idle_cpu_threads() -> int:
    """torch CPU threads for small models: the cores the load average leaves idle, at least 1. Extra threads only help
    on idle cores; on busy ones they cost many times over (measured here: a 2.3M-parameter Flux training step 13x
    slower with 2 threads than with 1 on 2 cores at load 7)."""
    import os

    cores = os.cpu_count() or 1
    idle = int(cores - os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    return max(1, min(cores, idle))


def read_lora(path: Path):
    """`LoraWeights` from a LoRA file (any format `lora.files.load_lora` reads) or a train-lora checkpoint folder
    (its trainable peft state, with `lora.alpha` from the checkpoint's config.toml)."""
    from dev2pro.lora.files import load_lora

    path = Path(path)
    if path.is_file():
        return load_lora(path)
    import tomllib

    from safetensors.torch import load_file

    from dev2pro.train.lora_export import lora_from_state

    cfg = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
    alpha = cfg.get("lora", {}).get("alpha")
    if alpha is None:
        raise UserError(f"{path / 'config.toml'}: no lora.alpha; is this a train-lora checkpoint?")
    return lora_from_state(load_file(str(path / "trainable.safetensors")), float(alpha))


class Toolkit(Protocol):
    def load_base(self, entry: BaseEntry): ...

    def generate(self, model, prompts: Sequence[str], seeds: Sequence[int], *, entry: BaseEntry, guidance: float,
                 sampling: SamplingSection):
        """Images (len(prompts) * len(seeds), 3, H, W) in [-1, 1], prompt-major (prompt 0 with every seed, ...)."""

    def apply_lora(self, model, path: Path, strength: float) -> contextlib.AbstractContextManager: ...

    def judge(self, metrics: MetricsSection) -> Judge | None: ...

    def release(self, model) -> None: ...


class FluxToolkit:
    """The project's own components: `checkpoint.load_transformer`, `autoencoder.load_autoencoder`,
    `text_encoders.load_text_encoder`, `sampling.generate`, `lora.files.load_lora`,
    `lora.inject.merge_lora_into_model`, `toy.judge.Judge`."""

    def __init__(self, models: ModelsSection, judge: Judge | None = None):
        import torch

        self.models = models
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if models.device == "auto" else models.device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[models.dtype]
        self._encoders = None
        self._judge = judge

    def encoders(self):
        if self._encoders is None:
            from dev2pro.flux.autoencoder import load_autoencoder
            from dev2pro.flux.text_encoders import load_text_encoder

            m = self.models
            for key in ("autoencoder", "t5", "clip"):
                if not getattr(m, key):
                    raise ConfigError(f"models.{key} is unset: set it to a file, folder or hub id (\"toy\" for the "
                                      "toy world)")
            ae = load_autoencoder(m.autoencoder, device=self.device, dtype=self.dtype)
            text = load_text_encoder(m.t5, m.clip, device=self.device, dtype=self.dtype, tokenizers=m.tokenizers)
            self._encoders = (ae, text)
        return self._encoders

    def load_base(self, entry: BaseEntry):
        from dev2pro.flux.checkpoint import load_transformer

        model = load_transformer(entry.ref, dtype=self.dtype, device=self.device)
        return model.eval().requires_grad_(False)

    def generate(self, model, prompts, seeds, *, entry: BaseEntry, guidance: float, sampling: SamplingSection):
        from dev2pro.flux.sampling import generate

        ae, text = self.encoders()
        cfg_mode = entry.mode == "cfg"
        # CFG bases get embedded guidance 1.0 (what de-distilled bases train at); generate ignores it without one.
        images = generate(
            model, ae, text, list(prompts), negative=entry.negative, height=sampling.height, width=sampling.width,
            steps=sampling.steps, guidance=1.0 if cfg_mode else guidance, cfg=guidance if cfg_mode else 1.0,
            seeds=list(seeds), batch_size=sampling.batch_size, progress=False,
        )
        return as_images(images)

    @contextlib.contextmanager
    def apply_lora(self, model, path: Path, strength: float) -> Iterator[None]:
        """fp32 bases: merge into the weights (fastest sampling; unmerging is exact to rounding). Other dtypes: an
        unmerged adapter, so bf16/fp8 base weights are never rounded by merge + unmerge."""
        import torch

        from dev2pro.lora import inject as L

        lora = read_lora(path)
        merged = next(model.parameters()).dtype == torch.float32
        if merged:
            L.merge_lora_into_model(model, lora, strength)
        else:
            L.apply_lora(model, lora, strength, adapter_name="compare")
        try:
            yield
        finally:
            if merged:
                L.unmerge_lora_from_model(model, lora, strength)
            else:
                L.remove_lora(model, adapter_name="compare")

    def judge(self, metrics: MetricsSection):
        if metrics.judge == "none":
            return None
        if self._judge is not None:
            return self._judge
        if metrics.judge.startswith("clip:"):
            return ClipJudge(metrics.judge[len("clip:"):], device=self.device)
        return ToyJudgeAdapter()

    def release(self, model) -> None:
        del model
        import gc

        gc.collect()
