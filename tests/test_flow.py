import math

import torch

from dev2pro.flux import flow


def test_interpolation_endpoints_and_target():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.tensor([0.25, 0.5, 0.75])
    xt = flow.interpolate(x0, eps, t)
    # d x_t / d t = eps - x0 is constant along the straight path, so one Euler step from t to 0 with the true
    # velocity recovers x0
    for i, ti in enumerate(t.tolist()):
        rec = flow.euler_step(xt[i], (eps - x0)[i], ti, 0.0)
        torch.testing.assert_close(rec, x0[i])


def test_euler_step_with_the_true_velocity_lands_on_the_path():
    """One Euler step from t to t' (either direction, any size) with v = eps - x0 lands exactly on x_t'; a wrong
    velocity (a scaled one, or the sign-flipped x0 - eps) does not."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    v = flow.velocity_target(x0, eps)
    for t, t_next in [(1.0, 0.75), (0.8, 0.3), (0.6, 0.0), (0.2, 0.9)]:
        x_t = flow.interpolate(x0, eps, torch.full((4,), t, dtype=torch.float64))
        want = flow.interpolate(x0, eps, torch.full((4,), t_next, dtype=torch.float64))
        torch.testing.assert_close(flow.euler_step(x_t, v, t, t_next), want, rtol=0, atol=1e-12)
        for wrong in (0.9 * v, -v):
            miss = (flow.euler_step(x_t, wrong, t, t_next) - want).abs().max().item()
            assert miss > 0.01 * abs(t_next - t)


def test_flux_mu_matches_reference_points():
    assert flow.flux_mu(256) == 0.5
    assert math.isclose(flow.flux_mu(4096), 1.15)
    # 1024x1024: 64x64 packed tokens = 4096 -> static-shift equivalent k = e^1.15 = 3.158
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.testing.assert_close(flow.time_shift(1.15, t), flow.static_shift(t, math.exp(1.15)))


def test_schedule_endpoints_monotone():
    s = flow.sampling_schedule(20, seq_len=1024)
    assert abs(s[0] - 1.0) < 1e-12 and s[-1] == 0.0 and len(s) == 21
    assert torch.all(s[1:] < s[:-1])
    assert torch.equal(flow.sampling_schedule(4, shift=False), torch.linspace(1, 0, 5, dtype=torch.float64))


def test_timestep_samplers_ranges_and_means():
    g = torch.Generator().manual_seed(0)
    for m in flow.TIMESTEP_METHODS:
        t = flow.sample_timesteps(20000, m, seq_len=1024, generator=g)
        assert t.shape == (20000,) and t.min() > 0 and t.max() < 1
    u = flow.sample_timesteps(20000, "uniform", generator=g)
    assert abs(u.mean().item() - 0.5) < 0.01
    ln = flow.sample_timesteps(20000, "logit_normal", generator=g)
    assert abs(ln.mean().item() - 0.5) < 0.01 and ln.std() < u.std()
    sh = flow.sample_timesteps(20000, "shift", shift=3.0, generator=g)
    assert sh.mean() > 0.6  # shifted toward noise


def test_cfg_and_loss():
    vu, vc = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(flow.cfg_combine(vu, vc, 1.0), vc)
    expected = torch.stack([vu[0], 2 * vc[1] - vu[1]])
    torch.testing.assert_close(flow.cfg_combine(vu, vc, torch.tensor([0.0, 2.0])), expected)
    p, q = torch.zeros(2, 4), torch.ones(2, 4)
    assert torch.equal(flow.flow_loss(p, q), torch.ones(2))
    torch.testing.assert_close(flow.loss_weight(torch.tensor([0.5]), "cosmap"), torch.tensor([4 / math.pi]))
