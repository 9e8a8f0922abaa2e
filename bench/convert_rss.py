"""Bench d: peak RSS while loading and while converting a mid-size checkpoint (`dev2pro.flux.checkpoint`,
`dev2pro.flux.convert`).

A flux-mid BFL file in bf16 is written once; then, each in a fresh process, (1) the runtime alone (python + torch +
diffusers + dev2pro imported), (2) `load_transformer` of the file, (3) `dev2pro convert` of the file to fp8 with
channel scales. Peak RSS is VmHWM of that process, reset after the imports (`bench.common.peak_rss_of`; not
ru_maxrss, which a child inherits from its large parent across exec and which an import-time transient would mask).
Goal: convert peak <= 1.2 x output file size + runtime baseline (streaming: the model is never whole in memory);
loading necessarily holds the model, so its bound is 1.2 x the input file size + baseline.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import MiB, one_thread, peak_rss_of, table, verdict

GOAL = 1.2
IMPORTS = ("import torch, diffusers, safetensors.torch\n"
           "import dev2pro.flux.checkpoint, dev2pro.flux.fp8, dev2pro.flux.models\n"
           "from dev2pro.cli import main\n")


def measure(preset: str, folder: Path) -> dict[str, float]:
    import torch

    from dev2pro.flux import checkpoint, models

    src = folder / "model-bf16.safetensors"
    dst = folder / "model-fp8.safetensors"
    checkpoint.save_transformer(models.random_transformer(models.PRESETS[preset], seed=0), src, dtype=torch.bfloat16)
    base, _, _ = peak_rss_of("torch.zeros(1)", setup=IMPORTS)
    load, _, _ = peak_rss_of(f"m = dev2pro.flux.checkpoint.load_transformer({str(src)!r})", setup=IMPORTS)
    argv = f"['convert', {str(src)!r}, {str(dst)!r}, '--dtype', 'fp8_e4m3fn', '--scaling', 'channel'"
    conv, _, _ = peak_rss_of(f"assert main({argv}, '--no-output-check']) == 0", setup=IMPORTS)
    dst.unlink()
    checked, _, _ = peak_rss_of(f"assert main({argv}]) == 0", setup=IMPORTS)
    return {"baseline": base, "load": load, "convert": conv, "convert_checked": checked,
            "in_size": src.stat().st_size, "out_size": dst.stat().st_size}


def run(quick: bool = False) -> str:
    one_thread()
    preset = "tiny-dev" if quick else "flux-mid"
    with tempfile.TemporaryDirectory() as d:
        r = measure(preset, Path(d))
    base = r["baseline"]
    conv_bound = GOAL * r["out_size"] + base
    load_bound = GOAL * r["in_size"] + base
    rows = [["runtime baseline (imports)", base / MiB, "", ""],
            ["load_transformer (bf16 file)", r["load"] / MiB, (r["load"] - base) / MiB, load_bound / MiB],
            ["dev2pro convert -> fp8 channel, --no-output-check", r["convert"] / MiB, (r["convert"] - base) / MiB,
             conv_bound / MiB],
            ["dev2pro convert -> fp8 channel (default: with the output check)", r["convert_checked"] / MiB,
             (r["convert_checked"] - base) / MiB, ""]]
    return "\n\n".join([
        "## d. Peak RSS while loading and converting a mid-size file",
        f"File: `{preset}` BFL single file in bf16, {r['in_size'] / MiB:.1f} MiB; fp8 output "
        f"{r['out_size'] / MiB:.1f} MiB. Each row is a fresh process (peak = VmHWM, reset after imports). "
        "Goal: convert peak <= 1.2 x output size + runtime baseline.",
        table(["process", "peak RSS (MiB)", "above baseline (MiB)", "bound (MiB)"], rows),
        verdict(r["convert"] <= conv_bound, f"convert peak {r['convert'] / MiB:.0f} MiB vs bound "
                f"{conv_bound / MiB:.0f} MiB; load {r['load'] / MiB:.0f} MiB vs {load_bound / MiB:.0f} MiB. "
                "The default convert also runs the model-output check, which loads the source and then the result "
                "in fp32 (one at a time): its peak is about 2x the bf16 file above baseline, by design (skip it with "
                "--no-output-check; it is skipped on its own when RAM is short)."),
    ])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
