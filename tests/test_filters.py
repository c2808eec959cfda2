"""Particle filter / FFBSi smoother / EnKS against the exact Kalman (RTS) smoother and the
dense Gaussian posterior of a linear-Gaussian chain.

Tolerances are multiples of the Monte-Carlo error. For the particle smoother, ``M``
backward trajectories drawn from a filter whose smallest effective sample size is ``ESS``
have an error of order ``sigma * sqrt(1/M + 1/ESS)``; for the EnKS with ``E`` members,
``sigma / sqrt(E)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from plausible.denoisers import gaussian_condition
from plausible.tasks.filters import (
    GaussianNoise,
    backward_simulation,
    ensemble_kalman_smoother,
    particle_filter,
    particle_smoother,
)
from plausible.tasks.linear import kalman_smoother

F64 = torch.float64
L = 12
STEPS = [0, 3, 6, 9, 11]
R_STD = 0.2


def _model(Q_cov: torch.Tensor | None = None):
    c, s = math.cos(0.3), math.sin(0.3)
    F = 0.95 * torch.tensor([[c, -s], [s, c]], dtype=F64)
    Q = torch.diag(torch.tensor([0.3, 0.5], dtype=F64) ** 2) if Q_cov is None else Q_cov
    H = torch.tensor([[1.0, 0.0]], dtype=F64)
    m0 = torch.tensor([1.0, -1.0], dtype=F64)
    P0 = torch.eye(2, dtype=F64)
    g = torch.Generator().manual_seed(0)
    x = [m0 + torch.randn(2, generator=g, dtype=F64)]
    chol = torch.linalg.cholesky(Q) if bool((torch.diagonal(Q) > 0).all()) else 0 * Q
    for _ in range(1, L):
        x.append(F @ x[-1] + chol @ torch.randn(2, generator=g, dtype=F64))
    X = torch.stack(x)
    y = X[STEPS, :1] + R_STD * torch.randn(len(STEPS), 1, generator=g, dtype=F64)
    return F, Q, H, m0, P0, y


def _kalman(F, Q, H, m0, P0, y):
    Y = torch.full((L, 1), math.nan, dtype=F64)
    Y[STEPS] = y
    return kalman_smoother(Y, F, Q, H, R_STD**2, m0, P0)


def _dense(F, Q, H, m0, P0, y):
    """Posterior of the whole chain from its joint Gaussian (LD x LD)."""
    D = 2
    means = [m0]
    P = [P0]
    for _ in range(1, L):
        means.append(F @ means[-1])
        P.append(F @ P[-1] @ F.T + Q)
    cov = torch.zeros(L * D, L * D, dtype=F64)
    for s in range(L):
        for t in range(s, L):
            block = P[s] @ torch.linalg.matrix_power(F, t - s).T  # Cov(x_s, x_t)
            cov[s * D:(s + 1) * D, t * D:(t + 1) * D] = block
            cov[t * D:(t + 1) * D, s * D:(s + 1) * D] = block.T
    A = torch.zeros(len(STEPS), L * D, dtype=F64)
    for k, t in enumerate(STEPS):
        A[k, t * D] = 1.0
    return gaussian_condition(torch.cat(means), cov, A, y[:, 0], R_STD**2)


def _callables(F, m0):
    return (lambda n, g: m0 + torch.randn(n, 2, generator=g, dtype=F64),
            lambda x: x @ F.T, lambda x: x[:, :1])


def test_dense_reference_agrees_with_kalman():
    F, Q, H, m0, P0, y = _model()
    mk, Pk, logz = _kalman(F, Q, H, m0, P0, y)
    mean, cov, logz_dense = _dense(F, Q, H, m0, P0, y)
    assert torch.allclose(mean.reshape(L, 2), mk, atol=1e-10)
    blocks = torch.stack([cov[2 * t:2 * t + 2, 2 * t:2 * t + 2] for t in range(L)])
    assert torch.allclose(blocks, Pk, atol=1e-10)
    assert float(logz_dense) == pytest.approx(float(logz), abs=1e-10)


def test_particle_smoother_matches_kalman_smoother():
    # a dense transition covariance exercises the Cholesky path
    Q = torch.tensor([[0.09, 0.03], [0.03, 0.25]], dtype=F64)
    F, Q, H, m0, P0, y = _model(Q)
    mk, Pk, _ = _kalman(F, Q, H, m0, P0, y)
    mean, cov, _ = _dense(F, Q, H, m0, P0, y)
    init, f, h = _callables(F, m0)
    M, N = 1024, 4096
    x, result = particle_smoother(y, STEPS, L, init, f, Q, h, R_STD, particles=N, samples=M,
                                  generator=torch.Generator().manual_seed(1))
    assert x.shape == (M, L, 2) and x.dtype == F64
    ess = float(result.ess.min())
    assert ess > 100  # the filter is healthy (else the tolerances below would be loose)
    unit = math.sqrt(1 / M + 1 / ess)
    sd = torch.diagonal(Pk, dim1=1, dim2=2).sqrt()
    tol = 5 * unit * sd
    assert ((x.mean(0) - mk).abs() <= tol).all(), ((x.mean(0) - mk) / (unit * sd))
    var_rel = x.var(0) / sd**2 - 1
    assert (var_rel.abs() <= 4 * math.sqrt(2) * unit).all(), var_rel
    # the joint: lag-1 correlations of the first coordinate against the dense posterior
    std_all = torch.diagonal(cov).sqrt()
    for t in range(L - 1):
        i, j = 2 * t, 2 * (t + 1)
        exact = cov[i, j] / (std_all[i] * std_all[j])
        est = torch.corrcoef(torch.stack([x[:, t, 0], x[:, t + 1, 0]]))[0, 1]
        assert abs(float(est - exact)) <= 5 * unit * (1 - float(exact) ** 2) + 1e-3
    # power: the filter's marginals differ from the smoother's by more than the tolerance,
    # so a smoother that returned the filter (or the genealogy's few ancestors) would fail
    assert ((result.mean() - mk).abs() > tol).any()


def test_particle_filter_log_evidence_matches_kalman():
    F, Q, H, m0, P0, y = _model()
    _, _, logz = _kalman(F, Q, H, m0, P0, y)
    init, f, h = _callables(F, m0)
    runs = torch.stack([
        particle_filter(y, STEPS, L, init, f, torch.tensor([0.3, 0.5], dtype=F64), h,
                        R_STD, particles=2048, generator=torch.Generator().manual_seed(s)
                        ).log_evidence
        for s in range(8)
    ])
    spread = float(runs.std())
    assert spread < 0.2  # 2048 particles: the estimate is precise
    # unbiased in p(y); its log is biased by about -var/2, negligible here
    assert abs(float(runs.mean()) - float(logz)) <= 4 * spread / math.sqrt(8) + spread**2
    # filtering means at the last time equal the smoothing ones (same distribution)
    result = particle_filter(y, STEPS, L, init, f, torch.tensor([0.3, 0.5], dtype=F64), h,
                             R_STD, particles=8192, generator=torch.Generator().manual_seed(9))
    mk, Pk, _ = _kalman(F, Q, H, m0, P0, y)
    sd_last = torch.diagonal(Pk[-1]).sqrt()
    ess_last = float(result.ess[-1])
    assert ((result.mean()[-1] - mk[-1]).abs() <= 5 * sd_last / math.sqrt(ess_last)).all()


def test_ensemble_kalman_smoother_matches_kalman_smoother():
    F, Q, H, m0, P0, y = _model()
    mk, Pk, _ = _kalman(F, Q, H, m0, P0, y)
    init, f, h = _callables(F, m0)
    E = 4000
    result = ensemble_kalman_smoother(y, STEPS, L, init, f, torch.tensor([0.3, 0.5], dtype=F64),
                                      h, torch.tensor([R_STD], dtype=F64), members=E,
                                      generator=torch.Generator().manual_seed(2))
    sd = torch.diagonal(Pk, dim1=1, dim2=2).sqrt()
    assert ((result.mean() - mk).abs() <= 6 * sd / math.sqrt(E)).all()
    var = torch.diagonal(result.covariance(), dim1=1, dim2=2)
    assert ((var / sd**2 - 1).abs() <= 5 * math.sqrt(2 / E)).all()
    # at the last time the smoother is the filter
    assert torch.equal(result.filtered[:, -1], result.trajectories[:, -1])


def test_ensemble_kalman_smoother_deterministic_dynamics():
    # Q = 0 (as Lorenz-96): the state is a deterministic function of x_0
    F, Q, H, m0, P0, y = _model(torch.zeros(2, 2, dtype=F64))
    mk, Pk, _ = _kalman(F, Q, H, m0, P0, y)
    init, f, h = _callables(F, m0)
    E = 4000
    result = ensemble_kalman_smoother(y, STEPS, L, init, f, 0.0, h, R_STD, members=E,
                                      generator=torch.Generator().manual_seed(3))
    sd = torch.diagonal(Pk, dim1=1, dim2=2).sqrt()
    assert ((result.mean() - mk).abs() <= 6 * sd / math.sqrt(E)).all()
    var = torch.diagonal(result.covariance(), dim1=1, dim2=2)
    assert ((var / sd**2 - 1).abs() <= 5 * math.sqrt(2 / E)).all()
    # multiplicative inflation widens the forecast, hence the analysis of the observed
    # coordinate at the last time (P_a = P_f R / (P_f + R) increases with P_f)
    inflated = ensemble_kalman_smoother(y, STEPS, L, init, f, 0.0, h, R_STD, members=E,
                                        inflation=1.2,
                                        generator=torch.Generator().manual_seed(3))
    assert float(inflated.filtered[:, -1, 0].var()) > float(result.filtered[:, -1, 0].var())


def test_backward_simulation_without_observations_is_the_prior_chain():
    # no observation: the smoother is the Markov chain itself, x_t ~ N(F^t m0, P_t)
    F, Q, H, m0, P0, _ = _model()
    init, f, h = _callables(F, m0)
    result = particle_filter(torch.zeros(0, 1, dtype=F64), [], 6, init, f,
                             torch.tensor([0.3, 0.5], dtype=F64), h, R_STD, particles=4096,
                             generator=torch.Generator().manual_seed(4))
    assert float(result.log_evidence) == 0.0 and not result.resampled.any()
    x = backward_simulation(result, f, torch.tensor([0.3, 0.5], dtype=F64), samples=1024,
                            generator=torch.Generator().manual_seed(5))
    m, P = m0, P0
    for t in range(6):
        sd = torch.diagonal(P).sqrt()
        assert ((x[:, t].mean(0) - m).abs() <= 5 * sd * math.sqrt(1 / 1024 + 1 / 4096)).all()
        m, P = F @ m, F @ P @ F.T + Q


def test_validation_errors():
    F, Q, H, m0, P0, y = _model()
    init, f, h = _callables(F, m0)
    args = (init, f, 0.3, h, R_STD)
    with pytest.raises(ValueError, match="strictly increasing"):
        particle_filter(y, [0, 3, 3, 9, 11], L, *args, particles=16)
    with pytest.raises(ValueError, match=r"in \[0, 12\)"):
        particle_filter(y, [0, 3, 6, 9, 12], L, *args, particles=16)
    with pytest.raises(ValueError, match="K = len"):
        particle_filter(y[:3], STEPS, L, *args, particles=16)
    bad = y.clone()
    bad[1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        particle_filter(bad, STEPS, L, *args, particles=16)
    with pytest.raises(ValueError, match="transition_noise must be"):
        particle_filter(y, STEPS, L, init, f, torch.ones(3), h, R_STD, particles=16)
    with pytest.raises(ValueError, match="positive"):
        particle_filter(y, STEPS, L, init, f, 0.0, h, R_STD, particles=16)
    with pytest.raises(ValueError, match="transition must map"):
        particle_filter(y, STEPS, L, init, lambda x: x[:, :1], 0.3, h, R_STD, particles=16)
    with pytest.raises(ValueError, match="initial particles"):
        particle_filter(y, STEPS, L, torch.zeros(3, 2, dtype=F64), f, 0.3, h, R_STD,
                        particles=16)
    with pytest.raises(ValueError, match="inflation"):
        ensemble_kalman_smoother(y, STEPS, L, *args, members=16, inflation=0.5)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianNoise(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 2, "Q")
