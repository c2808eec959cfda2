r"""Bad inputs raise ``ValueError`` / ``TypeError`` with a message that names what was expected.

Observations are checked against the prior's state shape when a posterior is built
(``MMPS(prior, Observation(...))``), so most checks go through that constructor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plausible import (
    DPS,
    MMPS,
    SDA,
    GaussianDenoiser,
    Observation,
    VPSchedule,
    ops,
    sample,
)
from plausible.schedules import schedule_from_config, time_grid

F64 = torch.float64
S = (4, 4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def prior() -> GaussianDenoiser:
    return GaussianDenoiser(torch.zeros(S, dtype=F64), 1.0)


def _y(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64)


# --------------------------------------------------------------------------- y vs A(x)


@pytest.mark.parametrize("posterior", [MMPS, DPS, SDA])
def test_y_shape_differs_from_A_of_x(prior, posterior):
    obs = Observation(_y(3, 3), ops.Subsample(2), noise=0.1)
    with pytest.raises(ValueError, match=r"y has shape \(3, 3\) but A\(x\) has shape \(2, 2\) "
                                         r"for states of shape \(4, 4\)"):
        posterior(prior, obs)


def test_y_shape_differs_identity(prior):
    with pytest.raises(ValueError, match=r"y has shape \(16,\) but A\(x\) has shape \(4, 4\)"):
        MMPS(prior, Observation(_y(16), noise=0.1))


def test_operator_that_fails_on_the_state_shape(prior):
    obs = Observation(_y(5, 5), ops.Mask(torch.ones(5, 5, dtype=torch.bool)), noise=0.1)
    with pytest.raises(ValueError, match=r"operator failed on states of shape \(4, 4\).*"
                                         r"Mask of shape \(5, 5\)"):
        MMPS(prior, obs)


def test_one_bad_observation_in_a_list(prior):
    good = Observation(_y(*S), noise=0.1)
    bad = Observation(_y(2, 3), ops.Subsample(2), noise=0.1)
    with pytest.raises(ValueError, match=r"y has shape \(2, 3\)"):
        MMPS(prior, [good, bad])


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("noise", [0.0, -0.1])
def test_nonpositive_scalar_noise(noise):
    with pytest.raises(ValueError, match="noise standard deviations must be positive"):
        Observation(_y(*S), noise=noise)


def test_nonpositive_per_entry_noise():
    std = torch.full(S, 0.1, dtype=F64)
    std[1, 2] = 0.0
    with pytest.raises(ValueError, match="noise standard deviations must be positive"):
        Observation(_y(*S), noise=std)
    std[1, 2] = -1.0
    with pytest.raises(ValueError, match="noise standard deviations must be positive"):
        Observation(_y(*S), noise=std)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_noise(bad):
    with pytest.raises(ValueError, match="noise must be finite"):
        Observation(_y(*S), noise=bad)
    std = torch.full(S, 0.1, dtype=F64)
    std[0, 0] = bad
    with pytest.raises(ValueError, match="noise must be finite"):
        Observation(_y(*S), noise=std)
    cov = torch.eye(16, dtype=F64)
    cov[3, 3] = bad
    with pytest.raises(ValueError, match="noise must be finite"):
        Observation(_y(*S), noise=cov)


def test_noise_covariance_not_positive_definite():
    cov = torch.eye(16, dtype=F64)
    cov[5, 5] = -0.5
    with pytest.raises(ValueError, match="noise covariance must be positive definite"):
        Observation(_y(*S), noise=cov)
    # PSD but singular
    u = torch.randn(16, 3, dtype=F64)
    with pytest.raises(ValueError, match="noise covariance must be positive definite"):
        Observation(_y(*S), noise=u @ u.T)


def test_noise_covariance_not_symmetric():
    cov = torch.eye(16, dtype=F64)
    cov[0, 1] = 0.3
    with pytest.raises(ValueError, match="noise covariance must be symmetric"):
        Observation(_y(*S), noise=cov)


@pytest.mark.parametrize("shape", [(4,), (4, 5), (2, 4, 4), (15, 15), (16, 17)])
def test_wrong_shaped_noise_tensor(shape):
    with pytest.raises(ValueError, match=r"noise must be a scalar std, a tensor of stds of y's "
                                         r"shape \(4, 4\), or a \(16, 16\) covariance"):
        Observation(_y(*S), noise=torch.ones(shape, dtype=F64))


# --------------------------------------------------------------------------- y values


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_y_at_observed_entries(prior, bad):
    y = _y(*S)
    y[2, 1] = bad
    with pytest.raises(ValueError, match="y contains NaN or infinity at observed entries"):
        MMPS(prior, Observation(y, noise=0.1))
    m = torch.ones(S, dtype=torch.bool)
    m[0, 0] = False
    with pytest.raises(ValueError, match="y contains NaN or infinity at observed entries"):
        MMPS(prior, Observation(y, ops.Mask(m), noise=0.1))
    m[2, 1] = False  # now outside the mask: accepted
    post = MMPS(prior, Observation(y, ops.Mask(m), noise=0.1))
    out = post(torch.randn(2, *S, dtype=F64), torch.tensor(0.5))
    assert torch.isfinite(out).all()


def test_y_must_be_a_floating_tensor():
    with pytest.raises(TypeError, match="y must be a floating-point tensor"):
        Observation(torch.ones(S, dtype=torch.int64))
    with pytest.raises(TypeError, match="y must be a floating-point tensor"):
        Observation(np.ones(S))


def test_operator_must_be_callable():
    with pytest.raises(TypeError, match="A must be an Operator or a callable"):
        Observation(_y(*S), A=3)


# --------------------------------------------------------------------------- operators


def test_detached_operator_is_not_differentiable(prior):
    obs = Observation(_y(*S), ops.Lambda(lambda x: x.detach() * 2), noise=0.1)
    with pytest.raises(TypeError, match="operator is not differentiable"):
        MMPS(prior, obs)


def test_numpy_operator_is_rejected(prior):
    def via_numpy(x):
        return torch.from_numpy(np.sin(x.detach().numpy()))

    with pytest.raises(TypeError, match="operator is not differentiable"):
        MMPS(prior, Observation(_y(*S), via_numpy, noise=0.1))

    def via_numpy_no_detach(x):
        return torch.from_numpy(np.sin(x.numpy()))

    with pytest.raises((TypeError, ValueError), match=r"operator failed.*numpy|differentiable"):
        MMPS(prior, Observation(_y(*S), via_numpy_no_detach, noise=0.1))


def test_operator_returning_a_non_tensor(prior):
    obs = Observation(_y(*S), ops.Lambda(lambda x: x.tolist()), noise=0.1)
    with pytest.raises(TypeError, match="operator must return a tensor, got list"):
        MMPS(prior, obs)


def test_piecewise_constant_operator_is_rejected(prior):
    """torch.round has a zero Jacobian everywhere: no entry of y depends on x, MMPS/DPS would
    silently ignore the observation. Building the posterior must refuse it."""
    obs = Observation(_y(*S), ops.Lambda(lambda x: torch.round(x)), noise=0.1)
    with pytest.raises((TypeError, ValueError), match="differentiable|Jacobian|depend"):
        MMPS(prior, obs)


# --------------------------------------------------------------------------- posteriors


def test_posterior_arguments(prior):
    obs = Observation(_y(*S), noise=0.1)
    with pytest.raises(TypeError, match="prior must be a Denoiser"):
        MMPS(torch.nn.Linear(2, 2), obs)
    with pytest.raises(TypeError, match="observations must be an Observation or a non-empty"):
        MMPS(prior, [])
    with pytest.raises(TypeError, match="observations must be an Observation or a non-empty"):
        MMPS(prior, [obs, _y(*S)])
    with pytest.raises(ValueError, match="solver must be 'cg' or 'gmres'"):
        MMPS(prior, obs, solver="bicgstab")
    with pytest.raises(ValueError, match="tol must be non-negative"):
        MMPS(prior, obs, tol=-1e-3)
    with pytest.raises(ValueError, match="maxiter must be a non-negative integer or None"):
        MMPS(prior, obs, maxiter=-2)
    with pytest.raises(ValueError, match="zeta must be non-negative"):
        DPS(prior, obs, zeta=-1.0)
    with pytest.raises(ValueError, match="gamma must be non-negative"):
        SDA(prior, obs, gamma=float("nan"))


# --------------------------------------------------------------------------- denoiser inputs


def _denoisers(prior):
    obs = Observation(_y(*S), noise=0.1)
    return {"gaussian": prior, "mmps": MMPS(prior, obs), "dps": DPS(prior, obs),
            "sda": SDA(prior, obs)}


@pytest.mark.parametrize("which", ["gaussian", "mmps", "dps", "sda"])
@pytest.mark.parametrize("t_shape", [(2,), (3, 1), (1, 3), (4,)])
def test_t_of_the_wrong_shape(prior, which, t_shape):
    d = _denoisers(prior)[which]
    x_t = torch.randn(3, *S, dtype=F64)
    with pytest.raises(ValueError, match=r"t must have shape \(\) or \(B,\) = \(3,\) for x_t of "
                                         r"shape \(3, 4, 4\)"):
        d(x_t, torch.full(t_shape, 0.5))
    # the right shapes work
    assert d(x_t, torch.full((3,), 0.5)).shape == x_t.shape
    assert d(x_t, 0.5).shape == x_t.shape


@pytest.mark.parametrize("which", ["gaussian", "mmps", "dps", "sda"])
@pytest.mark.parametrize("x_shape", [(3, 16), (3, 4, 5), (3, 1, 4, 4), (4, 4)])
def test_x_t_of_the_wrong_state_shape(prior, which, x_shape):
    d = _denoisers(prior)[which]
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 4, 4\) for a denoiser of "
                                         r"states of shape \(4, 4\)"):
        d(torch.randn(x_shape, dtype=F64), torch.tensor(0.5))


@pytest.mark.parametrize("which", ["gaussian", "mmps"])
def test_x_t_not_floating(prior, which):
    d = _denoisers(prior)[which]
    with pytest.raises(TypeError, match="x_t must be a floating-point tensor"):
        d(torch.ones(2, *S, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="x_t must be a floating-point tensor"):
        d(np.ones((2, *S)), 0.5)


def test_score_and_tweedie_cov_check_shapes(prior):
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 4, 4\)"):
        prior.score(torch.randn(2, 3, 3, dtype=F64), 0.5)
    with pytest.raises(ValueError, match=r"t must have shape \(\) or \(B,\)"):
        prior.tweedie_cov(torch.randn(2, *S, dtype=F64), torch.ones(5), torch.randn(2, *S))


# --------------------------------------------------------------------------- GaussianDenoiser


def test_gaussian_denoiser_non_positive_definite():
    cov = torch.eye(4, dtype=F64)
    cov[2, 2] = -1.0
    with pytest.raises(ValueError, match="dense covariance must be positive definite"):
        GaussianDenoiser(torch.zeros(4, dtype=F64), cov)
    u = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="dense covariance must be positive definite"):
        GaussianDenoiser(torch.zeros(4, dtype=F64), u @ u.T)  # singular
    with pytest.raises(ValueError, match="diagonal covariance must be positive"):
        GaussianDenoiser(torch.zeros(4, dtype=F64), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="diagonal covariance must be positive"):
        GaussianDenoiser(torch.zeros(4, dtype=F64), -1.0)


def test_gaussian_denoiser_non_symmetric():
    cov = 2 * torch.eye(4, dtype=F64)
    cov[0, 3] = 0.5
    with pytest.raises(ValueError, match="dense covariance must be symmetric"):
        GaussianDenoiser(torch.zeros(4, dtype=F64), cov)


def test_gaussian_denoiser_bad_shapes():
    with pytest.raises(ValueError, match=r"cov must be a scalar, a diagonal of shape \(4,\), a "
                                         r"matrix of shape \(4, 4\)"):
        GaussianDenoiser(torch.zeros(4, dtype=F64), torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match=r"low-rank covariance \(U, d\) expects U of shape "
                                         r"\(4, r\)"):
        GaussianDenoiser(torch.zeros(4, dtype=F64), (torch.ones(3, 2), torch.ones(4)))
    with pytest.raises(ValueError, match="mean must be a floating-point tensor"):
        GaussianDenoiser(torch.zeros(4, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="mean must be finite"):
        GaussianDenoiser(torch.tensor([0.0, float("nan")]), 1.0)
    with pytest.raises(ValueError, match="the covariance must be finite"):
        GaussianDenoiser(torch.zeros(2), torch.tensor([1.0, float("inf")]))


# --------------------------------------------------------------------------- sample()


def test_sample_unknown_sampler(prior):
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; expected one of .*'ddpm'"):
        sample(prior, 2, steps=2, sampler="euler", progress=False)


@pytest.mark.parametrize("n", [0, -3, 2.0, "4"])
def test_sample_bad_n(prior, n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample(prior, n, steps=2, progress=False)


def test_sample_other_arguments(prior):
    with pytest.raises(TypeError, match="sample expects a Denoiser"):
        sample(lambda x, t: x, 2, steps=2, progress=False)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        sample(prior, 2, steps=2, sampler="dpm++", order=4, progress=False)
    with pytest.raises(ValueError, match="tau must be > 0, got 0.0"):
        sample(prior, 2, steps=2, sampler="pc", tau=0.0, progress=False)
    with pytest.raises(ValueError, match="corrections must be an integer >= 0, got -1"):
        sample(prior, 2, steps=2, sampler="pc", corrections=-1, progress=False)
    with pytest.raises(ValueError, match="correct_above must be >= 0, got -0.1"):
        sample(prior, 2, steps=2, sampler="pc", correct_above=-0.1, progress=False)
    with pytest.raises(ValueError, match="correct_above must be >= 0, got nan"):
        sample(prior, 2, steps=2, sampler="pc", correct_above=float("nan"), progress=False)
    with pytest.raises(ValueError, match=r"x_1 must have shape \(2, 4, 4\)"):
        sample(prior, 2, steps=2, x_1=torch.randn(3, 4, 4), progress=False)
    with pytest.raises(ValueError, match="custom grid must be a decreasing tensor"):
        sample(prior, 2, grid=torch.tensor([0.0, 0.5, 1.0]), progress=False)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(prior, 2, steps=0, progress=False)


def test_unknown_schedule_or_grid_kind(prior):
    with pytest.raises(ValueError, match=r"unknown time grid 'linear'; expected 'uniform', "
                                         r"'logsnr' or 'karras'"):
        sample(prior, 2, steps=2, grid="linear", progress=False)
    with pytest.raises(ValueError, match=r"unknown time grid 'linear'"):
        time_grid(3, "linear", VPSchedule())
    with pytest.raises(ValueError, match=r"unknown schedule kind 'cosine'; expected one of "
                                         r"\['rectified', 've', 'vp'\]"):
        schedule_from_config({"kind": "cosine"})


def test_sample_raises_when_it_diverges(prior):
    """DPS with a huge step blows up without NaN (it reached 1e94 in a benchmark): the sampler
    must say so instead of returning such samples."""
    obs = Observation(torch.full(S, 3.0, dtype=F64), ops.Identity(), noise=1e-3)
    with pytest.raises(FloatingPointError, match=r"values of size .* it diverged"):
        sample(DPS(prior, obs, zeta=1e6), 4, steps=16, dtype=F64, progress=False)
    with pytest.raises(FloatingPointError, match="NaN or infinity"):
        sample(prior, 2, steps=2, x_1=torch.full((2, *S), float("nan")), progress=False)
    # a modest zeta stays within bounds and is returned
    x = sample(DPS(prior, obs, zeta=1.0, normalize=True), 4, steps=16, dtype=F64,
               progress=False)
    assert x.abs().max() < 100
