"""The Euler sampler: closed-form velocity fields, CFG algebra, and diffusers' FluxPipeline loop as the oracle."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dev2pro.flux import sampling as S
from dev2pro.flux.flow import sampling_schedule
from dev2pro.flux.models import PRESETS, image_ids, pack_latents, random_transformer, text_ids
from dev2pro.lora.apply import apply_loras, parse_lora_arg


class PointMass(torch.nn.Module):
    """Exact velocity of x_t = (1 - t) x0 + t eps for data at the single point x0 = pooled (broadcast over tokens):
    v = eps - x0 = (x_t - x0) / t. Records the guidance values it receives."""

    def __init__(self, guidance_embeds=False):
        super().__init__()
        self.config = SimpleNamespace(guidance_embeds=guidance_embeds)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.guidance_seen = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, return_dict=False):
        self.guidance_seen.append(None if guidance is None else float(guidance[0]))
        t = timestep.reshape(-1, 1, 1)
        return ((hidden_states - pooled_projections[:, None, :]) / t,)


class Gaussian(torch.nn.Module):
    """Exact velocity for data x0 ~ N(m, s^2) per dimension: v = E[eps - x0 | x_t]. Its flow maps eps to m + s eps."""

    def __init__(self, m, s):
        super().__init__()
        self.config = SimpleNamespace(guidance_embeds=False)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.m, self.s = m, s

    def forward(self, hidden_states, timestep, **kw):
        x, t = hidden_states.double(), timestep.double().reshape(-1, 1, 1)
        var = (1 - t) ** 2 * self.s**2 + t**2
        r = x - (1 - t) * self.m
        e_x0 = self.m + (1 - t) * self.s**2 * r / var
        e_eps = t * r / var
        return ((e_eps - e_x0).float(),)


def _ids(n_txt=4):
    return image_ids(4, 4), text_ids(n_txt)


def test_get_noise_per_seed_is_independent_of_the_batch():
    a = S.get_noise(3, 12, 8, 6, seed=[5, 6, 7])
    b = S.get_noise(1, 12, 8, 6, seed=[6])
    assert a.shape == (3, 12, 8, 6) and torch.equal(a[1], b[0])
    assert torch.equal(S.get_noise(2, 4, 4, 4, seed=3), S.get_noise(2, 4, 4, 4, seed=3))
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("shift", [True, False])
def test_euler_recovers_point_mass_exactly(shift):
    model = PointMass()
    x0 = torch.randn(2, 8)
    x = torch.randn(2, 4, 8, dtype=torch.float32)
    img, txt_ids = _ids()
    ts = sampling_schedule(5, seq_len=4, shift=shift)
    out = S.denoise(model, x, torch.zeros(2, 4, 3), x0, img, txt_ids, ts)
    torch.testing.assert_close(out, x0[:, None, :].expand_as(out), rtol=0, atol=1e-5)


def test_euler_on_gaussian_data_converges_first_order():
    m, s = 0.7, 0.4
    eps = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(0))
    exact = m + s * eps  # the probability-flow map of a Gaussian: x_t = (1 - t) m + sigma_t eps
    img, txt_ids = _ids()
    errs = []
    for steps in (20, 40, 80):
        out = S.denoise(Gaussian(m, s), eps, torch.zeros(1, 4, 3), torch.zeros(1, 4), img, txt_ids,
                        sampling_schedule(steps, shift=False))
        errs.append((out - exact).abs().max().item())
    assert errs[2] < 0.03
    assert 1.6 < errs[0] / errs[1] < 2.4 and 1.6 < errs[1] / errs[2] < 2.4  # Euler is first order


def test_true_cfg_on_point_masses_lands_on_the_extrapolated_point():
    # v_u + s (v_c - v_u) for point masses a (cond) and b (uncond) is the point mass at b + s (a - b)
    model = PointMass()
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    x = torch.randn(1, 4, 8)
    img, txt_ids = _ids()
    ts = sampling_schedule(4, seq_len=4)
    txt = torch.zeros(1, 4, 3)
    for s in (1.0, 3.5):
        out = S.denoise(model, x, txt, a, img, txt_ids, ts, cfg=s, neg_txt=txt, neg_pooled=b)
        torch.testing.assert_close(out[0], (b + s * (a - b)).expand(4, 8), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="neg_txt"):
        S.denoise(model, x, txt, a, img, txt_ids, ts, cfg=2.0)


def test_default_guidance_rule():
    dev, pro = PointMass(guidance_embeds=True), PointMass(guidance_embeds=False)
    assert S.default_guidance(dev, None, 1.0) == 3.5
    assert S.default_guidance(dev, None, 4.0) == 1.0
    assert S.default_guidance(dev, 2.0, 4.0) == 2.0
    assert S.default_guidance(pro, 3.5, 1.0) is None


# ---------------------------------------------------------------------------------------------------------------------
# Oracle: diffusers' FluxPipeline sampling loop on the same tiny transformer, noise and embeddings


def _pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("preset,guidance,cfg", [("tiny-dev", 3.5, 1.0), ("tiny-pro", None, 2.5),
                                                 ("tiny-dev", 1.0, 3.0)])
def test_denoise_matches_diffusers_flux_pipeline(preset, guidance, cfg):
    spec = PRESETS[preset]
    model = random_transformer(spec, seed=0, std=0.1).eval()
    b, lh, lw, steps, n_txt = 2, 8, 8, 4, 6
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(b, spec.in_channels // 4, lh, lw, generator=g)
    txt, pooled = torch.randn(b, n_txt, spec.context_in_dim, generator=g), torch.randn(b, spec.vec_in_dim, generator=g)
    neg_txt, neg_pooled = torch.randn_like(txt), torch.randn_like(pooled)
    x = pack_latents(noise)

    ours = S.denoise(model, x, txt, pooled, image_ids(lh, lw), text_ids(n_txt),
                     sampling_schedule(steps, seq_len=x.shape[1]), guidance=guidance, cfg=cfg,
                     neg_txt=neg_txt, neg_pooled=neg_pooled)
    kwargs = dict(negative_prompt_embeds=neg_txt, negative_pooled_prompt_embeds=neg_pooled) if cfg != 1 else {}
    ref = _pipeline(model)(prompt_embeds=txt, pooled_prompt_embeds=pooled, latents=x, height=lh * 8, width=lw * 8,
                           num_inference_steps=steps, guidance_scale=guidance or 0.0, true_cfg_scale=cfg,
                           output_type="latent", **kwargs).images
    assert (ours - x).abs().mean() > 0.1  # the model really moved the latents
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# generate() end to end with the toy components


@pytest.fixture(scope="module")
def toy():
    from dev2pro.toy.world import ToyAutoencoder, ToyTextEncoder

    return random_transformer(PRESETS["tiny-dev"], seed=0, std=0.1), ToyAutoencoder(), ToyTextEncoder()


def test_generate_is_deterministic_per_seed_whatever_the_batch(toy):
    model, ae, text = toy
    prompts = ["a red circle on a black background", "a small blue square on a white background, top left"]
    kw = dict(height=16, width=16, steps=3, guidance=3.5, progress=False)
    all4 = S.generate(model, ae, text, prompts, seeds=[1, 2], batch_size=3, **kw)
    assert all4.shape == (4, 3, 16, 16) and all4.min() >= -1 and all4.max() <= 1
    one = S.generate(model, ae, text, prompts[1:], seeds=[2], batch_size=1, **kw)
    torch.testing.assert_close(all4[3], one[0], rtol=1e-5, atol=1e-5)  # prompt-major order: (p1, seed 2) is last
    assert not torch.allclose(all4[0], all4[1])  # seeds differ
    # precomputed embeddings (what trainers pass after freeing the encoders) give the same images
    emb = S.embed_prompts(text, prompts)
    torch.testing.assert_close(S.generate(model, ae, emb, prompts, seeds=[1, 2], batch_size=3, **kw), all4)
    # cfg = 1 is the conditional pass: the negative prompt has no effect
    torch.testing.assert_close(S.generate(model, ae, text, prompts[1:], seeds=[2], negative="red", cfg=1.0, **kw), one)


def test_generate_true_cfg_equals_manual_two_pass(toy):
    model, ae, text = toy
    model.train()
    prompt, neg = "a green cross on a gray background", "a red circle"
    out = S.generate(model, ae, text, [prompt], negative=neg, cfg=2.0, height=16, width=16, steps=2, seeds=[4],
                     progress=False)
    assert model.training  # mode restored
    txt, pooled = text.encode([prompt])
    ntxt, npooled = text.encode([neg])
    x = pack_latents(S.get_noise(1, 12, 8, 8, seed=[4]))
    with torch.no_grad():
        model.eval()
        z = S.denoise(model, x, txt, pooled, image_ids(8, 8), text_ids(txt.shape[1]),
                      sampling_schedule(2, seq_len=16), guidance=1.0, cfg=2.0, neg_txt=ntxt, neg_pooled=npooled)
        model.train()
    from dev2pro.flux.models import unpack_latents

    torch.testing.assert_close(out, ae.decode(unpack_latents(z, 8, 8)).clamp(-1, 1))


def test_generate_user_errors(toy):
    from dev2pro.errors import UserError

    model, ae, text = toy
    with pytest.raises(UserError, match="multiple of 4"):
        S.generate(model, ae, text, ["a"], height=18, width=16, progress=False)
    bad_text = SimpleNamespace(encode=lambda p: (torch.zeros(len(p), 3, 7), torch.zeros(len(p), 32)))
    with pytest.raises(UserError, match="context 7"):
        S.generate(model, ae, bad_text, ["a"], height=16, width=16, steps=1, progress=False)


def test_grid_and_pil(tmp_path):
    imgs = torch.rand(5, 3, 6, 4) * 2 - 1
    tiles = S.to_pil(imgs)
    assert tiles[0].size == (4, 6)
    expected = ((imgs[2].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert (np.asarray(tiles[2]) == expected).all()
    grid = S.save_grid(imgs, tmp_path / "g.png", ncols=3)
    assert grid.size == (3 * 4 + 4 * 2, 2 * 6 + 3 * 2)
    assert grid.crop((2 + 2 * 6, 2, 2 + 2 * 6 + 4, 8)).tobytes() == tiles[2].tobytes()  # third tile, first row
    assert (tmp_path / "g.png").exists()


def test_parse_lora_arg():
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.75") == ("style.safetensors", 0.75)
    assert parse_lora_arg(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors:-1") == (r"C:\loras\x.safetensors", -1.0)


def test_apply_loras_merges_each_file_at_its_strength(tmp_path):
    from dev2pro.errors import UserError
    from dev2pro.lora.files import save_lora
    from dev2pro.lora.inject import LoraLayer, LoraWeights

    g = torch.Generator().manual_seed(0)
    key = "transformer_blocks.0.attn.to_q"
    a = LoraLayer(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 1.0)
    b = LoraLayer(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 8.0)
    save_lora(tmp_path / "a.safetensors", LoraWeights(layers={key: a}), format="kohya")
    save_lora(tmp_path / "b.safetensors", LoraWeights(layers={key: b}), format="diffusers")
    model = random_transformer(PRESETS["tiny-dev"], seed=0)
    w0 = model.transformer_blocks[0].attn.to_q.weight.detach().clone()
    assert apply_loras(model, [(str(tmp_path / "a.safetensors"), 0.5), (str(tmp_path / "b.safetensors"), -1.0)]) \
        is model
    expected = w0 + 0.5 * (1.0 / 2) * a.up @ a.down - 1.0 * (8.0 / 4) * b.up @ b.down
    torch.testing.assert_close(model.transformer_blocks[0].attn.to_q.weight.detach(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="not found"):
        apply_loras(model, [(str(tmp_path / "missing.safetensors"), 1.0)])
