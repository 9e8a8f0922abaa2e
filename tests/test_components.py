"""Autoencoder and text-encoder loaders against diffusers/transformers references, with tiny random components
written to temp folders (no downloads)."""

import string
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dev2pro.errors import CheckpointError, UserError
from dev2pro.flux import ae_keymap, autoencoder, encoders, text_encoders

TINY_AE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64], layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=32,
    scaling_factor=autoencoder.FLUX_AE_SCALE, shift_factor=autoencoder.FLUX_AE_SHIFT, use_quant_conv=False,
    use_post_quant_conv=False,
)


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_AE).eval()
    with torch.no_grad():  # perturb the norms too, so a swapped key cannot go unnoticed
        for p in vae.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def ae_files(tiny_vae, tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    tiny_vae.save_pretrained(root / "diffusers")
    tiny_vae.save_pretrained(root / "pipeline" / "vae")
    bfl = ae_keymap.diffusers_to_bfl_ae(tiny_vae.state_dict(), num_up=2)
    save_file({k: v.contiguous() for k, v in bfl.items()}, root / "ae.safetensors")
    save_file({"first_stage_model." + k: v.contiguous() for k, v in bfl.items()}, root / "comfy_vae.safetensors")
    (root / "bfl_repo").mkdir()
    save_file({k: v.contiguous() for k, v in bfl.items()}, root / "bfl_repo" / "ae.safetensors")
    return root


def test_ae_key_table_matches_diffusers_converter(tiny_vae):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = tiny_vae.state_dict()
    bfl = ae_keymap.diffusers_to_bfl_ae(sd, num_up=2)
    assert "decoder.up.1.upsample.conv.weight" in bfl and "encoder.mid.attn_1.q.weight" in bfl
    assert bfl["encoder.mid.attn_1.q.weight"].ndim == 4  # ldm 1x1 conv
    ref = convert_ldm_vae_checkpoint(bfl, TINY_AE)  # diffusers' own ldm -> diffusers converter is the oracle
    ours = ae_keymap.bfl_to_diffusers_ae(bfl, num_up=2)
    assert set(ref) == set(sd) == set(ours)
    for k in sd:
        assert torch.equal(ref[k], sd[k]), k
        assert torch.equal(ours[k], sd[k]), k
    cfg = autoencoder.ae_config_from_bfl(bfl)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "use_quant_conv", "use_post_quant_conv"):
        assert cfg[key] == TINY_AE[key], key


def test_bfl_file_and_diffusers_folder_encode_decode_identically(tiny_vae, ae_files):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = tiny_vae.encode(images).latent_dist.mean
        expected = autoencoder.FLUX_AE_SCALE * (mean - autoencoder.FLUX_AE_SHIFT)
        z = torch.randn(2, 16, 16, 16)
        expected_img = tiny_vae.decode(z / autoencoder.FLUX_AE_SCALE + autoencoder.FLUX_AE_SHIFT).sample.clamp(-1, 1)
    refs = ["diffusers", "pipeline", "ae.safetensors", "comfy_vae.safetensors", "bfl_repo"]
    aes = [autoencoder.load_autoencoder(ae_files / r) for r in refs]
    for ref, ae in zip(refs, aes):
        assert isinstance(ae, encoders.Autoencoder)
        assert (ae.latent_channels, ae.downsample) == (16, 2), ref
        lat = ae.encode(images)
        assert lat.dtype == torch.float32 and lat.shape == (2, 16, 16, 16)
        torch.testing.assert_close(lat, expected, rtol=1e-5, atol=1e-5, msg=ref)
        torch.testing.assert_close(ae.decode(z), expected_img, rtol=1e-5, atol=1e-5, msg=ref)
    lat64 = aes[0].to(dtype=torch.float64).encode(images)  # compute dtype moves, the output stays float32
    assert lat64.dtype == torch.float32 and aes[0].dtype == torch.float64
    torch.testing.assert_close(lat64, expected, rtol=1e-5, atol=1e-5)
    aes[0].to(dtype=torch.float32)
    # the identity depends on weights and scaling, not on the file format
    assert len({ae.identity for ae in aes}) == 1
    other = autoencoder.FluxAutoencoder(tiny_vae, scale=1.0, shift=0.0)
    assert other.identity != aes[0].identity


def test_ae_loading_errors(tmp_path):
    pkl = tmp_path / "ae.ckpt"
    pkl.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        autoencoder.load_autoencoder(pkl)
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors.*not an autoencoder"):
        autoencoder.load_autoencoder(tmp_path / "other.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        autoencoder.load_autoencoder(tmp_path / "trunc.safetensors")
    with pytest.raises(UserError, match="not found"):
        autoencoder.load_autoencoder(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="no autoencoder here"):
        autoencoder.load_autoencoder(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Text encoders


def _tiny_tokenizers():
    from transformers import CLIPTokenizer, T5Tokenizer

    letters = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=text_encoders.CLIP_MAX_LENGTH)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in letters] + [("\u2581" + c, -1.5) for c in letters] + [("\u2581cat", -1.0)]
    t5_tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    return t5_tok, clip_tok


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5_tok, clip_tok = _tiny_tokenizers()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=24, intermediate_size=48,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    root = tmp_path_factory.mktemp("text")
    for model, tok, name in ((t5, t5_tok, "t5"), (clip, clip_tok, "clip")):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    t5.save_pretrained(root / "pipe" / "text_encoder_2")
    t5_tok.save_pretrained(root / "pipe" / "tokenizer_2")
    clip.save_pretrained(root / "pipe" / "text_encoder")
    clip_tok.save_pretrained(root / "pipe" / "tokenizer")
    return root, (t5, t5_tok, clip, clip_tok)


def test_text_encoders_match_flux_pipeline_encode_prompt(text_folders):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    root, (t5, t5_tok, clip, clip_tok) = text_folders
    prompts = ["a cat", "the dog sat on a mat with a cat"]
    enc = text_encoders.load_text_encoder(root / "t5", root / "clip", max_length=16)
    assert isinstance(enc, encoders.TextEncoder)
    assert (enc.context_dim, enc.pooled_dim, enc.max_length) == (32, 24, 16)
    txt, pooled = enc.encode(prompts)
    assert txt.shape == (2, 16, 32) and pooled.shape == (2, 24) and txt.dtype == pooled.dtype == torch.float32
    # diffusers' FluxPipeline.encode_prompt on the same models is the reference
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=None)
    ref_txt, ref_pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(txt, ref_txt.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled.float(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(pooled[0], pooled[1])  # different prompts really differ

    # pipeline layout (one folder for both), same numbers and same identity
    enc2 = text_encoders.load_text_encoder(root / "pipe", max_length=16)
    txt2, pooled2 = enc2.encode(prompts)
    assert torch.equal(txt, txt2) and torch.equal(pooled, pooled2)
    assert enc2.identity == enc.identity
    assert text_encoders.load_text_encoder(root / "pipe", max_length=8).identity != enc.identity

    encoders.free(enc2)
    assert all(p.device.type == "meta" for p in enc2.t5.parameters())


def test_text_encoder_errors(tmp_path, text_folders):
    root, _ = text_folders
    with pytest.raises(UserError, match="no T5 model here"):
        text_encoders.load_text_encoder(tmp_path, root / "clip")
    with pytest.raises(UserError, match="not found"):
        text_encoders.load_text_encoder("./nope/t5", root / "clip")
    with pytest.raises(UserError, match="toy text encoder replaces both"):
        text_encoders.load_text_encoder("toy", root / "clip")


def test_named_refs_resolve_through_the_provider_registry(monkeypatch, tmp_path):
    """`flux` never imports the toy world: "toy" (and any registered name) resolves through `flux.providers`."""
    from dev2pro.flux import providers, sources

    fake = types.ModuleType("fake_provider")
    fake.autoencoder = lambda: "fake-ae"
    fake.text_encoder = lambda: "fake-text"
    fake.model_path = lambda name: tmp_path / f"{name}.safetensors"
    monkeypatch.setitem(providers.PROVIDERS, "toy", fake)
    assert autoencoder.load_autoencoder("toy") == "fake-ae"
    assert text_encoders.load_text_encoder("toy", "toy") == "fake-text"
    assert text_encoders.load_text_encoder("toy") == "fake-text"
    assert sources.resolve_ref("toy:pro") == tmp_path / "pro.safetensors"
    assert sources.resolve_ref("some/file:with-colon.safetensors") == Path("some/file:with-colon.safetensors")
    monkeypatch.setitem(providers.PROVIDERS, "mine", types.ModuleType("bare"))
    with pytest.raises(UserError, match="'mine' provides no autoencoder"):
        autoencoder.load_autoencoder("mine")


def test_flux_layer_imports_nothing_above_it():
    """Layering: `dev2pro.flux` imports no LoRA, data, training, evaluation or toy module (checked in a fresh
    interpreter, so nothing imported by other tests hides it)."""
    code = ("import importlib, pkgutil, sys, dev2pro.flux\n"
            "for m in pkgutil.iter_modules(dev2pro.flux.__path__): importlib.import_module('dev2pro.flux.' + m.name)\n"
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['dev2pro', 'lora'], ['dev2pro', 'data'], "
            "['dev2pro', 'train'], ['dev2pro', 'eval'], ['dev2pro', 'toy'])]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_real_flux_ae_layout_on_meta():
    """The full-size Flux AE built on `meta` (nothing allocated) maps to BFL's ae.safetensors layout: 244 tensors,
    83,819,683 parameters (335 MB in fp32, the size of the shipped file), and the config is inferred back exactly."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**autoencoder.FLUX_AE_CONFIG)
    bfl = ae_keymap.diffusers_to_bfl_ae(vae.state_dict(), num_up=4)
    assert len(bfl) == 244 and sum(t.numel() for t in bfl.values()) == 83_819_683
    assert tuple(bfl["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(bfl["decoder.conv_in.weight"].shape) == (512, 16, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in bfl and "decoder.up.3.upsample.conv.weight" in bfl
    assert autoencoder.ae_config_from_bfl(bfl) == autoencoder.FLUX_AE_CONFIG


def test_free_moves_weights_to_meta_without_walking_the_heap(monkeypatch):
    """On a CPU run `free` must not call gc.collect() (a heap walk, ~0.25 s in a big process, for nothing): the move to
    `meta` already drops the weights' storage."""
    import gc

    def no_collect(*_a, **_k):
        raise AssertionError("gc.collect() called on a CPU-only free")

    monkeypatch.setattr(gc, "collect", no_collect)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    encoders.free(m)
    assert all(p.device.type == "meta" for p in m.parameters())
    encoders.free(None)  # accepted, nothing to do
