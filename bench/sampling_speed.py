"""Bench e: sampling speed of our Euler sampler (`dev2pro.flux.sampling.denoise`) vs diffusers' `FluxPipeline` on the
same transformer, same embeddings, same noise, same step count; steps/s, and the agreement of the two results.

The pipeline runs with precomputed prompt embeddings and `output_type="latent"` (no text encoders, no VAE), so both
sides time the transformer plus their own loop overhead.
"""

from __future__ import annotations

import sys

import torch

from bench.common import one_thread, table, timed


def measure(preset: str, latent: int, steps: int, txt_len: int = 32) -> dict[str, float]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from dev2pro.flux import flow, models, sampling

    spec = models.PRESETS[preset]
    model = models.random_transformer(spec, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(1, txt_len, spec.context_in_dim, generator=g)
    pooled = torch.randn(1, spec.vec_in_dim, generator=g)
    noise = torch.randn(1, spec.in_channels // 4, latent, latent, generator=g)
    x = models.pack_latents(noise)
    seq = x.shape[1]
    ts = flow.sampling_schedule(steps, seq, shift=True)
    ours_out = {}

    def ours():
        with torch.no_grad():
            ours_out["x"] = sampling.denoise(model, x, txt, pooled, models.image_ids(latent, latent),
                                             models.text_ids(txt_len), ts, guidance=3.5)

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    theirs_out = {}

    def theirs():
        with torch.no_grad():
            theirs_out["x"] = pipe(prompt_embeds=txt, pooled_prompt_embeds=pooled, height=latent * 8,
                                   width=latent * 8, num_inference_steps=steps, guidance_scale=3.5, latents=x,
                                   output_type="latent", return_dict=False)[0]

    t_ours = timed(ours, repeat=2, warmup=1)
    t_theirs = timed(theirs, repeat=2, warmup=1)
    diff = (ours_out["x"] - theirs_out["x"].float()).norm() / theirs_out["x"].float().norm()
    return {"ours": steps / t_ours, "diffusers": steps / t_theirs, "rel_diff": float(diff), "seq": seq}


def run(quick: bool = False) -> str:
    one_thread()
    cases = [("tiny-dev", 16, 4)] if quick else [("tiny-dev", 32, 20), ("flux-mid", 32, 20)]
    rows = []
    for preset, latent, steps in cases:
        r = measure(preset, latent, steps)
        rows.append([preset, f"{latent * 8}x{latent * 8} ({r['seq']} tokens)", steps, r["ours"], r["diffusers"],
                     r["ours"] / r["diffusers"], r["rel_diff"]])
    return "\n\n".join([
        "## e. Sampling: our sampler vs diffusers FluxPipeline",
        "Same random transformer, prompt embeddings, initial noise and step count; dev schedule shift; embedded "
        "guidance 3.5; pipeline with `output_type='latent'`. No goal was set; reported as measured.",
        table(["model", "image", "steps", "ours (steps/s)", "FluxPipeline (steps/s)", "ratio",
               "rel. diff of results"], rows),
    ])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
