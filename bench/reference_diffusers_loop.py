"""A LoRA training loop written the way diffusers' example `examples/dreambooth/train_dreambooth_lora_flux.py` does
it, for bench a. Same structure per step: load and transform the batch's images, encode them with the autoencoder
(every step; the script's default without --cache_latents), encode the batch's captions (every step: the script
re-encodes custom per-image prompts when the text encoders are not trained), sample timesteps with
`compute_density_for_timestep_sampling` and take sigmas from a `FlowMatchEulerDiscreteScheduler`, pack latents with
`FluxPipeline._pack_latents`, call the transformer with `timestep / 1000` and a guidance tensor, weighted MSE
(`compute_loss_weighting_for_sd3`), `accelerator.backward`, clip, AdamW step, LR scheduler step, zero_grad.
peft LoRA via `transformer.add_adapter(LoraConfig(...))`, no torch.compile. Images are read with PIL and converted with
numpy (torchvision does not work on this machine), as the script's Resize/CenterCrop/ToTensor/Normalize would.

`mixed_precision="bf16"` is the script's `--mixed_precision bf16`: the frozen transformer (and the encoders, see
`PipelineEncoders`) cast to bf16 (`weight_dtype`), the LoRA parameters upcast to fp32 (`cast_training_params`), the
forward under accelerate's bf16 autocast. `PipelineEncoders` gives the script's real encoders from a `FluxPipeline`
folder: `encode_prompt` (CLIP pooled + T5, `max_sequence_length`) and `vae.encode(...).latent_dist.sample()` with the
VAE's shift/scale.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ATTENTION_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out"]


def load_batch(paths: list[Path], size: int) -> tuple[torch.Tensor, list[str]]:
    imgs, prompts = [], []
    for p in paths:
        im = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
        a = torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        imgs.append(a)
        prompts.append(p.with_suffix(".txt").read_text().strip())
    return torch.stack(imgs), prompts


class PipelineEncoders:
    """The script's text and image encoding from a saved `FluxPipeline` folder (`.encode(prompts)` gives
    (prompt_embeds, pooled_prompt_embeds) as `compute_text_embeddings` does; `.encode(pixels)` the scaled latents),
    with every encoder in `weight_dtype` as the script casts them."""

    def __init__(self, folder: str | Path, weight_dtype: torch.dtype = torch.float32, max_sequence_length: int = 512):
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        folder = Path(folder)
        self.max_sequence_length = max_sequence_length
        self.tokenizers = [AutoTokenizer.from_pretrained(folder / "tokenizer"),
                           AutoTokenizer.from_pretrained(folder / "tokenizer_2")]
        self.text_encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder").to(dtype=weight_dtype),
                              T5EncoderModel.from_pretrained(folder / "text_encoder_2").to(dtype=weight_dtype)]
        for m in self.text_encoders:
            m.requires_grad_(False).eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").to(dtype=weight_dtype).requires_grad_(False).eval()
        self.text = _Text(self)
        self.image = _Image(self)


class _Text:
    def __init__(self, enc: PipelineEncoders):
        self.enc = enc

    def encode(self, prompts: list[str]):
        from diffusers import FluxPipeline

        # the script's encode_prompt (a FluxPipeline with only the text parts, as `compute_text_embeddings` uses)
        pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=self.enc.text_encoders[0],
                            tokenizer=self.enc.tokenizers[0], text_encoder_2=self.enc.text_encoders[1],
                            tokenizer_2=self.enc.tokenizers[1], transformer=None)
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(prompts, prompt_2=None, device=torch.device("cpu"),
                                                              max_sequence_length=self.enc.max_sequence_length)
        return prompt_embeds, pooled


class _Image:
    def __init__(self, enc: PipelineEncoders):
        self.vae = enc.vae

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor


def train(transformer, vae, text_encoder, data_dir: Path, *, steps: int, batch_size: int, size: int, rank: int,
          lr: float = 1e-4, guidance: float = 1.0, seed: int = 0, mixed_precision: str = "no") -> list[float]:
    """Train `steps` steps; returns the wall time of each step (seconds). `mixed_precision`: "no" or "bf16"."""
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    weight_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    torch.manual_seed(seed)
    transformer.requires_grad_(False)
    transformer.to(dtype=weight_dtype)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=ATTENTION_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # cast_training_params: the LoRA trains in fp32
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    files = sorted(p for p in data_dir.iterdir() if p.suffix in (".png", ".jpg"))
    has_guidance = accelerator.unwrap_model(transformer).config.guidance_embeds
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = [(step * batch_size + i) % len(files) for i in range(batch_size)]
        pixels, prompts = load_batch([files[i] for i in idx], size)
        with torch.no_grad():
            prompt_embeds, pooled_prompt_embeds = text_encoder.encode(prompts)  # every step (custom prompts)
            latents = vae.encode(pixels).to(weight_dtype)  # every step (no --cache_latents)
        b, c, h, w = latents.shape
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, dtype=latents.dtype)
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=b, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        indices = (u * noise_scheduler.config.num_train_timesteps).long()
        timesteps = noise_scheduler.timesteps[indices]
        sigmas = noise_scheduler.sigmas[indices].flatten().view(b, 1, 1, 1).to(latents.dtype)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        guidance_t = torch.full((b,), guidance) if has_guidance else None
        model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance_t,
                                 pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                                 txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
        model_pred = FluxPipeline._unpack_latents(model_pred, h * 8, w * 8, 8)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - latents
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    return times
