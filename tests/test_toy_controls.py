"""`dev2pro.toy.controls`: the controls' paired intervals (closed form), condition names, the per-image measurement
(cache, settings check, the dead-guidance negative control is exact) and `dev2pro toy controls`."""

import json
import math

import pytest
import torch

from dev2pro.toy import controls as C

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paired_interval_closed_form():
    # 3 captions x 2 seeds; per-caption differences (points) are the seed means: 50, 0, -20
    a = torch.tensor([1.0, 0.6, 0.2, 0.4, 0.0, 0.2], dtype=torch.float64)
    b = torch.tensor([0.4, 0.2, 0.4, 0.2, 0.2, 0.4], dtype=torch.float64)
    mean, lo, hi = C.paired_interval(a, b, seeds=2)
    d = [50.0, 0.0, -20.0]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    assert mean == pytest.approx(m)
    assert (lo, hi) == pytest.approx((m - 1.96 * sd / math.sqrt(3), m + 1.96 * sd / math.sqrt(3)))


def test_intervals_and_point_controls_agree():
    torch.manual_seed(0)
    per_image = {"pro_cfg1": torch.rand(64).double() * 0.5, "pro_cfg4": 0.3 + torch.rand(64).double() * 0.5}
    out = C.intervals(per_image, seeds=2)
    assert set(out) == {"pro_cfg4_minus_cfg1"}  # only controls with both conditions measured
    point = C.controls({k: {"adherence": float(v.mean())} for k, v in per_image.items()})["pro_cfg4_minus_cfg1"]
    assert out["pro_cfg4_minus_cfg1"]["points"] == pytest.approx(point["points"], abs=0.01)
    lo, hi = out["pro_cfg4_minus_cfg1"]["interval"]
    assert lo < point["points"] < hi
    assert out["pro_cfg4_minus_cfg1"]["holds"] == point["holds"] == (point["points"] >= 15)


def test_condition_names():
    assert C.condition("pro_cfg3.5") == ("pro", {"cfg": 3.5}, False)
    assert C.condition("dev_g1") == ("dev", {"guidance": 1.0}, False)
    assert C.condition("dead_dev_g3.5") == ("dev", {"guidance": 3.5}, True)
    with pytest.raises(ValueError, match="unknown condition"):
        C.condition("schnell_g1")
    with pytest.raises(ValueError, match="dev only"):
        C.condition("dead_pro_cfg4")


def test_measure_caches_checks_settings_and_dead_guidance_is_exact(tmp_path):
    from dev2pro.flux.models import PRESETS, build_transformer
    from dev2pro.toy.judge import Judge

    torch.manual_seed(0)
    dev = build_transformer(PRESETS["tiny-dev"], device="cpu").eval()
    with torch.no_grad():  # make the guidance input matter
        for p in dev.time_text_embed.guidance_embedder.parameters():
            p.normal_(0, 1.0)
    judge = Judge.load()
    names = ("dev_g1", "dev_g3.5", "dead_dev_g3.5")
    kw = dict(n_prompts=3, seeds=2, steps=2, prompt_seed=5, work=tmp_path)
    got = C.measure({"dev": dev}, judge, names, **kw)
    assert {k: v.shape for k, v in got.items()} == {k: (6,) for k in names}
    torch.testing.assert_close(got["dead_dev_g3.5"], got["dev_g1"])  # dead guidance: g = 3.5 samples as g = 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.json" for n in names)
    cached = C.measure({}, judge, names, **kw)  # no model needed: every condition is read back
    for k in names:
        torch.testing.assert_close(cached[k], got[k])
    from dev2pro.errors import UserError

    with pytest.raises(UserError, match="was measured with"):
        C.measure({}, judge, names, **(kw | {"steps": 3}))


def test_cli_toy_controls(tmp_path, capsys):
    from dev2pro import cli

    assert cli.main(["toy", "controls", "--prompts", "1", "--work", str(tmp_path)]) == 2
    assert "at least 2 captions" in capsys.readouterr().err
    rc = cli.main(["toy", "controls", "--prompts", "2", "--seeds", "1", "--steps", "1", "--work", str(tmp_path)])
    assert rc in (0, 1)  # 2 captions at 1 step decide nothing; the run and its file are what is checked
    saved = json.loads((tmp_path / "controls.json").read_text())
    assert set(saved["controls"]) == set(C.CHECKS) and set(saved["adherence"]) == set(C.CONDITIONS)
    dead = saved["controls"]["dead_dev_g3.5_minus_g1"]
    assert dead["points"] == 0.0 and dead["interval"] == [0.0, 0.0] and dead["holds"]
    assert "dev_g3.5_minus_g1" in capsys.readouterr().out
    # the same work folder with other settings: one line naming the cached file, exit 2
    assert cli.main(["toy", "controls", "--prompts", "3", "--seeds", "1", "--steps", "1", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pro_cfg1.json was measured with" in err and "Traceback" not in err
