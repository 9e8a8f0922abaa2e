"""What a recipe trains on: `TrainData` (cached dataset, a streamed shard folder, or streamed WebDataset tar shards;
the prompt embeddings encoded once, the autoencoder when samples are decoded), built from `[data]` with `[model]`'s
encoders (`get_train_data`), the endless batch iterator the loop pulls from, and the sample grids written during
training.

Training holds no text encoder for image folders and shard folders: prompts (and the empty prompt, the unconditional
embedding) are encoded once and the encoders freed before the model is loaded. Tar shards are the exception: they are
encoded batch by batch (`dev2pro.data.tars`), so the encoders stay loaded (T5-XXL ~9.5 GB in bf16). The batch sampler
is rank-aware (`TrainData.bind`) and its state is saved in checkpoints, so `--resume` continues at the same data
position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dev2pro.errors import ConfigError, UserError
from dev2pro.train.config import ModelConfig, SampleConfig, TrainConfig
from dev2pro.train.distributed import is_fsdp, unwrap


class InMemoryDataset:
    """Cached items held in memory (dicts with `latents` (c, h, w), `txt` (L, D), `pooled` (P,)): what tests and the
    toy world train on without writing a cache folder. Same interface as `dev2pro.data.cache.CachedDataset`."""

    def __init__(self, latents: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor, captions=None):
        if not (latents.shape[0] == txt.shape[0] == pooled.shape[0]):
            raise ValueError(f"item counts differ: latents {latents.shape[0]}, txt {txt.shape[0]}, "
                             f"pooled {pooled.shape[0]}")
        self.latents, self.txt, self.pooled = latents.float(), txt.float(), pooled.float()
        self.captions = list(captions) if captions is not None else [""] * latents.shape[0]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "txt": self.txt[i], "pooled": self.pooled[i], "caption": self.captions[i],
                "key": str(i)}

    def buckets(self) -> list[tuple[int, int]]:
        return [tuple(self.latents.shape[-2:])] * len(self)


@dataclass
class TrainData:
    """What a recipe trains on: a dataset of cached items (dicts with `latents` (c, h, w), `txt` (L, D), `pooled`
    (P,)), the prompt embeddings encoded once before the encoders were freed (`prompts[text] = (txt (L, D), pooled
    (P,))`; must hold the empty prompt ""), optionally the autoencoder (to decode samples). `bind` makes the
    rank-aware bucket batch sampler once the process layout is known."""

    dataset: Any = None
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    autoencoder: Any = None  # kept only when samples are decoded during training
    info: dict[str, Any] = field(default_factory=dict)
    shuffle: bool = True
    sampler: Any = None
    collate: Any = None
    shards: Path | None = None  # a `dev2pro cache` shard folder, streamed rank by rank instead of `dataset`
    probe_batch: dict | None = None  # a few items of one bucket for the monitor when there is no `dataset`
    stream: Any = None  # (rank, world_size, seed, batch_size, shuffle) -> endless batch stream with a state_dict


    def bind(self, accelerator, batch_size: int, seed: int) -> TrainData:
        """Make this process's batch source: a `BucketBatchSampler` over `dataset` (global batches split by rank),
        a `ShardStream` over `shards` (whole shards per rank), or what `stream` makes (tar shards per rank)."""
        from dev2pro.data.cache import BucketBatchSampler, collate

        if "" not in self.prompts:
            raise ValueError("TrainData.prompts must hold the empty prompt '' (the unconditional embedding)")
        if self.shards is not None:
            from dev2pro.data.shards import ShardStream

            self.sampler = ShardStream(self.shards, rank=accelerator.process_index,
                                       world_size=accelerator.num_processes, seed=seed, batch_size=batch_size,
                                       shuffle=self.shuffle)
            return self
        if self.stream is not None:
            self.sampler = self.stream(accelerator.process_index, accelerator.num_processes, seed, batch_size,
                                       self.shuffle)
            return self
        self.sampler = BucketBatchSampler(self.dataset, batch_size=batch_size, seed=seed,
                                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                                          shuffle=self.shuffle)
        self.collate = self.collate or collate
        self.info.setdefault("dataset_size", len(self.dataset))
        return self


def encode_prompts(text_encoder, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Embeddings of `prompts` plus the empty prompt, as `TrainData.prompts` wants them."""
    want = list(dict.fromkeys(["", *prompts]))
    with torch.no_grad():
        txt, pooled = text_encoder.encode(want)
    return {p: (txt[i].float().cpu(), pooled[i].float().cpu()) for i, p in enumerate(want)}


def infinite_batches(data: TrainData) -> Iterator[dict]:
    """Collated batches forever, epoch after epoch. The sampler owns the order and position (its state_dict is
    saved in checkpoints); starting a new epoch is its job when iterated again. A shard or tar stream is endless
    itself."""
    if data.shards is not None or data.stream is not None:
        yield from data.sampler
        return
    while True:
        empty = True
        for indices in data.sampler:
            empty = False
            yield data.collate([data.dataset[i] for i in indices])
        if empty:
            raise UserError("the dataset yields no batch (fewer items than train.batch_size x processes?)")


def load_train_data(data_cfg, model_cfg: ModelConfig, accelerator, prompts: list[str],
                    keep_autoencoder: bool = False) -> TrainData:
    """Scan `data.dir` (or every `[[data.datasets]]` entry, `dev2pro.data.datasets`), build or reuse the latent/text
    caches with the encoders of `[model]` (main process first, the others then find everything cached), encode
    `prompts` plus the empty prompt once and free the encoders. Training never holds the text encoders; with
    `keep_autoencoder` (sample images during training) the autoencoder is kept on the CPU in float32 for decoding
    (the real Flux VAE decodes a 512px image in a few seconds there; the toy one is free). Call `.bind(...)` on the
    result for the batch sampler."""
    from dev2pro.data.datasets import load_datasets
    from dev2pro.flux.autoencoder import load_autoencoder
    from dev2pro.flux.encoders import free

    device = accelerator.device
    enc_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_cfg.preflight()  # every path, the base's architecture and the encoders' widths, from headers: seconds
    if data_cfg.dir and (Path(data_cfg.dir) / "dataset.json").is_file():
        return _load_shards(data_cfg, model_cfg, device, enc_dtype, prompts, keep_autoencoder)
    from dev2pro.data.tars import is_tar_source

    if data_cfg.dir and is_tar_source(data_cfg.dir):
        return _load_tars(data_cfg, model_cfg, device, enc_dtype, prompts)
    with accelerator.main_process_first():
        autoencoder = load_autoencoder(model_cfg.autoencoder, device=device, dtype=enc_dtype)
        text_encoder = _text_encoder(model_cfg, device, enc_dtype)
        dataset, info = load_datasets(data_cfg, autoencoder, text_encoder, device=device, dtype=enc_dtype,
                                      progress=accelerator.is_main_process)
    embeddings = encode_prompts(text_encoder, prompts)
    free(text_encoder)
    if keep_autoencoder:
        if hasattr(autoencoder, "vae"):
            autoencoder.vae.to("cpu", torch.float32)
    else:
        free(autoencoder)
        autoencoder = None
    return TrainData(dataset=dataset, prompts=embeddings, autoencoder=autoencoder, shuffle=data_cfg.shuffle,
                     info=info)


def _load_shards(data_cfg, model_cfg: ModelConfig, device, enc_dtype, prompts: list[str],
                 keep_autoencoder: bool) -> TrainData:
    """`data.dir` is a shard folder written by `dev2pro cache`: stream it; only the text encoder is loaded (for the
    prompt embeddings, checked against the encoder that made the shards) and the autoencoder if samples are decoded."""
    from dev2pro.data.shards import ShardStream, read_info
    from dev2pro.errors import DataError
    from dev2pro.flux.autoencoder import load_autoencoder
    from dev2pro.flux.encoders import free

    if data_cfg.caption_random():
        raise ConfigError(f"{data_cfg.dir} is a shard folder, which holds one embedding per caption: "
                          "data.caption_dropout and data.shuffle_captions need an image folder (set them to 0/false)")
    info = read_info(data_cfg.dir)
    text_encoder = _text_encoder(model_cfg, device, enc_dtype)
    if text_encoder.identity != info["text"]:
        raise DataError(f"{data_cfg.dir}: the shards were encoded with text encoder {info['text']}, [model] t5/clip "
                        f"give {text_encoder.identity}: use the same encoders or rebuild the shards")
    embeddings = encode_prompts(text_encoder, prompts)
    free(text_encoder)
    autoencoder = None
    if keep_autoencoder:
        autoencoder = load_autoencoder(model_cfg.autoencoder, device="cpu", dtype=torch.float32)
    first = min(info["shards"], key=lambda sh: -sh["count"])
    probe = next(iter(ShardStream(data_cfg.dir, seed=0, batch_size=min(8, first["count"]), shuffle=False)))
    return TrainData(prompts=embeddings, autoencoder=autoencoder, shuffle=data_cfg.shuffle, shards=Path(data_cfg.dir),
                     probe_batch=probe, info={"dataset_size": info["items"], "resolution": info["resolution"]})


def _load_tars(data_cfg, model_cfg: ModelConfig, device, enc_dtype, prompts: list[str]) -> TrainData:
    """`data.dir` names WebDataset tar shards: stream them per rank and encode each batch on the fly, so the
    autoencoder and text encoders stay loaded on `device` for the whole run (also used to decode samples)."""
    from dev2pro.data.tars import EncodedStream, TarStream, list_tars
    from dev2pro.flux.autoencoder import load_autoencoder

    if len(data_cfg.resolutions) > 1:
        raise ConfigError(f"data.resolutions = {list(data_cfg.resolutions)} with tar shards ({data_cfg.dir}): a tar "
                          "stream trains at one resolution: set data.resolution")
    if data_cfg.resolutions:
        data_cfg = replace(data_cfg, resolution=data_cfg.resolutions[0], resolutions=())
    data_cfg.validate()
    tars = list_tars(data_cfg.dir)  # a missing pattern fails before the encoders load
    autoencoder = load_autoencoder(model_cfg.autoencoder, device=device, dtype=enc_dtype)
    text_encoder = _text_encoder(model_cfg, device, enc_dtype)
    embeddings = encode_prompts(text_encoder, prompts)
    step = 2 * autoencoder.downsample

    def make(rank: int, world_size: int, seed: int, batch_size: int, shuffle: bool) -> EncodedStream:
        stream = TarStream(data_cfg.dir, data_cfg, step, rank=rank, world_size=world_size, seed=seed,
                           batch_size=batch_size, shuffle=shuffle)
        return EncodedStream(stream, autoencoder, text_encoder, device, enc_dtype)

    probe_source = make(0, 1, 0, 1, False)
    probe = probe_source.encode(probe_source.stream.first_batch(8))
    return TrainData(prompts=embeddings, autoencoder=autoencoder, shuffle=data_cfg.shuffle, stream=make,
                     probe_batch=probe, info={"resolution": data_cfg.resolution, "tars": len(tars),
                                              "trigger": data_cfg.trigger})


def _text_encoder(model_cfg: ModelConfig, device, dtype):
    from dev2pro.flux.text_encoders import load_text_encoder

    return load_text_encoder(model_cfg.t5, model_cfg.clip, device=device, dtype=dtype,
                             max_length=model_cfg.t5_max_length, tokenizers=model_cfg.tokenizers,
                             model_path=model_cfg.path)


def get_train_data(data: TrainData | None, data_cfg, model_cfg: ModelConfig, accelerator, train: TrainConfig,
                   sample: SampleConfig) -> TrainData:
    """The injected `data`, or the `[data]` folder cached with `[model]`'s encoders; bound to this process layout."""
    if data is None:
        if data_cfg is None:
            raise ConfigError("missing [data] table (data.dir = folder of images with .txt captions)")
        prompts = [*sample.prompts, sample.negative] if sample.every > 0 else []
        data = load_train_data(data_cfg, model_cfg, accelerator, prompts, keep_autoencoder=sample.every > 0)
    data.info.setdefault("base_kind", model_cfg.base_kind())  # how samples are made (`write_samples`)
    return data.bind(accelerator, train.batch_size, train.seed)


def write_samples(accelerator, model, data: TrainData, sample: SampleConfig, out_dir: Path, step: int) -> Path | None:
    """A grid of `sample.prompts` x `sample.seeds` (one row per prompt) from the model as it is now, written to
    `<out_dir>/samples/step-<step>.png`. Prompt embeddings come from `data.prompts` (encoded once before the text
    encoders were freed), images are decoded with `data.autoencoder`. Guidance and CFG left unset fit the base
    (`sampling.sample_mode` with `data.info["base_kind"]`). Under FSDP2 every rank takes part in the
    forward passes; otherwise only the main process samples."""
    from dev2pro.flux.sampling import generate, sample_mode, save_grid

    if not sample.prompts:
        return None
    fsdp = is_fsdp(model)
    if not (fsdp or accelerator.is_main_process):
        accelerator.wait_for_everyone()
        return None
    net = model if fsdp else unwrap(model)
    guidance, cfg = sample_mode(net, sample.guidance, sample.cfg, data.info.get("base_kind"))
    with accelerator.autocast():
        images = generate(net, data.autoencoder, data.prompts, list(sample.prompts), negative=sample.negative,
                          height=sample.height, width=sample.width, steps=sample.steps, guidance=guidance,
                          cfg=cfg, seeds=list(sample.seeds), progress=False)
    path = out_dir / "samples" / f"step-{step:06d}.png"
    if accelerator.is_main_process:
        save_grid(images, path, ncols=len(sample.seeds))
    accelerator.wait_for_everyone()
    return path
