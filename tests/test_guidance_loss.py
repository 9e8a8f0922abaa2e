"""`train.guidance_loss`: the guidance-preserving target against a closed form, and the option end to end in
train-lora (guidance input fed, metadata, refusals)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from dev2pro.errors import ConfigError
from dev2pro.train.config import TrainConfig
from dev2pro.train.flow_step import FlowBatch, guided_target
from helpers import toy_data
from test_train_lora import config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Linear(torch.nn.Module):
    """A stand-in transformer whose velocity is known in closed form: v = g * x + sum(pooled) (per sample)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                return_dict=False):
        self.calls.append((guidance.clone(), pooled_projections.clone(), torch.is_grad_enabled()))
        return (guidance[:, None, None] * hidden_states + pooled_projections.sum(-1)[:, None, None],)


def test_guided_target_closed_form():
    g = torch.Generator().manual_seed(0)
    b, n, c, L, D, P = 3, 5, 4, 6, 8, 7
    x_t, v = torch.randn(b, n, c, generator=g), torch.randn(b, n, c, generator=g)
    cond_pooled, u_pooled = torch.randn(b, P, generator=g), torch.randn(P, generator=g)
    fb = FlowBatch(x0=x_t, noise=x_t, x_t=x_t, t=torch.rand(b, generator=g), target=v,
                   txt=torch.randn(b, L, D, generator=g), pooled=cond_pooled, img_ids=torch.zeros(n, 3),
                   txt_ids=torch.zeros(L, 3))
    model = Linear()
    s = 3.5
    out = guided_target(model, fb, s, (torch.zeros(L, D), u_pooled), has_guidance=True)
    v_u = s * x_t + u_pooled.sum()  # the model on the EMPTY prompt at guidance input s
    torch.testing.assert_close(out, v_u + s * (v - v_u), rtol=1e-6, atol=1e-6)
    (guid, pooled, grad_on), = model.calls
    assert torch.all(guid == s) and not grad_on  # fed s, no graph kept
    torch.testing.assert_close(pooled, u_pooled.expand(b, P))
    # scale 1 gives back the plain target whatever v_u is
    torch.testing.assert_close(guided_target(model, fb, 1.0, (torch.zeros(L, D), u_pooled), True), v)


def test_train_lora_with_guidance_loss_feeds_s_and_records_it(tmp_path, monkeypatch):
    from dev2pro.train import flow_step
    from dev2pro.train.recipes import train_lora as R

    seen = []
    real = flow_step.forward_flux

    def spy(model, has_guidance, x, t, txt, pooled, img_ids, txt_ids, guidance=None):
        seen.append((float(guidance), torch.is_grad_enabled()))
        return real(model, has_guidance, x, t, txt, pooled, img_ids, txt_ids, guidance)

    monkeypatch.setattr(flow_step, "forward_flux", spy)
    cfg = config(tmp_path / "gl", 3, train={"guidance": 1.0, "guidance_loss": 3.5})
    final = R.run(cfg, data=toy_data(8))
    # per step: one no-grad pass on the empty prompt, one training pass; both at g = 3.5 (train.guidance ignored)
    assert seen == [(3.5, False), (3.5, True)] * 3
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["dev2pro.guidance_loss"] == "3.5" and float(meta["dev2pro.training_guidance"]) == 3.5


def test_guidance_loss_refusals(tmp_path):
    from dev2pro.train.recipes import train_lora as R

    with pytest.raises(ConfigError, match="guidance_loss must be 0"):
        TrainConfig(steps=1, guidance_loss=1.0).validate()
    cfg = config(tmp_path / "pro", 1, train={"guidance_loss": 3.5})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base="preset:tiny-pro@0"))
    with pytest.raises(ConfigError, match="needs a base with a guidance embedding"):
        R.run(cfg, data=toy_data(4))
