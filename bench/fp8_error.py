"""Bench c: fp8 output error of plain cast vs per-tensor vs per-channel scaled fp8 (`dev2pro.fp8`).

A flux-mid model initialised like a trained one (normal, std 0.02) is quantized three ways; we report the relative RMS
error of the block weights and of the model output on fixed inputs against the fp32 model.
Goal: scaled (tensor and channel) output error <= 0.5x plain.
"""

from __future__ import annotations

import copy
import sys

from bench.common import table, verdict

GOAL = 0.5


def measure(preset: str = "flux-mid", latent: int = 16, txt_len: int = 16) -> dict[str, dict[str, float]]:
    from dev2pro import checkpoint, fp8, models

    spec = models.PRESETS[preset]
    model = models.random_transformer(spec, seed=0, std=0.02)
    inputs = checkpoint.fixed_inputs(spec, seed=0, latent=latent, txt_len=txt_len)
    ref = checkpoint.model_output(model, inputs).float()
    out = {}
    for scaling in fp8.SCALINGS:
        m = fp8.swap_linears_to_fp8(copy.deepcopy(model), scaling)
        werr = [fp8.relative_rms(lin.dequantized_weight(), model.get_submodule(p).weight.detach())
                for p, lin in fp8.fp8_linears(m).items()]
        y = checkpoint.model_output(m, inputs).float()
        out[scaling] = {"weight": sum(werr) / len(werr), "output": fp8.relative_rms(y, ref)}
    return out


def run(quick: bool = False) -> str:
    preset = "tiny-dev" if quick else "flux-mid"
    r = measure(preset)
    plain = r["none"]["output"]
    rows = [[s, r[s]["weight"], r[s]["output"], r[s]["output"] / plain] for s in r]
    worst = max(r["tensor"]["output"], r["channel"]["output"]) / plain
    return "\n\n".join([
        "## c. fp8 output error: plain vs tensor- vs channel-scaled",
        f"Model: `{preset}` random init, normal(0, 0.02) like trained Flux weights; fp32 reference; fixed inputs "
        "(`dev2pro.checkpoint.fixed_inputs`). Goal: scaled output error <= 0.5x plain.",
        table(["scaling", "mean rel. RMS weight error", "rel. RMS output error", "ratio to plain"], rows),
        verdict(worst <= GOAL, f"worst scaled/plain output error ratio = {worst:.3f}."),
    ])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
