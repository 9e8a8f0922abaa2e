"""`dev2pro demo`: a smoke run of the whole six-way pipeline with tiny step counts (results meaningless, files, wiring
and the pooling over training runs checked), on small random dev/pro-like models so it does not depend on the shipped
toy models' size; the plan's sizes; the train-lora configs of the six modes."""

import json
import math

import numpy as np
import pytest
import torch

from dev2pro.eval import demo as D
from dev2pro.eval import demo_report as R
from dev2pro.eval import judges as J
from dev2pro.eval import modes as M
from dev2pro.eval import plan as P
from dev2pro.eval import stats as S
from dev2pro.eval import toolkit as T

pytestmark = pytest.mark.usefixtures("one_thread")


def _judge():
    """The shipped toy judge when it is there, else a random one with the same interface (wiring only)."""
    from dev2pro.errors import CheckpointError
    from dev2pro.toy import judge as toy_judge

    try:
        return J.ToyJudgeAdapter()
    except CheckpointError:
        torch.manual_seed(0)
        return J.ToyJudgeAdapter(toy_judge.Judge(toy_judge.JudgeNet().eval()))


TINY = D.DemoPlan(n_base=8, n_style=8, reference_variants=2, dedistill_steps=2, adapter_rank=2, train_seeds=(0, 1),
                  lora_steps=4, lora_rank=2, batch_size=4, checkpoints=2, prompts=3, seeds=(0, 1), curve_seeds=(0,),
                  sample_steps=2)


@pytest.fixture
def _frozen_heap():
    """The recipes free their text encoders with gc.collect(), which walks the whole heap: in a test process that is
    most of each tiny run's time (0.5 s a call). Objects that exist before the test are moved out of its reach."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def test_demo_smoke_run_six_ways(tmp_path, _frozen_heap):
    out = tmp_path / "demo"
    toolkit = T.FluxToolkit(P.ModelsSection(device="cpu", t5="toy", clip="toy", autoencoder="toy"), judge=_judge())
    res = D.run_demo(out, TINY, dev="preset:tiny-dev", pro="preset:tiny-pro", toolkit=toolkit, log=lambda *_: None)
    modes = [m for m in M.MODES if m.key not in res.summary["skipped_modes"]]
    assert len(modes) == 6 - ("dev-gloss3.5" in res.summary["skipped_modes"])
    assert M.supports_guidance_loss() == (len(modes) == 6)

    for name in ("report.md", "results.json", "grid.png", "bars.png", "curves.png", "demo.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    runs = [M.run_name(m, s) for m in modes for s in TINY.train_seeds]
    for stage in ("dedistill", "compare", *(f"lora-{r}" for r in runs)):
        assert (out / "configs" / f"{stage}.toml").is_file(), stage
    cfg = P.load_compare_config(out / "configs" / "compare.toml")
    assert cfg.groups() == {m.key: [M.run_name(m, s) for s in TINY.train_seeds] for m in modes}

    # every run was trained as its mode says: guidance, base, seed, the adapter for mode e
    from dev2pro.lora.files import load_lora

    bases = {"dev": "preset:tiny-dev", "dev2pro": "toy-dev2pro.safetensors", "pro": "preset:tiny-pro"}
    for m in modes:
        for s in TINY.train_seeds:
            meta = load_lora(out / "loras" / M.run_name(m, s) / f"style-{M.run_name(m, s)}.safetensors").metadata
            assert float(meta["dev2pro.training_guidance"]) == m.guidance, (m.key, meta)
            assert meta["dev2pro.base_model"] == bases[m.base] and int(meta["dev2pro.steps"]) == TINY.lora_steps
            assert ("dev2pro.adapter" in meta) == m.adapter
    assert 0 < res.summary["adapter"]["energy"] <= 1

    # pooled rows: one per mode x base; the interval is the t-interval over the runs' own means (from results.json)
    p = res.pooled
    assert {k for k in p.main["score"] if k[0]} == {(m.key, b) for m in modes for b in ("dev", "dev2pro")}
    data = json.loads((out / "results.json").read_text())
    final = {(j["lora"], j["base"], j["guidance"]): j for j in data["jobs"] if j["step"] is None and j["lora"]}
    for m in modes:
        per_run = [np.mean(np.array(final[(M.run_name(m, s), "dev", 3.5)]["per_image"]["style"]) * np.array(
            final[(M.run_name(m, s), "dev", 3.5)]["per_image"]["adherence"])) for s in TINY.train_seeds]
        e, ref = p.main["score"][(m.key, "dev")], S.mean_ci(per_run)
        assert e.method == "t over training runs" and e.n == 2
        assert e.mean == pytest.approx(ref.mean) and (e.lo == pytest.approx(ref.lo) or math.isnan(ref.lo))
        # guidance response: per image adherence at 3.5 minus at 1.0, same prompt and seed
        hi, lo = final[(M.run_name(m, 0), "dev", 3.5)], final[(M.run_name(m, 0), "dev", 1.0)]
        resp = np.mean(np.array(hi["per_image"]["adherence"]) - np.array(lo["per_image"]["adherence"]))
        assert p.runs["response"][(m.key, "dev")][M.run_name(m, 0)] == pytest.approx(resp)
    # curves on dev only: step 0 (no LoRA), the checkpoints, the final step; the response along them
    steps = [s for s, _ in p.curves["response"][("dev2pro-g1", "dev")]]
    assert steps == [0, *TINY.curve_steps()] == [0, 2, 4]
    assert not any(k[1] == "dev2pro" for k in p.curves["score"])

    # the claims: three verdicts with their outcome, claim (ii) agreeing with compare's own verdict
    assert [c["claim"] for c in res.claims] == ["i", "ii", "iii"]
    assert res.claims[1]["reproduced"] == res.verdict["reproduced"]
    assert all(c["outcome"] in ("yes", "weak", "no", "unknown", "report") for c in res.claims)
    report = (out / "report.md").read_text()
    assert "## The three claims" in report and "Whole demo:" in report and "## Each training run" in report
    assert "it cuts:" in report and "training seeds per mode 2 (full: 3)" in report

    doc = R.write_results_doc(res, tmp_path / "docs")
    text = doc.read_text()
    assert "### The claims" in text and res.claims[0]["text"] in text and "![demo curves](img/demo-curves.png)" in text
    assert (tmp_path / "docs" / "img" / "demo-grid.png").read_bytes() == (out / "grid.png").read_bytes()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{R.MARK_BEGIN}\nOLD-SECTION\n{R.MARK_END}\n\nrest\n")
    R.update_readme(readme, R.readme_summary(res))
    new = readme.read_text()
    assert "OLD-SECTION" not in new and new.endswith(f"{R.MARK_END}\n\nrest\n") and res.claims[2]["text"] in new


def test_mode_configs():
    refs = {"dev": "toy:dev", "dev2pro": "d2p.safetensors", "pro": "toy:pro"}
    plan = D.DemoPlan()
    cfgs = {m.key: M.lora_config(m, 1, refs=refs, adapter="a.safetensors", plan=plan, data_dir="d", out_dir="o")
            for m in M.MODES}
    assert {k: (c["model"]["base"], c["train"]["guidance"]) for k, c in cfgs.items()} == {
        "dev-g3.5": ("toy:dev", 3.5), "dev-g1": ("toy:dev", 1.0), "dev2pro-g1": ("d2p.safetensors", 1.0),
        "dev-gloss3.5": ("toy:dev", 3.5), "dev-adapter-g1": ("toy:dev", 1.0), "pro": ("toy:pro", 1.0)}
    assert cfgs["dev-gloss3.5"]["train"]["guidance_loss"] == 3.5
    assert all("guidance_loss" not in c["train"] for k, c in cfgs.items() if k != "dev-gloss3.5")
    assert cfgs["dev-adapter-g1"]["model"]["adapter"] == "a.safetensors"
    assert all("adapter" not in c["model"] for k, c in cfgs.items() if k != "dev-adapter-g1")
    assert all(c["train"]["seed"] == 1 and c["train"]["steps"] == plan.lora_steps for c in cfgs.values())
    assert [m.role for m in M.MODES] == list("abcdef")


def test_plan_sizes_and_cli_validation(capsys):
    for steps, n in ((120, 5), (600, 6), (7, 2), (4, 1), (250, 3)):  # n checkpoints, the last at the final step
        q = D.DemoPlan(lora_steps=steps, checkpoints=n)
        saved = [s for s in range(1, steps + 1) if s % q.save_every() == 0 and s < steps] + [steps]
        assert saved == q.curve_steps() and len(saved) <= n and q.keep_last() >= len(saved), (steps, n, saved)
    full, quick = D.DemoPlan.full(), D.DemoPlan.quick()
    # the full experiment: >= 3 training seeds, >= 6 curve points up to >= 4x the ~150 steps the style takes
    assert len(full.train_seeds) >= 3 and len(full.curve_steps()) >= 6 and full.lora_steps >= 4 * 150
    assert len(quick.train_seeds) >= 2 and len(quick.curve_steps()) >= 5 and set(quick.modes) == set(M.MODE)
    assert "LoRA steps 100 (full: 600)" in R.cuts(quick, full) and "curve prompts 4 (full: all)" in R.cuts(quick, full)
    p = quick.scaled(0.01)
    assert p.dedistill_steps == max(2, round(quick.dedistill_steps * 0.01)) and p.lora_steps >= 2
    prompts = D.eval_prompts(quick)
    assert len(prompts) == quick.prompts and all("zxq" in q for q in prompts)
    from dev2pro import cli

    assert cli.main(["demo", "--steps-scale", "0"]) == 2
    assert "--steps-scale" in capsys.readouterr().err


def test_reference_renders_the_evaluation_scenes(tmp_path):
    from PIL import Image

    from dev2pro.toy.world import render

    plan = D.DemoPlan(prompts=2, reference_variants=3)
    D.write_reference(tmp_path, plan)
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 6
    scene = D.eval_scenes(plan)[1]
    assert scene.caption() == D.eval_prompts(plan)[1] and scene.style
    ref = np.asarray(Image.open(files[3]))  # scene 1, variant 0: the same scene up to sub-pixel jitter
    assert np.abs(ref.astype(int) - render(scene).astype(int)).mean() < 40
    other = render(D.eval_scenes(plan)[0])
    assert np.abs(ref.astype(int) - render(scene).astype(int)).mean() < np.abs(ref.astype(int) - other).mean()
