"""Tiny random CLIP / T5 text encoders and tokenizers built in the test, written in the single-file layouts ComfyUI
and kohya ship (`clip_l.safetensors`, `t5xxl_fp16`, `t5xxl_fp8_e4m3fn`, scaled fp8, full-checkpoint prefixes) and
as an HF snapshot (`text_encoder/`, `tokenizer/`, ...). Nothing is downloaded."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from dev2pro.flux import fp8 as fp8lib

WORDS = "a photo of cat dog the in park portrait red blue zxq style".split()
CLIP_VOCAB, T5_VOCAB = 50, 100


def tiny_tokenizer(folder: Path, kind: str) -> Path:
    """A word-level tokenizer saved as a PreTrainedTokenizerFast folder: CLIP-like (bos/eos at the top ids, padded
    with eos) or T5-like (pad 0, eos 1, unk 2, eos appended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "clip":
        specials = {"<unk>": 0, "<|startoftext|>": CLIP_VOCAB - 2, "<|endoftext|>": CLIP_VOCAB - 1}
        vocab = {**{w: i + 1 for i, w in enumerate(WORDS)}, **specials}
        post = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                             special_tokens=[("<|startoftext|>", CLIP_VOCAB - 2),
                                                             ("<|endoftext|>", CLIP_VOCAB - 1)])
        kw = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  unk_token="<unk>")
    else:
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
        post = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        kw = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = post
    PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(folder)
    return folder


def tiny_clip(seed: int = 0, hidden: int = 128):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, intermediate_size=160, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=CLIP_VOCAB - 2, eos_token_id=CLIP_VOCAB - 1)
    return CLIPTextModel(cfg).eval()


def tiny_t5(seed: int = 0, d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=T5_VOCAB, d_model=d_model, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).eval()


def clip_file_dict(clip, dtype=torch.float16, prefix: str = "") -> dict[str, torch.Tensor]:
    """CLIP as ComfyUI/kohya store it: `text_model.` keys (transformers 5 drops that prefix in memory)."""
    return {f"{prefix}text_model.{k}": v.to(dtype).contiguous() for k, v in clip.state_dict().items()
            if v.is_floating_point()}


def t5_file_dict(t5, dtype=torch.float16, prefix: str = "", fp8: str | None = None) -> dict[str, torch.Tensor]:
    """T5 as ComfyUI/kohya store it (`shared.weight` + `encoder.*`); `fp8`: None, 'plain' (e4m3fn cast of every
    weight, embedding included) or 'scaled' (ComfyUI: scaled_fp8 marker, per-linear scale_weight, scale_input)."""
    out = {}
    for k, v in t5.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue
        linear = v.ndim == 2 and ".block." in k and "relative_attention_bias" not in k
        if fp8 == "scaled" and linear:
            w8, scale = fp8lib.quantize(v.float(), "tensor")
            out[prefix + k] = w8
            out[prefix + k.removesuffix("weight") + "scale_weight"] = scale
            out[prefix + k.removesuffix("weight") + "scale_input"] = torch.ones(())
        elif fp8 == "plain" and v.ndim == 2 and "relative_attention_bias" not in k:
            out[prefix + k] = fp8lib.quantize(v.float(), "none")[0]
        else:
            out[prefix + k] = v.to(dtype).contiguous()
    if fp8 == "scaled":
        out[prefix + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out


def dequantized_copy(model, file_dict: dict[str, torch.Tensor], prefix: str = ""):
    """A copy of `model` holding exactly the values a file stores (fp8 dequantized with its scales)."""
    import copy

    ref = copy.deepcopy(model)
    sd = {}
    for k, v in file_dict.items():
        k = k[len(prefix):]
        if k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp8":
            continue
        sk = prefix + k.removesuffix("weight") + "scale_weight"
        sd[k.removeprefix("text_model.")] = fp8lib.dequantize(v, file_dict.get(sk), torch.float32)
    if "shared.weight" in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return ref


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path
