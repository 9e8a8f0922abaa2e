"""Text encoders from single files (ComfyUI / kohya layouts, fp16, bf16, fp8, scaled fp8) give the embeddings of the
transformers models they were written from; tokenizers are found or the error says what to set."""

import pytest
import torch

from dev2pro.commands.inspect_cmd import describe
from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import encoder_files
from dev2pro.flux.fp8 import Fp8Linear, relative_rms
from dev2pro.flux.text_encoders import FluxTextEncoders, load_text_encoder
from encoder_builders import (
    clip_file_dict,
    dequantized_copy,
    t5_file_dict,
    tiny_clip,
    tiny_t5,
    tiny_tokenizer,
    write,
)

PROMPTS = ["a photo of a cat in the park", "zxq style portrait of a red dog", ""]
MAX_LEN = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    toks = d / "snapshot"
    tiny_tokenizer(toks / "tokenizer", "clip")
    tiny_tokenizer(toks / "tokenizer_2", "t5")
    return d, toks, tiny_clip(), tiny_t5()


def reference(world, clip, t5) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    _, toks, _, _ = world
    enc = FluxTextEncoders(t5, AutoTokenizer.from_pretrained(toks / "tokenizer_2"), clip,
                           AutoTokenizer.from_pretrained(toks / "tokenizer"), max_length=MAX_LEN)
    return enc.encode(PROMPTS)


def encode_files(world, t5_file, clip_file, **kw):
    _, toks, _, _ = world
    enc = load_text_encoder(str(t5_file), str(clip_file), max_length=MAX_LEN, tokenizers=str(toks), **kw)
    return enc, enc.encode(PROMPTS)


def test_fp16_files_match_the_fp16_models_exactly(world):
    d, _, clip, t5 = world
    t5_f = write(d / "t5xxl_fp16.safetensors", t5_file_dict(t5, torch.float16))
    clip_f = write(d / "clip_l.safetensors", clip_file_dict(clip, torch.float16))
    enc, (txt, pooled) = encode_files(world, t5_f, clip_f)
    ref_txt, ref_pooled = reference(world, dequantized_copy(clip, clip_file_dict(clip)),
                                    dequantized_copy(t5, t5_file_dict(t5)))
    assert torch.equal(txt, ref_txt) and torch.equal(pooled, ref_pooled)
    assert (enc.context_dim, enc.pooled_dim) == (t5.config.d_model, clip.config.hidden_size)
    # the fp16 round trip itself is small next to the embeddings (the files hold the models, not something else)
    orig_txt, orig_pooled = reference(world, clip, t5)
    assert relative_rms(txt, orig_txt) < 1e-2 and relative_rms(pooled, orig_pooled) < 1e-2


def test_full_comfyui_checkpoint_bf16_holds_both_encoders(world):
    d, _, clip, t5 = world
    tensors = {**t5_file_dict(t5, torch.bfloat16, prefix="text_encoders.t5xxl.transformer."),
               **clip_file_dict(clip, torch.bfloat16, prefix="text_encoders.clip_l.transformer."),
               "model.diffusion_model.img_in.weight": torch.zeros(4, 4)}
    ckpt = write(d / "flux1-dev-full.safetensors", tensors)
    assert encoder_files.encoder_kinds(ckpt) == ["clip", "t5"]
    assert "encoder:    CLIP: " in describe(ckpt) and "encoder:    T5: " in describe(ckpt)
    _, (txt, pooled) = encode_files(world, ckpt, ckpt)
    ref_txt, ref_pooled = reference(
        world, dequantized_copy(clip, clip_file_dict(clip, torch.bfloat16, "p."), "p."),
        dequantized_copy(t5, t5_file_dict(t5, torch.bfloat16, "p."), "p."))
    assert torch.equal(txt, ref_txt) and torch.equal(pooled, ref_pooled)


@pytest.mark.parametrize("kind", ["plain", "scaled"])
def test_fp8_t5_stays_fp8_and_matches(world, kind):
    d, _, clip, t5 = world
    tensors = t5_file_dict(t5, fp8=kind)
    t5_f = write(d / f"t5xxl_fp8_{kind}.safetensors", tensors)
    clip_f = write(d / "clip_l_fp8.safetensors", {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v
                                                  for k, v in clip_file_dict(clip, torch.float32).items()})
    enc, (txt, pooled) = encode_files(world, t5_f, clip_f)
    fp8_linears = [m for n, m in enc.t5.named_modules() if isinstance(m, Fp8Linear)]
    # every block linear but the feed-forward outputs (wo) stays fp8: 2 layers x (q, k, v, o, wi_0, wi_1)
    assert len(fp8_linears) == 12 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8_linears)
    assert all(m.scaling == ("tensor" if kind == "scaled" else "none") for m in fp8_linears)
    shown = describe(t5_f)  # `dev2pro inspect`
    assert "T5: size not among the known ones (d_model 64, 2 layers, 4 heads of 16, d_ff 96" in shown
    assert ("fp8: scaled (ComfyUI scale_weight)" if kind == "scaled" else "fp8: plain cast") in shown
    # same numbers as the transformers models holding the dequantized file values ...
    clip_ref = dequantized_copy(clip, {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v
                                       for k, v in clip_file_dict(clip, torch.float32).items()})
    ref_txt, ref_pooled = reference(world, clip_ref, dequantized_copy(t5, tensors))
    assert torch.allclose(txt, ref_txt, atol=1e-5, rtol=1e-5) and torch.allclose(pooled, ref_pooled, atol=1e-5)
    # ... and within fp8 rounding of the original models (scaled fp8 is the finer of the two)
    orig_txt, _ = reference(world, clip, t5)
    assert relative_rms(txt, orig_txt) < (0.15 if kind == "scaled" else 0.3)


def test_architecture_from_shapes_real_sizes():
    """The real T5-XXL and CLIP-L shapes give their published configurations (no tensors needed)."""
    t5_shapes = {"shared.weight": (32128, 4096), encoder_files.T5_KEY: (4096, 4096),
                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
                 "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
                 **{f"encoder.block.{i}.layer.0.layer_norm.weight": (4096,) for i in range(24)}}
    cfg, name = encoder_files.t5_config(encoder_files.EncoderFile("t5.sft", "t5", None, {}, t5_shapes, {}))
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers) == (4096, 64, 64, 10240, 24)
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and "T5-XXL" in name
    clip_shapes = {"embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768),
                   "encoder.layers.0.mlp.fc1.weight": (3072, 768),
                   **{f"encoder.layers.{i}.layer_norm1.weight": (768,) for i in range(12)}}
    cfg, name = encoder_files.clip_config(encoder_files.EncoderFile("c.sft", "clip", None, {}, clip_shapes, {}),
                                          eos_token_id=49407)
    assert (cfg.num_attention_heads, cfg.intermediate_size, cfg.eos_token_id, cfg.hidden_act) == (
        12, 3072, 49407, "quick_gelu") and "CLIP-L" in name


def test_wrong_file_and_corrupt_values_name_the_file_and_tensor(world):
    d, _, clip, t5 = world
    clip_f = write(d / "clip_only.safetensors", clip_file_dict(clip))
    with pytest.raises(CheckpointError, match="no T5 text encoder here.*holds a CLIP"):
        encode_files(world, clip_f, clip_f)
    bad = t5_file_dict(t5)
    bad["encoder.block.1.layer.0.SelfAttention.v.weight"][0, 0] = float("nan")
    t5_bad = write(d / "t5_nan.safetensors", bad)
    with pytest.raises(CheckpointError, match=r"t5_nan.safetensors: tensor 'encoder.block.1.layer.0.SelfAttention"
                                              r".v.weight' holds NaN"):
        encode_files(world, t5_bad, clip_f)


def test_missing_tokenizer_says_what_to_set(world, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    d, _, clip, t5 = world
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # the hub default cannot be reached, nothing cached
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t5_f = write(d / "t5_tok.safetensors", t5_file_dict(t5))
    clip_f = write(d / "clip_tok.safetensors", clip_file_dict(clip))
    with pytest.raises(UserError, match=r"no T5 tokenizer for .*t5_tok.safetensors: set model.tokenizers .*"
                                        r"tokenizer_2/.*google/t5-v1_1-xxl"):
        load_text_encoder(str(t5_f), str(clip_f))
    with pytest.raises(UserError, match=r"model.tokenizers = .*: no T5 tokenizer there"):
        load_text_encoder(str(t5_f), str(clip_f), tokenizers=str(tmp_path))
    # a model folder without tokenizers is skipped; the snapshot in model.tokenizers is used
    _, toks, _, _ = world
    enc = load_text_encoder(str(t5_f), str(clip_f), tokenizers=str(toks), model_path=str(tmp_path),
                            max_length=MAX_LEN)
    assert enc.encode(["a cat"])[0].shape == (1, MAX_LEN, t5.config.d_model)
