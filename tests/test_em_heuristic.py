"""The Gaussian covariance heuristic of the vectorised MMPS (``em.BatchedMMPS(covariance=G)``,
Rozet et al.'s ``sigma_x`` heuristic): against the closed-form posterior mean when the
heuristic's Gaussian is the prior itself, against a dense computation of
``x_hat + sigma_t^2 / alpha_t J^T A^T (Sigma + A V_G A^T)^{-1} (y - A x_hat)`` with another
Gaussian prior and with a network prior (Jacobian by autograd), its cost (one VJP per call),
its wiring through ``em.fit`` and bad input."""

from __future__ import annotations

import pytest
import torch

import plausible
from plausible import GaussianDenoiser, em
from plausible.config import ConfigError
from plausible.tasks import manifold_problem

f64 = torch.float64


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_gaussian(D: int, seed: int) -> GaussianDenoiser:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(D, D, generator=g, dtype=f64)
    C = L @ L.T / D + 0.2 * torch.eye(D, dtype=f64)
    return GaussianDenoiser(torch.randn(D, generator=g, dtype=f64), C)


def problem(N: int, M: int, D: int, seed: int, masks: bool = False):
    g = torch.Generator().manual_seed(seed)
    if masks:
        A = em.Masks(torch.rand(N, D, generator=g) < 0.5)
    else:
        W = torch.randn(N, M, D, generator=g, dtype=f64)
        A = em.Matrices(W / W.norm(dim=2, keepdim=True))
    obs = em.Observations.simulate(torch.randn(N, D, generator=g, dtype=f64), A, 0.1,
                                   generator=g)
    if masks:
        obs.y[~A.masks] = float("nan")  # never read
    x_t = torch.randn(N, D, generator=g, dtype=f64)
    return obs, x_t


@pytest.mark.parametrize("solver", ["cg", "gmres"])
@pytest.mark.parametrize("masks", [False, True])
def test_own_gaussian_gives_the_exact_posterior_mean(solver, masks):
    """With the prior N(m, C) as its own heuristic and a converged solve, the posterior mean
    is the closed form E[x | x_t, y] = P^{-1} (C^{-1} m + alpha/sigma^2 x_t + W^T y / s^2),
    P = C^{-1} + alpha^2/sigma^2 I + W^T W / s^2 (to 1e-9)."""
    D, M, N = 5, 2, 6
    prior = random_gaussian(D, 1)
    obs, x_t = problem(N, M, D, 2, masks)
    t = torch.full((N,), 0.7, dtype=f64)
    post = em.BatchedMMPS(prior, obs, maxiter=None, tol=1e-12, solver=solver,
                          covariance=prior)
    got = post(x_t, t)
    alpha, sigma = prior.schedule(t[:1])
    a, s2 = float(alpha), float(sigma) ** 2
    # W_i: the projection, or diag(mask_i) (unobserved rows of y are zeroed)
    W = torch.diag_embed(obs.A.masks.to(f64)) if masks else obs.A.weight
    y = torch.nan_to_num(obs.y)
    Ci = torch.linalg.inv(prior.covariance)
    P = Ci + a**2 / s2 * torch.eye(D, dtype=f64) + W.transpose(1, 2) @ W / 0.01
    rhs = Ci @ prior.mean + a / s2 * x_t + torch.einsum("bmd,bm->bd", W, y) / 0.01
    want = torch.linalg.solve(P, rhs)
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9)
    # and equals the Tweedie-covariance MMPS of the same exact prior
    plain = em.BatchedMMPS(prior, obs, maxiter=None, tol=1e-12, solver=solver)(x_t, t)
    assert torch.allclose(got, plain, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "network"])
def test_heuristic_covariance_with_another_prior(kind):
    """With a prior d other than the heuristic's Gaussian G, each row is
    x_hat + sigma^2/alpha J^T W^T u with (s^2 I + W V_G W^T) u = y - W x_hat,
    V_G = (C_G^{-1} + alpha^2/sigma^2 I)^{-1} and J the prior's Jacobian (closed form for a
    Gaussian prior, autograd for an untrained network); one VJP per call, converged."""
    D, M, N = 5, 2, 4
    G = random_gaussian(D, 3)
    if kind == "gaussian":
        prior = random_gaussian(D, 4)
    else:
        torch.manual_seed(0)
        prior = plausible.Denoiser(plausible.nets.ResMLP(features=D, hidden=32, blocks=1),
                                   shape=(D,)).to(f64)
    obs, x_t = problem(N, M, D, 5)
    t = torch.full((N,), 0.4, dtype=f64)
    post = em.BatchedMMPS(prior, obs, maxiter=None, tol=1e-12, solver="cg", covariance=G)
    step = post.step(x_t, t)
    assert post.stats["vjps"] == 1 and bool(step.solution.converged.all())
    alpha, sigma = prior.schedule(t[:1])
    a, s2 = float(alpha), float(sigma) ** 2
    I = torch.eye(D, dtype=f64)
    V = torch.linalg.inv(torch.linalg.inv(G.covariance) + a**2 / s2 * I)
    W = obs.A.weight
    with torch.no_grad():
        x_hat = prior(x_t, t)
    if kind == "gaussian":
        C = prior.covariance
        J = (a * C @ torch.linalg.inv(a**2 * C + s2 * I)).expand(N, D, D)
    else:
        J = torch.stack([torch.func.jacrev(lambda x, i=i: prior(x[None], t[i:i + 1])[0])(
            x_t[i]) for i in range(N)])
    S = 0.01 * torch.eye(M, dtype=f64) + W @ V @ W.transpose(1, 2)
    u = torch.linalg.solve(S, obs.y - torch.einsum("bmd,bd->bm", W, x_hat))
    want = x_hat + s2 / a * torch.einsum("bed,bme,bm->bd", J, W, u)
    assert torch.allclose(step.x_hat, x_hat, atol=1e-12)
    assert torch.allclose(step.x_post, want, atol=1e-9, rtol=1e-9)
    # the Tweedie-covariance MMPS of the same prior differs (the heuristic is not a no-op)
    plain = em.BatchedMMPS(prior, obs, maxiter=None, tol=1e-12, solver="gmres")(x_t, t)
    assert (plain - want).abs().max() > 1e-3


def test_fit_passes_the_lap0_gaussian(monkeypatch):
    """sampling={"covariance": "gaussian"} makes every lap's MMPS use the lap-0 Gaussian;
    the default passes none."""
    prob = manifold_problem(64, seed=0, dtype=f64)
    seen = []
    real = em.posterior_samples

    def spy(*args, **kwargs):
        seen.append(kwargs.get("covariance"))
        return real(*args, **kwargs)

    monkeypatch.setattr(em, "posterior_samples", spy)
    prior = GaussianDenoiser(torch.zeros(5, dtype=f64), torch.ones(5, dtype=f64))
    for covariance in ("gaussian", "tweedie"):
        seen.clear()
        result = em.fit(prior, prob.observations, laps=2, gaussian_iterations=4,
                        gaussian_rank="dense", sampling={"steps": 4, "covariance": covariance,
                                                         "maxiter": None},
                        progress=False)
        assert len(seen) == 2
        for g in seen:
            if covariance == "tweedie":
                assert g is None
            else:
                assert isinstance(g, GaussianDenoiser)
                assert torch.equal(g.covariance, result.gaussian.covariance)


def test_bad_input():
    D = 5
    prior = random_gaussian(D, 1)
    obs, _ = problem(3, 2, D, 2)
    with pytest.raises(TypeError, match="GaussianDenoiser"):
        em.BatchedMMPS(prior, obs, covariance=torch.eye(D))
    with pytest.raises(ValueError, match="shape"):
        em.BatchedMMPS(prior, obs, covariance=random_gaussian(4, 0))
    with pytest.raises(ValueError, match="covariance"):
        em.SamplingOptions.of({"covariance": "sigma_x"})
    raw = {"model": {"backbone": "ResMLP", "backbone_args": {"features": 5}, "shape": [5]},
           "observations": {"path": "x"}, "em": {"out": "x"},
           "sampling": {"covariance": "identity"}}
    with pytest.raises(ConfigError, match="sampling.covariance"):
        em.parse_em_config(raw)
    raw["sampling"]["covariance"] = "gaussian"
    assert em.parse_em_config(raw).sampling.covariance == "gaussian"
