"""`dev2pro.eval` (compare and its parts): statistics against closed forms, the work plan, the verdict, and a full
run with a fake toolkit (images whose judge scores are known in closed form) producing the report files."""

import contextlib
import dataclasses
import json
import math
import statistics

import numpy as np
import pytest
import torch

from dev2pro.config import from_dict
from dev2pro.errors import ConfigError, UserError
from dev2pro.eval import compare as C
from dev2pro.eval import judges as J
from dev2pro.eval import plan as P
from dev2pro.eval import stats as S
from dev2pro.eval import toolkit as T
from dev2pro.eval import verdict as V

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# statistics


def _t_quantile_closed_form(p: float, df: int) -> float:
    """Closed forms of Student's t quantile for df = 1, 2, 4 (Hill 1970 / Wikipedia 'Student's t-distribution')."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    if df == 4:
        a = 4 * p * (1 - p)
        q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
        return math.copysign(2 * math.sqrt(q - 1), p - 0.5)
    raise ValueError(df)


@pytest.mark.parametrize("df", [1, 2, 4])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.025])
def test_student_t_ppf_matches_closed_forms(p, df):
    assert S.student_t_ppf(p, df) == pytest.approx(_t_quantile_closed_form(p, df), rel=1e-6, abs=1e-7)


def test_student_t_ppf_tends_to_normal_and_table_values():
    assert S.student_t_ppf(0.975, 10_000) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), rel=2e-4)
    # printed tables (e.g. NIST e-handbook 1.3.6.7.2): t_{0.975} for df 10 and 30
    assert S.student_t_ppf(0.975, 10) == pytest.approx(2.228, abs=1e-3)
    assert S.student_t_ppf(0.975, 30) == pytest.approx(2.042, abs=1e-3)


def test_mean_ci_is_the_t_interval():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    e = S.mean_ci(x, 0.95)
    half = _t_quantile_closed_form(0.975, 4) * statistics.stdev(x) / math.sqrt(5)
    assert (e.mean, e.n, e.method) == (3.0, 5, "t")
    assert e.lo == pytest.approx(3.0 - half, rel=1e-7) and e.hi == pytest.approx(3.0 + half, rel=1e-7)
    one = S.mean_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.lo) and one.fmt() == "0.700"
    assert math.isnan(S.mean_ci([]).mean) and S.mean_ci([]).fmt() == "n/a"
    assert S.mean_ci([2.0, float("nan"), 4.0]).mean == 3.0  # nan values are dropped


def test_jackknife_of_the_mean_is_the_t_interval():
    x = np.random.default_rng(1).normal(2.0, 1.0, 40)
    e = S.jackknife_ci(len(x), lambda idx: x[idx].mean(), 0.95)
    t = S.mean_ci(x, 0.95)
    assert e.mean == pytest.approx(t.mean) and e.lo == pytest.approx(t.lo) and e.hi == pytest.approx(t.hi)
    # a nonlinear statistic: the plug-in variance; jackknife se^2 = (n-1)/n sum (v_(i) - v_.)^2 by definition
    v = lambda idx: x[idx].var()  # noqa: E731
    loo = np.array([x[np.arange(40) != i].var() for i in range(40)])
    se = math.sqrt(39 / 40 * ((loo - loo.mean()) ** 2).sum())
    e = S.jackknife_ci(40, v, 0.95)
    assert e.hi - e.mean == pytest.approx(S.student_t_ppf(0.975, 39) * se) and e.mean == pytest.approx(x.var())


def test_pairwise_diversity():
    f = np.array([[0.0, 0], [1, 0], [3, 0], [5, 5]])
    d = S.pairwise_diversity(f, np.array([0, 0, 0, 1]))
    assert d[0] == pytest.approx((1 + 3 + 2) / 3) and math.isnan(d[1])


# ---------------------------------------------------------------------------------------------------------------------
# verdict


def _est(m, half=0.01):
    return S.Estimate(m, m - half, m + half, 8, "t")


def implied_verdict(cells: dict, claim: tuple[str, str], higher_is_better: bool = True) -> tuple[bool, bool]:
    """(reproduced, clear) that the numbers imply, written independently of `claim_verdict`: reproduced when the
    claimed cell's mean is strictly better than every other cell's; clear when, in addition, its interval lies beyond
    the runner-up's (nan bounds: not clear)."""
    sign = 1.0 if higher_is_better else -1.0
    others = [e for k, e in cells.items() if k != claim and math.isfinite(e.mean)]
    e = cells[claim]
    if not others:
        return True, False
    runner_up = max(others, key=lambda o: sign * o.mean)
    reproduced = sign * e.mean > sign * runner_up.mean
    clear = reproduced and (e.lo > runner_up.hi if higher_is_better else e.hi < runner_up.lo)
    return reproduced, bool(clear)


def test_claim_verdict_reproduced_clearly_and_not():
    desc = lambda c: f"{c[0]}->{c[1]}"  # noqa: E731
    cells = {"score": {("pro", "dev"): _est(0.9), ("dev", "dev"): _est(0.5), ("pro", "pro"): _est(0.6)},
             "fd": {("pro", "dev"): _est(3.0), ("dev", "dev"): _est(1.0), ("pro", "pro"): _est(2.0)}}
    v = V.claim_verdict(cells, ("pro", "dev"), "score", desc)
    assert v["reproduced"] is True and v["clear"] is True and v["text"].startswith("**Reproduced clearly.**")
    assert v["ranks"] == {"score": [1, 3], "fd": [3, 3]}  # lower fd is better
    v = V.claim_verdict(cells, ("pro", "dev"), "fd", desc)
    assert v["reproduced"] is False and "dev->dev is best" in v["text"] and "ranks 3 of 3" in v["text"]
    assert implied_verdict(cells["fd"], ("dev", "dev"), higher_is_better=False) == (True, True)
    assert V.claim_verdict(cells, ("dev", "dev"), "fd", desc)["reproduced"] is True
    cells["score"][("dev", "dev")] = _est(0.89, 0.05)
    v = V.claim_verdict(cells, ("pro", "dev"), "score", desc)
    assert v["reproduced"] is True and v["clear"] is False and "not significant" in v["text"]
    cells["score"][("dev", "dev")] = _est(0.9, 0.05)  # a tie for first is not a reproduction; ties share ranks
    v = V.claim_verdict(cells, ("pro", "dev"), "score", desc)
    assert v["reproduced"] is False and "(tie)" in v["text"] and v["ranks"]["score"] == [1, 3]
    assert implied_verdict(cells["score"], ("pro", "dev")) == (False, False)


# ---------------------------------------------------------------------------------------------------------------------
# a full run with a fake toolkit

BASE_RED = {"dev": 0.1, "pro": 0.0}
LORA_RED = {"weak": 0.3, "strong": 0.6}
MAIN_GUIDANCE = {"dev": 3.5, "pro": 3.0}  # as in _config


def fake_scores() -> dict[tuple[str, str], float]:
    """The fake's closed-form score per LoRA cell at the main guidance: style (base red + LoRA red) x adherence
    (1 - g/10); every image of a cell has the same value, so the intervals are points."""
    return {(lora, b): (BASE_RED[b] + LORA_RED[lora]) * (1 - MAIN_GUIDANCE[b] / 10) for lora in LORA_RED
            for b in BASE_RED}


class FakeToolkit:
    """Images are constant colours: red = base offset + LoRA effect (+ step/10 for checkpoints), green = guidance/10,
    blue = 0.01 * seed. The fake judge reads style = mean red, adherence = 1 - mean green, features = channel means."""

    def __init__(self):
        self.loaded, self.merged = [], []

    def load_base(self, entry):
        self.loaded.append(entry.name)
        return {"name": entry.name, "red": BASE_RED[entry.name]}

    @contextlib.contextmanager
    def apply_lora(self, model, path, strength):
        name = path.parent.parent.name if path.parent.name.startswith("checkpoint-") else path.stem
        extra = int(path.parent.name.split("-")[1]) / 100 if path.parent.name.startswith("checkpoint-") else 0.0
        self.merged.append((model["name"], path.name))
        model["red"] += strength * (LORA_RED[name] - extra)
        yield
        model["red"] -= strength * (LORA_RED[name] - extra)

    def generate(self, model, prompts, seeds, *, entry, guidance, sampling):
        assert entry.mode == {"dev": "embedded", "pro": "cfg"}[entry.name]
        n = len(prompts) * len(seeds)
        assert n <= max(sampling.batch_size, len(seeds))
        out = torch.zeros(n, 3, sampling.height, sampling.width)
        out[:, 0] = model["red"]
        out[:, 1] = guidance / 10
        out[:, 2] = torch.tensor([0.01 * s for _ in prompts for s in seeds])[:, None, None]  # prompt-major
        return out

    def judge(self, metrics):
        return FakeJudge()

    def release(self, model):
        pass


class FakeJudge:
    def score(self, images, prompts):
        return {"style": images[:, 0].mean((1, 2)).numpy(), "adherence": 1 - images[:, 1].mean((1, 2)).numpy()}

    def features(self, images):
        return images.mean((2, 3)).double().numpy()

    def frechet(self, a, b):
        return float(((a.mean(0) - b.mean(0)) ** 2).sum())


def _config(tmp_path, **over):
    runs = tmp_path / "runs"
    for name in LORA_RED:
        (runs / name).mkdir(parents=True)
        (runs / name / f"{name}.safetensors").write_bytes(b"")
        for step in (10, 20):
            (runs / name / f"checkpoint-{step}").mkdir()
            (runs / name / f"checkpoint-{step}" / f"{name}.safetensors").write_bytes(b"")
    from PIL import Image

    (tmp_path / "ref").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (255, 127, 127)).save(tmp_path / "ref" / f"{i}.png")  # [-1, 1]: (1, ~0, ~0)
    data = {
        "bases": [{"name": "dev", "ref": "toy:dev", "mode": "embedded", "guidance": 3.5, "sweep": [2.0, 5.0]},
                  {"name": "pro", "ref": "toy:pro", "mode": "cfg", "guidance": 3.0, "negative": "blurry"}],
        "loras": [{"name": n, "path": f"runs/{n}/{n}.safetensors", "trained_on": f"T-{n}", "checkpoints": [f"runs/{n}"]}
                  for n in LORA_RED],
        "sampling": {"prompts": ["a", "b", "c"], "seeds": [0, 1], "steps": 2, "height": 8, "width": 8,
                     "batch_size": 4, "grid_prompts": 2},
        "metrics": {"reference": "ref"},
        "claim": {"lora": "strong", "base": "dev"},
        "output": {"dir": "out"},
    }
    for k, v in over.items():
        data[k] = v
    return from_dict(P.CompareConfig, data)


def test_plan_jobs_dedupes_and_groups(tmp_path):
    cfg = _config(tmp_path)
    ck = {x.name: P.find_checkpoints(x.checkpoints, tmp_path) for x in cfg.loras}
    assert [s for s, _ in ck["weak"]] == [10, 20] and ck["weak"][0][1].name == "weak.safetensors"
    jobs = P.plan_jobs(cfg, ck)
    assert len({j.key for j in jobs}) == len(jobs)
    # dev: base alone at 3.5, 2 LoRAs x 3 guidance values, curves (1 seed): step 0 and 2 steps x 2 LoRAs
    # pro: 3 rows x 1 value + the same curves
    assert len(jobs) == 1 + 6 + 5 + 3 + 5
    assert [j.base for j in jobs] == sorted([j.base for j in jobs], key=["dev", "pro"].index)


def test_compare_with_fakes_writes_report_and_right_numbers(tmp_path):
    cfg = _config(tmp_path)
    tk = FakeToolkit()
    res = C.run_compare(cfg, tk, root=tmp_path)
    out = tmp_path / "out"
    for name in ("report.md", "results.json", "grid.png", "bars.png", "sweep.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert tk.loaded == ["dev", "pro"]  # each base loaded once
    # closed-form values of the fake: style = base red + LoRA red; adherence = 1 - g/10
    assert res.main["style"][("strong", "dev")].mean == pytest.approx(0.7)
    assert res.main["style"][("weak", "pro")].mean == pytest.approx(0.3)
    assert res.main["adherence"][("weak", "pro")].mean == pytest.approx(0.7)
    assert res.main["score"][("strong", "dev")].mean == pytest.approx(0.7 * 0.65)
    assert res.main["fd"][("strong", "dev")].mean == pytest.approx(
        0.3**2 + (0.35 + 0.5 / 127.5) ** 2 + (0.005 + 0.5 / 127.5) ** 2)
    # diversity: feature distance between seeds 0 and 1 of a prompt is 0.01 (blue channel)
    assert res.main["diversity"][("", "dev")].mean == pytest.approx(0.01)
    assert [g for g, _ in res.sweep["adherence"][("weak", "dev")]] == [2.0, 3.5, 5.0]
    curve = dict(res.curves["style"][("weak", "dev")])
    assert sorted(curve) == [0, 10, 20]
    assert curve[0].mean == pytest.approx(0.1) and curve[10].mean == pytest.approx(0.1 + 0.3 - 0.1)
    # score: strong@dev 0.7 * 0.65 = 0.455 > strong@pro 0.6 * 0.7 = 0.42 > weak@dev 0.26 > weak@pro 0.21; the fake
    # has no spread, so the intervals are points and the lead is clear
    scores = fake_scores()
    assert {c: res.main["score"][c].mean for c in scores} == pytest.approx(scores)
    assert res.verdict["ranking"] == [list(c) for c in sorted(scores, key=lambda c: -scores[c])]
    assert res.verdict["ranking"] == [["strong", "dev"], ["strong", "pro"], ["weak", "dev"], ["weak", "pro"]]
    assert max(scores, key=scores.get) == ("strong", "dev")  # the claim is the best cell: reproduced, clearly
    assert res.verdict["reproduced"] is True and res.verdict["clear"] is True
    assert res.verdict["text"].startswith("**Reproduced clearly.**")

    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "![grid](grid.png)" in report and "trained on x applied to" in report
    assert "T-strong" in report and "true CFG 3" in report and "embedded g=3.5" in report
    data = json.loads((out / "results.json").read_text())
    assert data["verdict"]["claim"] == ["strong", "dev"]
    assert {(c["lora"], c["base"]) for c in data["main"]["style"]} == {
        (lora, b) for lora in (None, "weak", "strong") for b in ("dev", "pro")}

    from PIL import Image

    grid = Image.open(out / "grid.png").convert("RGB")
    # rows: 3 x 2 cells at main guidance in configured order (last: the strong LoRA on pro); columns: 2 prompts x
    # 2 seeds (last: seed 1);
    # tiles of 8 px x grid_scale 3 plus 4 px padding, below the header and right of the row labels
    assert grid.width > 4 * 28 and 6 * 28 < grid.height < 6 * 28 + 100
    r, g, b = (round((v + 1) * 127.5) for v in (0.0 + 0.6, 3.0 / 10, 0.01 * 1))
    assert grid.getpixel((grid.width - 4 - 2, grid.height - 4 - 2)) == (r, g, b)


@pytest.mark.parametrize("claim", [("weak", "pro"), ("strong", "pro")])
def test_verdict_not_reproduced_is_reported(tmp_path, claim):
    """The same fake numbers with the claim on a cell that is not the best: the verdict flips."""
    cfg = _config(tmp_path, claim={"lora": claim[0], "base": claim[1]}, curves=False)
    res = C.run_compare(cfg, FakeToolkit(), root=tmp_path)
    scores = fake_scores()
    rank = 1 + sum(v > scores[claim] for v in scores.values())
    assert rank > 1
    assert res.verdict["reproduced"] is False and res.verdict["clear"] is False
    assert res.verdict["ranks"]["score"] == [rank, 4]
    assert "**Not reproduced.**" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "curves.png").exists()


def test_config_is_strict(tmp_path):
    cfg = _config(tmp_path)
    data = dataclasses.asdict(cfg)
    data["sampling"]["seedz"] = [1]
    with pytest.raises(ConfigError, match="seedz"):
        from_dict(P.CompareConfig, data)
    data = dataclasses.asdict(cfg)
    data["claim"]["lora"] = "nope"
    with pytest.raises(ConfigError, match="claim.lora"):
        from_dict(P.CompareConfig, data)
    data = dataclasses.asdict(cfg)
    data["bases"][0]["negative"] = "x"
    with pytest.raises(ConfigError, match="negative prompt needs"):
        from_dict(P.CompareConfig, data)


def test_missing_files_are_one_line_errors(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        C.run_compare(cfg, FakeToolkit(), root=tmp_path / "elsewhere")
    with pytest.raises(UserError, match="checkpoint-<step>"):
        P.find_checkpoints([str(tmp_path / "ref")])


# ---------------------------------------------------------------------------------------------------------------------
# the real toolkit on tiny random models: sampling, LoRA merge/unmerge, the toy judge's interface


def _random_lora(model, seed: int, scale: float = 0.5):
    from dev2pro.lora.inject import LoraLayer, LoraWeights, resolve_targets

    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    layers = {}
    for p in resolve_targets(model, "attention"):
        lin = mods[p]
        layers[p] = LoraLayer(torch.randn(2, lin.in_features, generator=g) * scale,
                              torch.randn(lin.out_features, 2, generator=g) * scale, 2.0)
    return LoraWeights(layers)


def test_compare_with_real_components_on_tiny_models(tmp_path):
    from dev2pro.flux.checkpoint import load_transformer
    from dev2pro.lora.files import save_lora
    from dev2pro.toy import judge as toy_judge
    from dev2pro.toy.world import write_dataset

    ref = load_transformer("preset:tiny-dev")
    for name, seed in (("a", 1), ("b", 2)):
        save_lora(tmp_path / name / f"{name}.safetensors", _random_lora(ref, seed))
        save_lora(tmp_path / name / "checkpoint-3" / f"{name}.safetensors", _random_lora(ref, seed, 0.1))
    write_dataset(tmp_path / "ref", 4, seed=5, style=True)
    cfg = from_dict(P.CompareConfig, {
        "bases": [{"name": "dev", "ref": "preset:tiny-dev", "guidance": 3.5, "sweep": [1.0]},
                  {"name": "pro", "ref": "preset:tiny-dev", "mode": "cfg", "guidance": 2.0, "negative": "blurry"}],
        "loras": [{"name": n, "path": f"{n}/{n}.safetensors", "trained_on": n, "checkpoints": [n]} for n in "ab"],
        "sampling": {"prompts": ["a red circle, in zxq style", "a blue square"], "seeds": [0, 1], "steps": 2,
                     "batch_size": 4},
        "models": {"device": "cpu", "t5": "toy", "clip": "toy", "autoencoder": "toy"},
        "metrics": {"reference": "ref"},
        "claim": {"lora": "b", "base": "dev"},
        "output": {"dir": "out"},
    })
    torch.manual_seed(0)
    judge = J.ToyJudgeAdapter(toy_judge.Judge(toy_judge.JudgeNet().eval()))
    res = C.run_compare(cfg, T.FluxToolkit(cfg.models, judge=judge), root=tmp_path)
    for name in ("report.md", "results.json", "grid.png", "bars.png", "curves.png"):
        assert (tmp_path / "out" / name).is_file(), name
    # a LoRA changes the images (different features than the base alone), the base is restored afterwards
    feats = {(r.job.lora, r.job.base): r.features for r in res.results
             if r.job.step is None and r.job.guidance != 1.0 and r.job.seeds == (0, 1)}
    assert not np.allclose(feats[("a", "dev")], feats[(None, "dev")])
    assert not np.allclose(feats[(None, "dev")], feats[(None, "pro")])  # CFG 2 with a negative != embedded 3.5
    e = res.main["adherence"][("b", "dev")]
    assert 0.0 <= e.mean <= 1.0 and e.n == 4
    # the verdict is the one the run's own estimates imply (random models: the outcome itself is not known)
    lora_cells = {c: e for c, e in res.main["score"].items() if c[0]}
    assert (res.verdict["reproduced"], res.verdict["clear"]) == implied_verdict(lora_cells, ("b", "dev"))
    assert res.verdict["ranking"] == [list(c) for c in sorted(lora_cells, key=lambda c: -lora_cells[c].mean)]

    # the LoRA context leaves the base as it was: merged (fp32) and as an adapter (bf16)
    tk = T.FluxToolkit(cfg.models)
    for dtype in (torch.float32, torch.bfloat16):
        model = ref.to(dtype)
        snap = {k: v.clone() for k, v in model.state_dict().items()}
        with tk.apply_lora(model, tmp_path / "a" / "a.safetensors", 1.0):
            changed = any(not torch.equal(snap[k], v) for k, v in model.state_dict().items() if k in snap)
            assert changed == (dtype == torch.float32)  # merged into fp32 weights; bf16 gets an adapter
        now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}  # peft wrappers stay
        assert all(torch.allclose(snap[k].float(), now[k].float(), atol=1e-6) for k in snap)


def test_example_config_loads_and_cli_reports_bad_keys(tmp_path, capsys):
    from pathlib import Path

    from dev2pro import cli

    example = Path(__file__).resolve().parent.parent / "configs" / "compare-example.toml"
    cfg = P.load_compare_config(example)
    assert [b.mode for b in cfg.bases] == ["embedded", "cfg"] and cfg.claim.base == "dev"
    bad = tmp_path / "bad.toml"
    bad.write_text(example.read_text().replace("grid_seeds = 1", "grid_seed = 1"))
    assert cli.main(["compare", str(bad)]) == 2
    assert "grid_seed" in capsys.readouterr().err


def test_clip_judge_matches_clip_forward(tmp_path):
    """adherence = cos(image, text) = CLIPModel's logits_per_image / logit_scale (transformers as the reference)."""
    import string

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["at</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[("a", "t</w>")], model_max_length=77)
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")

    judge = J.ClipJudge(str(tmp_path / "clip"))
    images = torch.rand(3, 3, 48, 64) * 2 - 1
    prompts = ["a cat", "the dog", "zxq style"]
    sc = judge.score(images, prompts)
    pix = judge._pixels(images)
    assert pix.shape == (3, 3, 32, 32)
    with torch.no_grad():
        out = model(**tok(prompts, padding=True, return_tensors="pt"), pixel_values=pix)
    ref = (out.logits_per_image.diagonal() / model.logit_scale.exp()).detach()
    assert np.allclose(sc["adherence"], ref.numpy(), atol=1e-5)
    assert np.isnan(sc["style"]).all()
    judge.set_reference(judge.features(images[:1]))
    assert judge.score(images[:1], prompts[:1])["style"][0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match="CLIP folder"):
        J.ClipJudge(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------------------------------
# training runs pooled (groups), the guidance response, and the six-way claims

def test_compare_pools_training_runs_and_measures_the_guidance_response(tmp_path):
    """Both fake LoRAs as two runs of one group: pooled estimates are the t-interval over the two runs' values; the
    guidance response is the per-image adherence difference, (1 - 3.5/10) - (1 - 1/10) = -0.25 in the fake."""
    base = _config(tmp_path)
    data = dataclasses.asdict(base)
    data["loras"] = [dict(x, group="both", trained_on="T-both") for x in data["loras"]]
    data["bases"][0]["response"] = 1.0
    data["bases"][1]["curves"] = False
    data["claim"] = {"lora": "both", "base": "dev", "metric": "score"}
    cfg = from_dict(P.CompareConfig, data)
    res = C.run_compare(cfg, FakeToolkit(), root=tmp_path)
    assert cfg.groups() == {"both": ["weak", "strong"]} and res.pooled is not None
    s_weak, s_strong = 0.4 * 0.65, 0.7 * 0.65  # style (base red + LoRA red) x adherence at 3.5
    e = res.pooled.main["score"][("both", "dev")]
    half = _t_quantile_closed_form(0.975, 1) * abs(s_strong - s_weak) / 2  # sd of two values / sqrt(2)
    assert e.mean == pytest.approx((s_weak + s_strong) / 2) and e.hi - e.mean == pytest.approx(half)
    assert res.main["response"][("weak", "dev")].mean == pytest.approx(-0.25)
    assert res.pooled.main["response"][("both", "dev")].mean == pytest.approx(-0.25)
    assert math.isnan(res.main["response"][("weak", "pro")].mean)  # no response value on pro
    assert [s for s, _ in res.pooled.curves["response"][("both", "dev")]] == [0, 10, 20]
    assert not any(c[1] == "pro" for c in res.pooled.curves["style"])  # curves off on pro
    assert res.pooled.runs["score"][("both", "dev")] == pytest.approx({"weak": s_weak, "strong": s_strong})
    assert res.verdict["reproduced"] is True  # the only group
    report = (tmp_path / "out" / "report.md").read_text()
    assert "over training runs" in report and "## Each training run" in report and "guidance response" in report
    with pytest.raises(ConfigError, match="group"):
        from_dict(P.CompareConfig, {**data, "claim": {"lora": "weak", "base": "dev"}})
