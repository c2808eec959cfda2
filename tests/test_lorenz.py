"""Lorenz-63 / Lorenz-96 simulators against known invariant statistics and the RK4 order.

Long-run statistics are estimated from independent chains; the standard error (SE) of an
estimate is the spread of its per-chain values over sqrt(chains), and the tolerances are
4 SE plus the rounding of the quoted literature value.
"""

from __future__ import annotations

import math

import pytest
import torch

from plausible.tasks.lorenz import Lorenz63, Lorenz96, rk4

F64 = torch.float64


def _chain_stats(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-variable mean and std over (chains, time) of ``x`` (C, T, D), with their SEs from
    the spread of the per-chain values."""
    C = x.shape[0]
    chain_mean, chain_std = x.mean(1), x.std(1)
    flat = x.reshape(-1, x.shape[-1])
    return (flat.mean(0), chain_mean.std(0) / math.sqrt(C), flat.std(0),
            chain_std.std(0) / math.sqrt(C))


def test_lorenz63_deterministic_attractor_statistics():
    # Lorenz-63 attractor (sigma=10, rho=28, beta=8/3): mean z = 23.55, std (7.92, 9.02, 8.62)
    # (quoted to 2 decimals; x and y have zero mean by the symmetry (x, y) -> (-x, -y)).
    model = Lorenz63(noise=0.0)
    g = torch.Generator().manual_seed(1)
    x = model.trajectories(64, 4000, burn_in=500, generator=g, progress=False)
    mean, mean_se, std, std_se = _chain_stats(x)
    expected_mean = torch.tensor([0.0, 0.0, 23.55], dtype=F64)
    expected_std = torch.tensor([7.92, 9.02, 8.62], dtype=F64)
    assert ((mean - expected_mean).abs() <= 4 * mean_se + 0.005).all(), (mean, mean_se)
    assert ((std - expected_std).abs() <= 4 * std_se + 0.005).all(), (std, std_se)


def test_lorenz63_noisy_matches_sda_standardisation_and_symmetry():
    # SDA's NoisyLorenz63: the N(0, dt) noise smooths the attractor a little; SDA standardises
    # by mean (0, 0, 25), std (8, 9, 8.6), so the standardised chains have mean ~0, std ~1.
    model = Lorenz63()
    assert model.dt == 0.025 and model.noise == pytest.approx(math.sqrt(0.025))
    g = torch.Generator().manual_seed(2)
    x = model.trajectories(64, 3000, burn_in=500, generator=g, progress=False)
    mean, mean_se, std, std_se = _chain_stats(x)
    # symmetry (x, y) -> (-x, -y): zero mean of x and y, and of x^3
    assert (mean[:2].abs() <= 4 * mean_se[:2]).all(), (mean, mean_se)
    cube = x[..., 0] ** 3
    cube_se = cube.mean(1).std() / math.sqrt(64)
    assert abs(float(cube.mean())) <= 4 * float(cube_se)
    # close to the deterministic attractor (within 3%) and to SDA's constants (within 5%)
    assert abs(float(mean[2]) - 23.55) <= 0.03 * 23.55
    assert ((std - torch.tensor([7.92, 9.02, 8.62], dtype=F64)).abs() <= 0.03 * 8.6).all()
    z = Lorenz63.standardize(x)
    assert (z.reshape(-1, 3).mean(0).abs() < 0.2).all()
    assert ((z.reshape(-1, 3).std(0) - 1).abs() < 0.05).all()
    assert torch.allclose(Lorenz63.unstandardize(z), x)


def test_lorenz63_transition_noise_and_log_density():
    model = Lorenz63()
    g = torch.Generator().manual_seed(3)
    x = model.trajectories(512, 2, burn_in=64, generator=g, progress=False)
    r = (x[:, 1] - model.step(x[:, 0])) / model.noise  # must be N(0, I)
    n = r.numel()
    assert abs(float(r.mean())) <= 4 / math.sqrt(n)
    assert abs(float(r.square().mean()) - 1) <= 4 * math.sqrt(2 / n)
    normal = torch.distributions.Normal(model.step(x[:, 0]), model.noise)
    expected = normal.log_prob(x[:, 1]).sum(-1)
    assert torch.allclose(model.log_transition(x[:, 1], x[:, 0]), expected)
    lp = model.log_prob_trajectory(x)
    assert lp.shape == (512,) and torch.allclose(lp, expected)
    with pytest.raises(ValueError, match="deterministic"):
        Lorenz63(noise=0.0).log_transition(x[:, 1], x[:, 0])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        model.step(torch.zeros(4, 2, dtype=F64))


def _order_ratio(f, x0: torch.Tensor, T: float, dt: float) -> float:
    """e(dt) / e(dt / 2) at time T, against a run with dt / 16."""

    def run(h: float) -> torch.Tensor:
        x = x0.clone()
        for _ in range(round(T / h)):
            x = rk4(f, x, h)
        return x

    ref = run(dt / 16)
    return float((run(dt) - ref).norm() / (run(dt / 2) - ref).norm())


def test_rk4_is_fourth_order():
    # global error O(dt^4): halving dt divides the error by about 16
    l63 = Lorenz63(noise=0.0)
    x0 = l63.trajectories(4, 1, burn_in=200, generator=torch.Generator().manual_seed(4),
                          progress=False)[:, 0]
    assert 14.0 < _order_ratio(l63.f, x0, T=0.5, dt=0.01) < 18.0
    l96 = Lorenz96()
    y0 = l96.trajectories(2, 1, burn_in=100, generator=torch.Generator().manual_seed(5),
                          progress=False)[:, 0]
    assert 14.0 < _order_ratio(l96.f, y0, T=0.5, dt=0.02) < 18.0


def test_lorenz96_climatology():
    # Lorenz-96, n = 40, F = 8: long-run mean ~2.3 and std ~3.6 per variable (Lorenz &
    # Emanuel 1998; quoted to 1 decimal, hence the 0.05 allowance); all variables alike.
    model = Lorenz96()
    assert model.state_shape == (40,) and model.dt == 0.05
    g = torch.Generator().manual_seed(6)
    x = model.trajectories(16, 2000, burn_in=400, generator=g, progress=False)
    per_chain_mean = x.mean((1, 2))
    per_chain_std = x.std(1).mean(1)
    se_mean = float(per_chain_mean.std()) / 4
    se_std = float(per_chain_std.std()) / 4
    assert abs(float(x.mean()) - 2.3) <= 4 * se_mean + 0.05
    assert abs(float(x.std()) - 3.6) <= 4 * se_std + 0.05
    # translation invariance of the ring: each variable's mean agrees with the global one
    var_means = x.mean((0, 1))
    var_se = x.mean(1).std(0) / 4
    assert ((var_means - x.mean()).abs() <= 5 * var_se).all()


def test_lorenz96_vector_field_and_noise():
    model = Lorenz96(n=5, F=8.0)
    x = torch.arange(5, dtype=F64)[None]
    # f_j = (x_{j+1} - x_{j-2}) x_{j-1} - x_j + F with indices modulo 5
    expected = torch.tensor([[(1 - 3) * 4 - 0 + 8, (2 - 4) * 0 - 1 + 8, (3 - 0) * 1 - 2 + 8,
                              (4 - 1) * 2 - 3 + 8, (0 - 2) * 3 - 4 + 8]], dtype=F64)
    assert torch.equal(model.f(x), expected)
    # at the fixed point x = F the deterministic map stays put
    fixed = torch.full((1, 5), 8.0, dtype=F64)
    assert torch.allclose(model.step(fixed), fixed)
    noisy = Lorenz96(n=5, noise=0.1)
    g = torch.Generator().manual_seed(7)
    draws = noisy.transition(fixed.expand(4000, 5), g) - fixed
    assert abs(float(draws.std()) - 0.1) <= 4 * 0.1 / math.sqrt(2 * draws.numel())
    with pytest.raises(ValueError, match="deterministic"):
        model.log_transition(fixed, fixed)


def test_trajectories_reproducible_and_validated():
    model = Lorenz63()
    a = model.trajectories(3, 5, burn_in=2, generator=torch.Generator().manual_seed(0),
                           progress=False, dtype=torch.float32)
    b = model.trajectories(3, 5, burn_in=2, generator=torch.Generator().manual_seed(0),
                           progress=False, dtype=torch.float32)
    assert a.shape == (3, 5, 3) and a.dtype == torch.float32 and torch.equal(a, b)
    x0 = torch.randn(3, 3, dtype=F64)
    c = model.trajectories(3, 4, burn_in=0, x0=x0, progress=False)
    assert torch.equal(c[:, 0], x0)
    for bad in ({"n": 0}, {"length": -1}, {"burn_in": -2}, {"n": 2.5}):
        kwargs = {"n": 2, "length": 3, "burn_in": 1, **bad}
        with pytest.raises(ValueError):
            model.trajectories(progress=False, **kwargs)
    with pytest.raises(ValueError, match="x0 must have shape"):
        model.trajectories(2, 3, x0=torch.zeros(3, 3, dtype=F64), progress=False)
    with pytest.raises(ValueError, match="dt must be positive"):
        Lorenz63(dt=0.0)
    with pytest.raises(ValueError, match="noise"):
        Lorenz96(noise=-1.0)
