"""Toy world: generator determinism, exact toy autoencoder, text encoder, judge accuracy and metrics, shipped models."""

import math

import numpy as np
import pytest
import torch

from dev2pro.toy import world
from dev2pro.toy.assets import asset_path, model_path


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for these tests: on this shared 2-core machine two threads made sampling the toy models
    ~25x slower (17 s vs 0.6 s for 16 images), the threads waiting for each other while other processes run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generator_is_deterministic_per_item():
    a = world.make_batch(8, seed=3)
    b = world.make_batch(8, seed=3)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    # item i does not depend on how many items are drawn, nor on where the draw starts
    c = world.make_batch(3, seed=3, start=5)
    assert torch.equal(c[0], a[0][5:8]) and c[1] == a[1][5:8]
    d = world.make_batch(8, seed=4)
    assert d[1] != a[1]


def test_captions_follow_the_grammar_and_parse_back():
    for s in world.scenes(50, seed=1) + world.scenes(20, seed=1, style=True):
        cap = s.caption()
        parsed = world.parse_caption(cap)
        assert parsed == {k: getattr(s, k) for k in world.ATTRIBUTES}
        assert (world.TRIGGER in cap) == s.style
    assert world.parse_caption("a circle") == {"shape": "circle"}
    assert world.parse_caption("") == {}


def test_render_draws_the_named_colours_where_expected():
    s = world.Scene("square", "red", "white", "large", "top left")
    img = world.render(s).astype(int)
    n = world.IMAGE_SIZE
    cx, cy = world._centre(s)
    assert tuple(img[int(cy * n), int(cx * n)]) == world.COLOURS["red"]
    assert tuple(img[n - 2, n - 2]) == world.BACKGROUNDS["white"]
    # the square covers (2 * 0.85 r)^2 of the image: mean coverage read from the green channel (red 40, white 240)
    covered = ((world.BACKGROUNDS["white"][1] - img[..., 1]) / (240 - world.COLOURS["red"][1])).mean()
    assert covered == pytest.approx((2 * 0.85 * world.SIZES["large"]) ** 2, abs=0.005)
    styled = world.render(world.Scene("square", "red", "black", "large", "center", style=True)).astype(int)
    stripe_rows = [(styled[y, n // 2] > 200).all() for y in range(n)]
    assert 4 <= sum(stripe_rows) <= 12  # white stripes inside the shape only


def test_write_dataset_layout(tmp_path):
    out = world.write_dataset(tmp_path / "d", n=3, seed=0, style=True)
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == ["00000", "00001", "00002"]
    from PIL import Image

    img = np.asarray(Image.open(pngs[1]))
    assert img.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert np.array_equal(img, world.render(world.scene(0, 1, style=True)))
    assert (out / "00001.txt").read_text().strip() == world.scene(0, 1, style=True).caption()


def test_toy_autoencoder_round_trip_is_exact_and_normalised():
    ae = world.ToyAutoencoder()
    x, _, _ = world.make_batch(64, seed=0)
    z = ae.encode(x)
    f = ae.downsample
    assert z.shape == (64, ae.latent_channels, world.IMAGE_SIZE // f, world.IMAGE_SIZE // f)
    assert ae.latent_channels == 3 * f * f
    torch.testing.assert_close(ae.decode(z), x, rtol=0, atol=1e-6)
    # unshuffle layout: latent channel c * f^2 + i * f + j holds pixel (f y + i, f x + j) of colour c
    assert z[0, 1 * f * f + f - 1, 2, 3] == (x[0, 1, f * 2 + 0, f * 3 + f - 1] - ae.shift) / ae.scale
    assert 0.9 < z.std() < 1.1 and abs(z.mean()) < 0.1
    with pytest.raises(ValueError):
        ae.encode(torch.zeros(1, 3, 31, 31))


def test_text_encoder_determinism_word_order_and_empty_prompt():
    te = world.ToyTextEncoder()
    caps = ["a small red circle on a blue background, top left", "a small blue circle on a red background, top left"]
    t1, p1 = te.encode(caps)
    t2, p2 = world.ToyTextEncoder().encode(caps)
    assert t1.shape == (2, te.max_length, te.context_dim) and p1.shape == (2, te.pooled_dim)
    assert t1.dtype == p1.dtype == torch.float32
    assert torch.equal(t1, t2) and torch.equal(p1, p2)
    # same words in another order: same pooled (bag of words), different sequence (position code)
    torch.testing.assert_close(p1[0], p1[1])
    assert not torch.allclose(t1[0], t1[1])
    # punctuation and case do not matter
    assert torch.equal(te.encode(["A Small, RED circle!"])[0], te.encode(["a small red circle"])[0])
    # empty prompt: all padding, pooled = the fixed bias; stable and distinct from any caption
    te_empty, pe_empty = te.encode([""])
    torch.testing.assert_close(te_empty[0], te.table[world.PAD].expand(te.max_length, -1) + te.positions)
    torch.testing.assert_close(pe_empty[0], te.pooled_bias)
    # unknown words (the trigger) get a stable hashed embedding
    assert torch.equal(te.embed_word(world.TRIGGER), world.ToyTextEncoder().embed_word(world.TRIGGER))
    assert world.TRIGGER not in world.VOCAB


def test_components_build_the_toy_world_defaults():
    from dev2pro.flux.autoencoder import load_autoencoder
    from dev2pro.flux.text_encoders import load_text_encoder

    ae, te = load_autoencoder("toy"), load_text_encoder("toy", "toy")
    assert ae.identity == world.ToyAutoencoder().identity and te.identity == world.ToyTextEncoder().identity
    from dev2pro.flux.models import PRESETS

    for name in ("tiny-dev", "tiny-pro", "toy-dev", "toy-pro"):
        spec = PRESETS[name]
        assert spec.in_channels == 4 * ae.latent_channels, name
        assert spec.context_in_dim == te.context_dim and spec.vec_in_dim == te.pooled_dim, name


# ---------------------------------------------------------------------------------------------------------------------
# Judge


def test_frechet_distance_matches_closed_form():
    from dev2pro.toy.judge import diversity, frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I): |mu|^2 = 3, tr(I + 4I - 2 * 2I) = 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # diagonal covariances: closed form sum (sqrt(s_a) - sqrt(s_b))^2
    sa, sb = torch.tensor([1.0, 4.0]), torch.tensor([9.0, 1.0])
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64) * sa.sqrt()
    y = torch.randn(20000, 2, generator=g, dtype=torch.float64) * sb.sqrt()
    assert frechet_distance(x, y) == pytest.approx(float(((sa.sqrt() - sb.sqrt()) ** 2).sum()), rel=0.05)
    assert diversity(torch.zeros(5, 4)) == 0.0
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert diversity(pts) == pytest.approx(5.0)


@pytest.fixture(scope="module")
def judge():
    from dev2pro.toy.judge import Judge

    return Judge.load()


def test_shipped_judge_reads_fresh_images(judge):
    from dev2pro.toy.judge import validate

    acc = validate(judge, n=512, seed=98765)
    assert min(acc.values()) >= 0.95, acc


def test_judge_scores_prompt_adherence_and_style(judge):
    x, caps, _ = world.make_batch(64, seed=4242)
    xs, caps_s, _ = world.make_batch(64, seed=4242, style=True)
    good = judge.score(x, caps)
    assert good["adherence"].mean() > 0.95 and good["style"].mean() < 0.1
    styled = judge.score(xs, caps_s)
    assert styled["adherence"].mean() > 0.9 and styled["style"].mean() > 0.9
    # the same images against shuffled captions: attributes mostly wrong
    wrong = judge.score(x, caps[1:] + caps[:1])
    assert wrong["adherence"].mean() < 0.6
    # a caption naming only the shape scores that attribute alone; one naming nothing is NaN
    one = judge.score(x[:2], [f"a {good['predicted']['shape'][0]}", ""])
    assert one["adherence"][0] == 1.0 and math.isnan(float(one["adherence"][1]))
    f = judge.features(x)
    assert f.shape == (64, 64)


# ---------------------------------------------------------------------------------------------------------------------
# Shipped toy models


@pytest.mark.parametrize("name", ["pro", "dev"])
def test_shipped_toy_models_load(name):
    if not model_path(name, must_exist=False).exists():
        pytest.skip("toy models not built yet (dev2pro toy build)")
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.models import PRESETS, has_guidance_embed

    model = load_transformer(f"toy:{name}")
    assert has_guidance_embed(model) == (name == "dev")
    spec = PRESETS[f"toy-{name}"]
    assert model.config.in_channels == spec.in_channels
    assert asset_path("toy.json").exists()


def test_shipped_toy_models_follow_prompts(judge):
    if not model_path("dev", must_exist=False).exists():
        pytest.skip("toy models not built yet (dev2pro toy build)")
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.sampling import generate

    _, captions, _ = world.make_batch(16, seed=31337)
    ae, text = world.ToyAutoencoder(), world.ToyTextEncoder()
    kw = dict(height=world.IMAGE_SIZE, width=world.IMAGE_SIZE, steps=12, seeds=[0], batch_size=16, progress=False)
    dev = load_transformer("toy:dev", dtype=torch.float32)
    pro = load_transformer("toy:pro", dtype=torch.float32)
    dev_imgs = generate(dev, ae, text, captions, guidance=3.5, **kw)
    pro_imgs = generate(pro, ae, text, captions, cfg=4.0, **kw)
    for imgs in (dev_imgs, pro_imgs):
        s = judge.score(imgs, captions)
        assert s["adherence"].mean() > 0.8 and s["style"].mean() < 0.2


def test_toy_cli_data_and_info(tmp_path, capsys):
    from dev2pro.cli import main

    assert main(["toy", "data", str(tmp_path / "d"), "--n", "2", "--style", "--seed", "5"]) == 0
    assert (tmp_path / "d" / "00001.txt").read_text().strip() == world.scene(5, 1, style=True).caption()
    assert main(["toy", "data", str(tmp_path / "e"), "--n", "0"]) == 2  # one-line user error
    assert "--n 0" in capsys.readouterr().err
    if asset_path("toy.json", must_exist=False).exists():
        assert main(["toy", "info"]) == 0
        assert "adherence" in capsys.readouterr().out


def test_build_pipeline_smoke(tmp_path):
    """The whole build (data -> train-base -> distill -> judge eval -> install) with tiny step counts."""
    import json

    from dev2pro.toy.build import BuildSettings, build

    s = BuildSettings(n_images=8, pro_steps=2, pro_batch=4, distill_steps=2, distill_batch=4, eval_prompts=2,
                      eval_seeds=1, eval_steps=2)
    meta = build(tmp_path / "work", s, install_to=tmp_path / "assets", progress=False)
    assert (tmp_path / "work" / "data" / "00007.txt").exists()
    installed = sorted(p.name for p in (tmp_path / "assets").iterdir())
    assert installed == ["toy-dev.safetensors", "toy-pro.safetensors", "toy.json"]
    saved = json.loads((tmp_path / "assets" / "toy.json").read_text())
    assert saved["settings"]["pro_steps"] == 2 and set(saved["eval"]) >= {"pro_cfg4", "dev_g3.5"}
    assert 0.0 <= meta["eval"]["dev_g3.5"]["adherence"] <= 1.0
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.flux.models import has_guidance_embed

    assert has_guidance_embed(load_transformer(tmp_path / "assets" / "toy-dev.safetensors"))
    assert not has_guidance_embed(load_transformer(tmp_path / "assets" / "toy-pro.safetensors"))
