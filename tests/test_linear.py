"""Linear-Gaussian chains (plausible.tasks.linear): exact laws and the Kalman smoother
against dense closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import moment_errors
from plausible import GaussianDenoiser, gaussian_condition
from plausible.tasks import ARChain, kalman_smoother
from plausible.tasks.linear import companion_form

f64 = torch.float64


def chain_2x2() -> ARChain:
    A = torch.tensor([[[0.5, 0.2], [-0.1, 0.4]], [[0.2, 0.0], [0.1, -0.3]]])
    Q = torch.tensor([[0.3, 0.1], [0.1, 0.2]])
    return ARChain(A, Q, mean=torch.tensor([1.0, -2.0]))


def dense_observation(H: torch.Tensor, y: torch.Tensor, R: torch.Tensor, mask: torch.Tensor):
    """The stacked observation matrix (M_obs, L D), values and variances of the observed
    entries of y (L, M) on the flattened trajectory."""
    L, M = y.shape
    D = H.shape[1]
    rows, values, variances = [], [], []
    for i in range(L):
        for j in range(M):
            if mask[i, j]:
                r = torch.zeros(L * D, dtype=f64)
                r[i * D:(i + 1) * D] = H[j]
                rows.append(r)
                values.append(y[i, j])
                variances.append(R[j])
    return torch.stack(rows), torch.stack(values).to(f64), torch.stack(variances).to(f64)


def test_ar1_autocovariance_closed_form():
    a, q = 0.9, 0.19
    chain = ARChain(torch.tensor([a], dtype=f64), q)
    gammas = chain.autocovariance(10)[:, 0, 0]
    expected = q / (1 - a**2) * a ** torch.arange(10, dtype=f64)
    assert torch.allclose(gammas, expected, rtol=1e-12, atol=0)
    mean, cov = chain.trajectory_gaussian(4)
    assert torch.allclose(cov[0, 3], torch.tensor(a**3, dtype=f64), rtol=1e-12)


def test_stationary_lyapunov_and_yule_walker():
    chain = chain_2x2()
    F, Qc = companion_form(chain.coefficients, chain.noise_cov)
    S = chain.stationary_companion_cov
    assert torch.allclose(F @ S @ F.T + Qc, S, atol=1e-13)
    # Yule-Walker at lag 0: Gamma_0 = sum_j A_j Gamma_j^T + Q
    G = chain.autocovariance(3)
    rhs = sum(chain.coefficients[j] @ G[j + 1].T for j in range(2)) + chain.noise_cov
    assert torch.allclose(G[0], rhs, atol=1e-13)


def test_trajectory_gaussian_is_stationary_and_matches_samples():
    chain = chain_2x2()
    mean, cov = chain.trajectory_gaussian(12)
    m5, c5 = chain.trajectory_gaussian(5)
    for start in (0, 3, 7):  # every stretch of 5 states has the same law
        block = cov.reshape(12, 2, 12, 2)[start:start + 5, :, start:start + 5].reshape(10, 10)
        assert torch.allclose(block, c5, atol=1e-13)
    x = chain.sample(20_000, 6, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 6, 2) and x.dtype == f64
    m6, c6 = chain.trajectory_gaussian(6)
    e_mean, e_cov = moment_errors(x.reshape(20_000, -1), m6.flatten(), c6)
    assert e_mean < 4 and e_cov < 4  # in units of the Monte-Carlo floor


def test_log_prob_matches_dense_gaussian():
    chain = chain_2x2()
    x = chain.sample(5, 9, torch.Generator().manual_seed(1))
    m, C = chain.trajectory_gaussian(9)
    assert torch.allclose(chain.log_prob(x), GaussianDenoiser(m, C).log_prob(x), atol=1e-9)
    m1, C1 = chain.trajectory_gaussian(1)
    assert torch.allclose(chain.log_prob(x[:, :1]), GaussianDenoiser(m1, C1).log_prob(x[:, :1]),
                          atol=1e-10)


def test_denoisers_are_the_exact_gaussians():
    chain = chain_2x2()
    d = chain.window_denoiser(order=3)
    assert d.shape == (7, 2)
    m, C = chain.trajectory_gaussian(7)
    assert torch.allclose(d.covariance, C, atol=1e-12)
    flat = chain.window_denoiser(order=1, flatten=True)
    assert flat.shape == (6,)
    x = torch.randn(4, 3, 2, dtype=f64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=f64)
    assert torch.allclose(flat(x.reshape(4, 6), t).reshape(4, 3, 2),
                          chain.window_denoiser(order=1)(x, t), atol=1e-12)
    full = chain.trajectory_denoiser(10)
    assert full.shape == (10, 2)
    assert torch.allclose(full.covariance, chain.trajectory_gaussian(10)[1], atol=1e-12)


def random_model(D: int, M: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    F = 0.9 * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=f64))[0]
    B = torch.randn(D, D, generator=g, dtype=f64)
    Q = 0.2 * B @ B.T / D + 0.05 * torch.eye(D, dtype=f64)
    H = torch.randn(M, D, generator=g, dtype=f64)
    R = 0.1 + torch.rand(M, generator=g, dtype=f64)
    m0 = torch.randn(D, generator=g, dtype=f64)
    B0 = torch.randn(D, D, generator=g, dtype=f64)
    P0 = B0 @ B0.T / D + 0.1 * torch.eye(D, dtype=f64)
    return F, Q, H, R, m0, P0


def dense_prior(F, Q, m0, P0, L):
    """The joint Gaussian of x_0..x_{L-1} of the state-space model, built directly."""
    D = F.shape[0]
    means = [m0]
    blocks = {(0, 0): P0}
    for i in range(1, L):
        means.append(F @ means[-1])
        for j in range(i):
            blocks[(i, j)] = F @ blocks[(i - 1, j)]
        blocks[(i, i)] = F @ blocks[(i - 1, i - 1)] @ F.T + Q
    C = torch.zeros(L * D, L * D, dtype=f64)
    for (i, j), b in blocks.items():
        C[i * D:(i + 1) * D, j * D:(j + 1) * D] = b
        C[j * D:(j + 1) * D, i * D:(i + 1) * D] = b.T
    return torch.cat(means), C


def test_kalman_smoother_equals_dense_posterior_with_missing_data():
    D, M, L = 3, 2, 15
    F, Q, H, R, m0, P0 = random_model(D, M, 0)
    y = torch.randn(L, M, generator=torch.Generator().manual_seed(5), dtype=f64)
    y[2] = math.nan  # a missing row
    y[6, 0] = math.nan  # partial rows
    y[9:12, 1] = math.nan
    observed = torch.ones(L, dtype=torch.bool)
    observed[13] = False  # dropped by the mask, whatever y holds
    means, covs, log_ev = kalman_smoother(y, F, Q, H, R, m0, P0, observed=observed)
    assert means.shape == (L, D) and covs.shape == (L, D, D) and log_ev.shape == ()
    mask = ~torch.isnan(y) & observed[:, None]
    A, v, r = dense_observation(H, y, R, mask)
    m, C = dense_prior(F, Q, m0, P0, L)
    pm, pc, ple = gaussian_condition(m, C, A, v, r)
    pc = pc.reshape(L, D, L, D)
    assert torch.allclose(means, pm.reshape(L, D), atol=1e-8, rtol=0)
    for i in range(L):
        assert torch.allclose(covs[i], pc[i, :, i], atol=1e-8, rtol=0)
    assert abs(float(log_ev - ple)) < 1e-8


def test_kalman_smoother_singular_transition_noise_and_no_data():
    # a deterministic (Q = 0) component and nothing observed: the prior marginals, evidence 0
    D, M, L = 2, 1, 6
    F, _, H, R, m0, P0 = random_model(D, M, 1)
    Q = torch.diag(torch.tensor([0.3, 0.0], dtype=f64))
    y = torch.full((L, M), math.nan, dtype=f64)
    means, covs, log_ev = kalman_smoother(y, F, Q, H, R, m0, P0)
    m, C = dense_prior(F, Q, m0, P0, L)
    C = C.reshape(L, D, L, D)
    assert torch.allclose(means, m.reshape(L, D), atol=1e-12)
    for i in range(L):
        assert torch.allclose(covs[i], C[i, :, i], atol=1e-12)
    assert float(log_ev) == 0.0


def test_ar_chain_smoother_companion_form_equals_dense_posterior():
    chain = chain_2x2()
    L = 20
    H = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 1.0]], dtype=f64)
    R = torch.tensor([0.1, 0.2, 0.05], dtype=f64)
    x = chain.sample(1, L, torch.Generator().manual_seed(2))[0]
    y = x @ H.T + R.sqrt() * torch.randn(L, 3, generator=torch.Generator().manual_seed(3),
                                         dtype=f64)
    y[3] = math.nan
    y[5, 1] = math.nan
    y[7:12, 0] = math.nan
    observed = torch.ones(L, dtype=torch.bool)
    observed[15] = False
    means, covs, log_ev = chain.smooth(y, H, R, observed)
    mask = ~torch.isnan(y) & observed[:, None]
    A, v, r = dense_observation(H, y, R, mask)
    m, C = chain.trajectory_gaussian(L)
    post = chain.trajectory_denoiser(L).condition(A, v, r)
    pm, pc = post.mean.reshape(L, 2), post.covariance.reshape(L, 2, L, 2)
    assert torch.allclose(means, pm, atol=1e-8, rtol=0)
    for i in range(L):
        assert torch.allclose(covs[i], pc[i, :, i], atol=1e-8, rtol=0)
    assert abs(float(log_ev - post.log_evidence)) < 1e-8


def test_bad_input():
    with pytest.raises(ValueError, match="not stationary"):
        ARChain(torch.tensor([1.0]), 1.0)
    with pytest.raises(ValueError, match="positive definite"):
        ARChain(torch.tensor([0.5]), -1.0)
    with pytest.raises(ValueError, match=r"\(k, D, D\)"):
        ARChain(torch.zeros(2, 2, 3), 1.0)
    F, Q, H, R, m0, P0 = random_model(2, 1, 0)
    y = torch.zeros(4, 1, dtype=f64)
    with pytest.raises(ValueError, match="H must have shape"):
        kalman_smoother(y, F, Q, H.T, R, m0, P0)
    with pytest.raises(ValueError, match="y must have shape"):
        kalman_smoother(y[:, 0], F, Q, H, R, m0, P0)
    with pytest.raises(ValueError, match="infinity"):
        kalman_smoother(torch.full((4, 1), math.inf), F, Q, H, R, m0, P0)
    with pytest.raises(ValueError, match="R must be positive definite"):
        kalman_smoother(y, F, Q, H, torch.zeros(1), m0, P0)
    with pytest.raises(ValueError, match="semi-definite"):
        kalman_smoother(y, F, -Q, H, R, m0, P0)
    with pytest.raises(ValueError, match="observed must be a boolean"):
        kalman_smoother(y, F, Q, H, R, m0, P0, observed=torch.ones(4))
    with pytest.raises(ValueError, match="observed must be a boolean"):
        kalman_smoother(y, F, Q, H, R, m0, P0, observed=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="m0"):
        kalman_smoother(y, F, Q, H, R, m0[:1], P0)
