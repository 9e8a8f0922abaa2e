"""Text encoders from the single safetensors files ComfyUI, kohya sd-scripts and fluxgym users hold:
`clip_l.safetensors`, `t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors`, ComfyUI's scaled fp8
(`t5xxl_fp8_e4m3fn_scaled`), and the text-encoder part of a full ComfyUI checkpoint. These files have no config.json
and no tokenizer: the architecture is read from the tensor shapes and the weights are loaded into transformers'
`CLIPTextModel` / `T5EncoderModel`.

Key layouts (ComfyUI comfy/sd.py + text_encoders/, kohya library/flux_utils.py, diffusers single_file_utils):

- CLIP-L: transformers' own keys, `text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.N....`,
  `text_model.final_layer_norm.*`; sometimes `text_projection.weight`, `logit_scale` or a whole `vision_model.`
  (a CLIPModel file), which the text model does not use.
- T5: `shared.weight` (and/or `encoder.embed_tokens.weight`, the same table), `encoder.block.N.layer.M....`,
  `encoder.final_layer_norm.weight`; a full T5 also has `decoder.*` / `lm_head.weight`, which are ignored.
- Full ComfyUI checkpoints prefix them: `text_encoders.clip_l.transformer.` and `text_encoders.t5xxl.transformer.`
  (older SD-style files `cond_stage_model.transformer.`).
- fp8: plain e4m3fn casts, or ComfyUI's scaled fp8: a `scaled_fp8` marker tensor and an fp32 `<linear>.scale_weight`
  per layer (real weight = w8 * scale), sometimes `scale_input` (ignored: we compute in bf16/fp32).

Architecture: T5 is fully determined by its shapes (heads from `relative_attention_bias`, d_kv = inner / heads, gated
GELU when `wi_0` exists). CLIP does not store its head count: the known sizes carry it (CLIP-L: 768 wide, 12 heads),
others take head dim 64 (true of every OpenAI/OpenCLIP text tower). The pooled output is taken at the first EOS
token, so the loader is given the tokenizer's EOS id.

fp8 T5 stays fp8 in memory (`fp8="keep"`): its linears become `dev2pro.flux.fp8.Fp8Linear` (dequantized per layer,
per call, in the compute dtype), so T5-XXL needs 5.9 GB instead of 9.5 GB in bf16, which is what lets caching run on
a 16 GB GPU with 32 GB RAM. Exception: the feed-forward output `wo` is dequantized, because transformers' T5 casts
the hidden states to `wo.weight.dtype` before it (an fp8 cast would destroy them). CLIP (123M parameters) is always
dequantized. Every tensor passes `dev2pro.flux.value_check` as it is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dev2pro.errors import CheckpointError
from dev2pro.flux import fp8 as fp8lib
from dev2pro.flux.checkpoint import set_tensor
from dev2pro.flux.safetensors_io import SafetensorsFile, open_safetensors
from dev2pro.flux.value_check import check_tensor

CLIP_KEY = "embeddings.token_embedding.weight"
T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
KIND_KEY = {"clip": CLIP_KEY, "t5": T5_KEY}
PREFIXES = {
    "clip": ("text_model.", "text_encoders.clip_l.transformer.text_model.", "cond_stage_model.transformer.text_model.",
             "transformer.text_model.", ""),
    "t5": ("", "text_encoders.t5xxl.transformer.", "transformer."),
}
IGNORED = {"clip": re.compile(r"^(vision_model\.|visual_projection\.|text_projection\.|logit_scale$)"),
           "t5": re.compile(r"^(decoder\.|lm_head\.)")}
FP8_MARKERS = ("scaled_fp8",)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

# Known sizes -> (name, config values the shapes do not give). Hub ids are those kohya and diffusers use.
KNOWN_CLIP = {(49408, 768, 12): ("CLIP-L (openai/clip-vit-large-patch14)", {"num_attention_heads": 12})}
KNOWN_T5 = {(32128, 4096, 24): "T5-XXL v1.1 (google/t5-v1_1-xxl)"}


@dataclass
class EncoderFile:
    """One text encoder inside a safetensors file: the open file, the key prefix, logical key -> stored key."""

    path: Path
    kind: str
    file: SafetensorsFile
    keys: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def read(self, key: str) -> torch.Tensor:
        return check_tensor(self.file.get(self.keys[key]), self.path, self.keys[key])

    def close(self) -> None:
        self.file.close()


def encoder_kinds(path) -> list[str]:
    """Which text encoders ('clip', 't5') a safetensors file holds, from its header only."""
    from dev2pro.flux.safetensors_io import read_header

    keys = set(read_header(path).tensors)
    return [kind for kind, key in KIND_KEY.items() if any(p + key in keys for p in PREFIXES[kind])]


def open_encoder_file(path, kind: str) -> EncoderFile:
    """The `kind` ('clip' or 't5') text encoder of a single file, prefixes stripped; CheckpointError when absent."""
    path = Path(path)
    f = open_safetensors(path)
    raw = f.keys()
    prefix = next((p for p in PREFIXES[kind] if p + KIND_KEY[kind] in f.header.tensors), None)
    if prefix is None:
        f.close()
        other = [k for k in KIND_KEY if k != kind and any(p + KIND_KEY[k] in f.header.tensors for p in PREFIXES[k])]
        hint = f"it holds a {other[0].upper()} text encoder" if other else f"found {len(raw)} tensors like " + \
            ", ".join(raw[:3])
        raise CheckpointError(f"{path}: no {kind.upper()} text encoder here (no '{KIND_KEY[kind]}'; {hint})")
    keys = {}
    for k in raw:
        logical = k[len(prefix):]
        if not k.startswith(prefix) or k.endswith(".scale_input") or logical in FP8_MARKERS:
            continue
        if not IGNORED[kind].match(logical):
            keys[logical] = k
    info = {k: f.info(v) for k, v in keys.items()}
    return EncoderFile(path, kind, f, keys, {k: i.shape for k, i in info.items()},
                       {k: i.dtype for k, i in info.items()})


def _count(shapes, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in shapes):
        n += 1
    return n


def _need(enc: EncoderFile, key: str) -> tuple[int, ...]:
    if key not in enc.shapes:
        raise CheckpointError(f"{enc.path}: {enc.kind.upper()} tensor '{key}' is missing (incomplete file?)")
    return enc.shapes[key]


def clip_config(enc: EncoderFile, eos_token_id: int | None = None):
    """`CLIPTextConfig` of a CLIP text tower from its shapes (`KNOWN_CLIP` adds the head count of the real sizes)."""
    from transformers import CLIPTextConfig

    vocab, hidden = _need(enc, CLIP_KEY)
    layers = _count(enc.shapes, "encoder.layers.{}.")
    name, extra = KNOWN_CLIP.get((vocab, hidden, layers), (None, {}))
    heads = extra.get("num_attention_heads", max(1, hidden // 64))
    eos = vocab - 1 if eos_token_id is None else int(eos_token_id)
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=_need(enc, "encoder.layers.0.mlp.fc1.weight")[0],
        max_position_embeddings=_need(enc, "embeddings.position_embedding.weight")[0],
        projection_dim=enc.shapes.get("text_projection.weight", (hidden,))[0], hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=max(0, eos - 1), eos_token_id=eos, pad_token_id=1), name


def t5_config(enc: EncoderFile):
    """`T5Config` of a T5 encoder from its shapes (all of T5's hyperparameters are visible in them)."""
    from transformers import T5Config

    emb = "shared.weight" if "shared.weight" in enc.shapes else "encoder.embed_tokens.weight"
    vocab, d_model = _need(enc, emb)
    layers = _count(enc.shapes, "encoder.block.{}.")
    inner = _need(enc, T5_KEY)[0]
    buckets, heads = _need(enc, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in enc.shapes
    d_ff = _need(enc, "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                   num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu" if gated else "relu", layer_norm_epsilon=1e-6,
                   is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    return cfg, KNOWN_T5.get((vocab, d_model, layers))


def _load(model: nn.Module, enc: EncoderFile, dtype: torch.dtype, device, keep_fp8: set[str]) -> nn.Module:
    """Assign every tensor of `enc` into `model` (built on meta); linears in `keep_fp8` become `Fp8Linear`."""
    for mpath in keep_fp8:
        lin = model.get_submodule(mpath)
        parent, _, name = mpath.rpartition(".")
        scale = enc.read(mpath + ".scale_weight") if mpath + ".scale_weight" in enc.keys else None
        new = fp8lib.Fp8Linear.from_quantized(enc.read(mpath + ".weight").to(device), scale, None)
        if scale is not None:
            new.scale_weight = new.scale_weight.to(device)
        assert lin.bias is None
        setattr(model.get_submodule(parent), name, new)
    for key in enc.keys:
        mpath, _, pname = key.rpartition(".")
        if mpath in keep_fp8 or pname == "scale_weight":
            continue
        t = enc.read(key)
        if t.dtype in FP8:
            sk = mpath + ".scale_weight"
            t = fp8lib.dequantize(t, enc.read(sk) if sk in enc.keys else None, torch.float32)
        if t.is_floating_point():
            t = t.to(dtype)
        set_tensor(model, key, t.to(device), str(enc.path))
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{enc.path}: {enc.kind.upper()} tensors missing: {', '.join(left[:3])}"
                              + (f" (+{len(left) - 3} more)" if len(left) > 3 else ""))
    return model.eval().requires_grad_(False)


def load_clip_file(path, dtype=torch.float32, device="cpu", eos_token_id: int | None = None):
    """A transformers `CLIPTextModel` from a single file (see the module docstring for the layouts)."""
    from transformers import CLIPTextModel

    enc = open_encoder_file(path, "clip")
    try:
        cfg, _ = clip_config(enc, eos_token_id)
        with torch.device("meta"):
            model = CLIPTextModel(cfg)
        if "embeddings.position_ids" not in enc.keys:
            model.embeddings.register_buffer(
                "position_ids", torch.arange(cfg.max_position_embeddings, device=device).unsqueeze(0),
                persistent=False)
        return _load(model, enc, dtype, device, set())
    finally:
        enc.close()


def load_t5_file(path, dtype=torch.float32, device="cpu", fp8: str = "keep"):
    """A transformers `T5EncoderModel` from a single file. fp8 linears stay fp8 with `fp8="keep"` (not `wo`, see the
    module docstring); `fp8="dequantize"` gives a plain model in `dtype`."""
    from transformers import T5EncoderModel

    enc = open_encoder_file(path, "t5")
    try:
        cfg, _ = t5_config(enc)
        with torch.device("meta"):
            model = T5EncoderModel(cfg)
        emb = "shared.weight" if "shared.weight" in enc.keys else "encoder.embed_tokens.weight"
        _load_embedding(model, enc, emb, dtype, device)
        enc.keys = {k: v for k, v in enc.keys.items() if not k.startswith(("shared.", "encoder.embed_tokens."))}
        keep = set()
        if fp8 == "keep":
            for key, dt in enc.dtypes.items():
                mpath = key.rpartition(".")[0]
                if (dt in FP8 and key.endswith(".weight") and key in enc.keys and not mpath.endswith(".wo")
                        and type(model.get_submodule(mpath)) is nn.Linear):
                    keep.add(mpath)
        return _load(model, enc, dtype, device, keep)
    finally:
        enc.close()


def _load_embedding(model, enc: EncoderFile, emb: str, dtype, device) -> None:
    """T5's token table: one tensor in the file, one Parameter shared by `shared` and `encoder.embed_tokens`."""
    t = enc.read(emb)
    if t.dtype in FP8:
        sk = emb.rpartition(".")[0] + ".scale_weight"
        t = fp8lib.dequantize(t, enc.read(sk) if sk in enc.keys else None, torch.float32)
    param = nn.Parameter(t.to(dtype).to(device), requires_grad=False)
    model.shared.weight = param
    model.encoder.embed_tokens.weight = param


def describe_encoder_file(path) -> str:
    """What `dev2pro inspect` shows for a text-encoder file: each encoder it holds, its architecture and storage."""
    from collections import Counter

    from dev2pro.flux.safetensors_io import read_header

    lines = [f"file:       {path}"]
    for kind in encoder_kinds(path):
        enc = open_encoder_file(path, kind)
        try:
            if kind == "t5":
                cfg, name = t5_config(enc)
                arch = (f"d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads of {cfg.d_kv}, "
                        f"d_ff {cfg.d_ff}, vocabulary {cfg.vocab_size}")
            else:
                cfg, name = clip_config(enc)
                arch = (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
                        f"vocabulary {cfg.vocab_size}, {cfg.max_position_embeddings} positions")
            dtypes = Counter(str(d).removeprefix("torch.") for d in enc.dtypes.values())
            scaled = any(k.endswith(".scale_weight") for k in enc.keys)
            fp8 = "scaled (ComfyUI scale_weight)" if scaled else "plain cast" if any(
                d in FP8 for d in enc.dtypes.values()) else "no"
            lines += [f"encoder:    {kind.upper()}: {name or 'size not among the known ones'} ({arch})",
                      "  dtypes:   " + ", ".join(f"{k} x {v}" for k, v in dtypes.most_common()) + f"; fp8: {fp8}"]
        finally:
            enc.close()
    lines.append("tokenizer:  none in the file: model.tokenizers / --tokenizers, model.path, or the hub defaults")
    size = read_header(path).size
    lines.append(f"size:       {size / 1e9:.3f} GB" if size >= 1e8 else f"size:       {size / 1e6:.2f} MB")
    return "\n".join(lines)
