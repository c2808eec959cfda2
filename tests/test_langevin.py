"""plausible.langevin: the stationary law of preconditioned unadjusted Langevin dynamics on an
exact Gaussian denoiser is known in closed form; errors on bad input."""

import math

import pytest
import torch

import plausible
from plausible import GaussianDenoiser, langevin

F64 = torch.float64


def _stationary_variance(w: torch.Tensor, D: torch.Tensor, h: float) -> torch.Tensor:
    """Per coordinate, x' = x - h D (x - mu) / w + sqrt(2 h D) xi has the stationary variance
    2 h D / (1 - (1 - c)^2) = 2 w / (2 - c), c = h D / w."""
    c = h * D / w
    return 2 * w / (2 - c)


@pytest.mark.parametrize("given_scale", [True, False])
def test_langevin_reaches_the_gaussian_target_from_a_wrong_start(given_scale):
    """Start 6 std away with the wrong spread; after 600 steps of h = 0.05 the chains have
    the closed-form stationary mean and variance of the smoothed target N(mu, v + rho^2)
    (within 4 Monte-Carlo standard errors)."""
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    v = torch.tensor([0.04, 1.0, 9.0], dtype=F64)
    den = GaussianDenoiser(mu, torch.diag(v))
    N, h, rho = 4000, 0.05, 0.01
    g = torch.Generator().manual_seed(0)
    x0 = mu + 6 * v.sqrt() + 0.5 * v.sqrt() * torch.randn(N, 3, generator=g, dtype=F64)
    scale = v.sqrt() if given_scale else None
    x = langevin(den, x0, steps=600, step=h, ratio=rho, scale=scale, seed=1)
    D = v if given_scale else x0.var(0)
    w = v + rho**2
    var = _stationary_variance(w, D, h)
    assert ((x.mean(0) - mu) / var.sqrt()).abs().max() < 4 / math.sqrt(N)
    assert ((x.var(0) / var - 1).abs() < 4 * math.sqrt(2 / N)).all()


def test_langevin_default_ratio_and_seed():
    den = GaussianDenoiser(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    x0 = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = langevin(den, x0, steps=5, seed=3)
    b = langevin(den, x0, steps=5, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, x0)
    assert torch.equal(langevin(den, x0, steps=0), x0)
    assert plausible.langevin is langevin


def test_langevin_errors():
    den = GaussianDenoiser(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        langevin(den, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        langevin(den, torch.tensor([[0.0, math.nan], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="step"):
        langevin(den, torch.randn(4, 2), step=0.0)
    with pytest.raises(ValueError, match="steps"):
        langevin(den, torch.randn(4, 2), steps=-1)
    with pytest.raises(ValueError, match="collapsed"):
        langevin(den, torch.ones(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        langevin(den, torch.randn(1, 2))
    with pytest.raises(ValueError, match="ratio"):
        langevin(den, torch.randn(4, 2), ratio=-1.0)
    with pytest.raises(TypeError, match="Denoiser"):
        langevin(lambda x, t: x, torch.randn(4, 2))  # type: ignore[arg-type]
