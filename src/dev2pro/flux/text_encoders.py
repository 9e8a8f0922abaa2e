"""The FLUX.1 text encoders: T5 (sequence, `context_dim`) + CLIP-L (pooled, `pooled_dim`) through transformers'
`from_pretrained` (local folders, pipeline layouts or hub ids) or from single safetensors files (ComfyUI/kohya
`clip_l.safetensors`, `t5xxl_fp16.safetensors`, fp8 and scaled fp8: `dev2pro.flux.encoder_files`, tokenizers from
`dev2pro.flux.tokenizers`), and `load_text_encoder`, the resolver recipes and commands call. It implements
`dev2pro.flux.encoders.TextEncoder`. Every weight passes `dev2pro.flux.value_check` at load time.

Reference: BFL flux/modules/conditioner.py (`HFEmbedder`: padding to max_length, no attention mask, T5
`last_hidden_state`, CLIP `pooler_output`); diffusers' FluxPipeline `_get_t5_prompt_embeds` /
`_get_clip_prompt_embeds` do the same and serve as the test oracle. Pitfall: the CLIP pooled vector is taken at the
first EOS token, so tokenizer and config must agree on its id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dev2pro.errors import UserError
from dev2pro.flux import providers
from dev2pro.flux.encoders import TextEncoder, looks_like_hub_id, one_line, weights_fingerprint
from dev2pro.flux.value_check import check_module

T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
CLIP_MAX_LENGTH = 77


def _resolve_hf(ref: str, subfolder: str, kind: str) -> tuple[str, list[str | None]]:
    """(ref, subfolders to try) for a model+tokenizer pair that may live in a pipeline layout."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), [None]
        if (path / subfolder / "config.json").exists():
            return str(path), [subfolder]
        raise UserError(f"{path}: no {kind} model here (expected config.json or {subfolder}/config.json)")
    if path.is_file():
        raise UserError(f"{path}: a {kind} single file is loaded by load_text_encoder, not here")
    if looks_like_hub_id(ref):
        return ref, [None, subfolder]
    raise UserError(f"{kind} '{ref}' not found (give a local folder, a pipeline folder, a hub id or 'toy')")


def _load_pair(ref: str, model_cls, model_sub: str, tok_sub: str, kind: str, dtype):
    from transformers import AutoTokenizer

    root, subs = _resolve_hf(ref, model_sub, kind)
    err = None
    for sub in subs:
        kw = {"subfolder": sub} if sub else {}
        try:
            model = model_cls.from_pretrained(root, dtype=dtype, **kw)
        except (OSError, ValueError) as e:
            err = e
            continue
        check_module(model, f"{root}/{sub}" if sub else root)
        tok_err = None
        for tsub in [None] if sub is None else [tok_sub, sub]:  # pipeline: tokenizer_2/ beside text_encoder_2/
            tkw = {"subfolder": tsub} if tsub else {}
            try:
                return model, AutoTokenizer.from_pretrained(root, **tkw)
            except (OSError, ValueError) as e:
                tok_err = e
        raise UserError(f"cannot load the {kind} tokenizer from '{ref}': {one_line(tok_err)}")
    where = "" if Path(ref).exists() else " (no such local path; tried as a hub id)"
    raise UserError(f"cannot load the {kind} model from '{ref}'{where}: {one_line(err)}")


def _tokenizer_fingerprint(tok) -> str:
    probe = "a photo of a cat, 1024x1024, Ünïcode!"
    return hashlib.sha256(json.dumps([type(tok).__name__, len(tok), tok(probe)["input_ids"]]).encode()).hexdigest()[:8]


class FluxTextEncoders:
    """T5 (sequence, `context_dim`) + CLIP-L (pooled, `pooled_dim`), as FLUX.1 conditions on them."""

    def __init__(self, t5, t5_tokenizer, clip, clip_tokenizer, max_length: int = T5_MAX_LENGTH["dev"]):
        self.t5 = t5.eval().requires_grad_(False)
        self.clip = clip.eval().requires_grad_(False)
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.max_length = int(max_length)
        self.context_dim = int(t5.config.d_model)
        self.pooled_dim = int(clip.config.hidden_size)
        self.identity = (f"FluxTextEncoders:t5={weights_fingerprint(t5)}/{_tokenizer_fingerprint(t5_tokenizer)}"
                         f":clip={weights_fingerprint(clip)}/{_tokenizer_fingerprint(clip_tokenizer)}"
                         f":len={self.max_length}")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                   return_tensors="pt").input_ids
        txt = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False)[0]
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                       return_tensors="pt").input_ids
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        return txt.float(), pooled.float()

    def to(self, device=None, dtype=None) -> FluxTextEncoders:
        self.t5.to(device=device, dtype=dtype)
        self.clip.to(device=device, dtype=dtype)
        return self

    def release(self) -> None:
        self.t5.to("meta")
        self.clip.to("meta")


def _single_file(ref: str) -> Path | None:
    path = Path(ref).expanduser()
    return path if path.is_file() else None


def _load_one(kind: str, ref: str, tokenizers: str | None, model_path: str | None, device, dtype):
    """(model, tokenizer) of one encoder: a single file (+ tokenizer search) or a folder / hub id."""
    from transformers import CLIPTextModel, T5EncoderModel

    from dev2pro.flux import encoder_files
    from dev2pro.flux.tokenizers import load_tokenizer

    file = _single_file(ref)
    if file is None:
        if kind == "t5":
            return _load_pair(ref, T5EncoderModel, "text_encoder_2", "tokenizer_2", "T5", dtype)
        return _load_pair(ref, CLIPTextModel, "text_encoder", "tokenizer", "CLIP", dtype)
    encoder_files.open_encoder_file(file, kind).close()  # wrong file: fail before looking for a tokenizer
    tok = load_tokenizer(kind, [("model.tokenizers", tokenizers), ("model.path", model_path)], str(file))
    if kind == "t5":
        return encoder_files.load_t5_file(file, dtype=dtype, device=device), tok
    return encoder_files.load_clip_file(file, dtype=dtype, device=device, eos_token_id=tok.eos_token_id), tok


def load_text_encoder(t5_ref: str, clip_ref: str | None = None, device="cpu", dtype=torch.float32,
                      max_length: int = T5_MAX_LENGTH["dev"], tokenizers: str | None = None,
                      model_path: str | None = None) -> TextEncoder:
    """Resolve the text encoders: `toy`, or T5 and CLIP references: local folders, pipeline folders with
    `text_encoder_2/`+`tokenizer_2/` and `text_encoder/`+`tokenizer/`, hub ids, or single safetensors files
    (ComfyUI/kohya, fp16/bf16/fp8/scaled fp8; T5 fp8 stays fp8). `clip_ref` defaults to `t5_ref` (one pipeline
    folder or one full ComfyUI checkpoint holds both). Single files take their tokenizers from `tokenizers`, then
    `model_path`, then the hub defaults (`dev2pro.flux.tokenizers`)."""
    t5_ref = str(t5_ref)
    clip_ref = t5_ref if clip_ref is None else str(clip_ref)
    if t5_ref in providers.PROVIDERS or clip_ref in providers.PROVIDERS:
        if t5_ref != clip_ref:
            raise UserError(f"the {t5_ref if t5_ref in providers.PROVIDERS else clip_ref} text encoder replaces both "
                            f"T5 and CLIP: got t5='{t5_ref}', clip='{clip_ref}'")
        return providers.text_encoder(t5_ref)
    t5, t5_tok = _load_one("t5", t5_ref, tokenizers, model_path, device, dtype)
    clip, clip_tok = _load_one("clip", clip_ref, tokenizers, model_path, device, dtype)
    return FluxTextEncoders(t5.to(device), t5_tok, clip.to(device), clip_tok, max_length=max_length)
