"""Empirical Bayes by EM (plausible.em): the closed-form Gaussian EM against a known truth
(Fisher-information tolerance, monotone log-likelihood, MLE above the truth), the vectorised
MMPS against per-item MMPS, the exactness of posterior samples under a Gaussian prior, the
Monte-Carlo EM laps in the Gaussian family, checkpoints and resume, and bad input."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from scipy.stats import chi2

import plausible
from plausible import MMPS, GaussianDenoiser, em, sample
from plausible.checkpoints import CheckpointError
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


def projections(N: int, M: int, D: int, seed: int) -> em.Matrices:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, M, D, generator=g, dtype=f64)
    return em.Matrices(W / W.norm(dim=2, keepdim=True))


def exact_log_likelihood(m, C, W, y, var):
    """Differentiable sum of log N(y_i; W_i m, W_i C W_i^T + var I)."""
    S = torch.einsum("bmd,de,bne->bmn", W, C, W) + var * torch.eye(W.shape[1], dtype=f64)
    r = y - W @ m
    L = torch.linalg.cholesky(S)
    z = torch.linalg.solve_triangular(L, r[..., None], upper=False)[..., 0]
    logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
    return (-0.5 * (z.square().sum(1) + logdet + W.shape[1] * math.log(2 * math.pi))).sum()


# -- lap 0: closed-form Gaussian EM -------------------------------------------------------


def test_gaussian_em_recovers_truth_within_fisher_error():
    """Dense EM through varying 2x3 projections converges to the MLE; its distance to the
    truth, in the metric of the Fisher information at the truth, is a chi-square with
    p = D + D(D+1)/2 degrees of freedom: it must lie below the 0.999 quantile."""
    D, M, N, var = 3, 2, 6000, 0.05**2
    truth = random_gaussian(D, 0)
    g = torch.Generator().manual_seed(1)
    x = truth.sample(N, generator=g)
    A = projections(N, M, D, 2)
    obs = em.Observations.simulate(x, A, math.sqrt(var), generator=g)
    gauss, ll = em.gaussian_em(obs, (D,), iterations=300, progress=False)

    iu = torch.triu_indices(D, D)

    def total(theta):
        m, c = theta[:D], theta[D:]
        C = torch.zeros(D, D, dtype=f64)
        C = C.index_put((iu[0], iu[1]), c)
        C = C + C.T - torch.diag(torch.diagonal(C))
        return exact_log_likelihood(m, C, A.weight, obs.y, var)

    vech = lambda C: C[iu[0], iu[1]]  # noqa: E731
    theta_true = torch.cat([truth.mean, vech(truth.covariance)])
    theta_hat = torch.cat([gauss.mean, vech(gauss.covariance)])
    fisher = -torch.autograd.functional.hessian(total, theta_true)
    delta = theta_hat - theta_true
    stat = float(delta @ fisher @ delta)
    p = theta_true.numel()
    assert stat < chi2.ppf(0.999, p), (stat, chi2.ppf(0.999, p))
    # the fitted mean log-likelihood is the one em reports, and the MLE beats the truth
    assert ll[-1] == pytest.approx(float(total(theta_hat)) / N, abs=1e-9)
    assert ll[-1] >= float(total(theta_true)) / N
    # EM is monotone (exactly, up to rounding)
    assert all(b >= a - 1e-12 * abs(a) for a, b in zip(ll, ll[1:]))
    assert ll[-1] - ll[0] > 0.1


def test_lowrank_em_with_masks_is_monotone_and_beats_the_truth():
    """Rank-r factor EM through per-item random masks: monotone log-likelihood, the converged
    fit is at least as likely as the true (rank-r plus diagonal) parameters, and it agrees
    with the dense EM on the same data (same optimum family, D small)."""
    D, r, N = 24, 2, 3000
    g = torch.Generator().manual_seed(3)
    U = torch.randn(D, r, generator=g, dtype=f64)
    truth = GaussianDenoiser(torch.randn(D, generator=g, dtype=f64),
                             (U, 0.05 * torch.ones(D, dtype=f64)))
    x = truth.sample(N, generator=g)
    masks = torch.rand(N, D, generator=g) < 0.5
    obs = em.Observations.simulate(x, em.Masks(masks), 0.05, generator=g)
    gauss, ll = em.gaussian_em(obs, (D,), iterations=60, rank=r, progress=False)
    assert gauss.kind == "lowrank" and gauss.U.shape == (D, r)
    assert all(b >= a - 1e-12 * abs(a) for a, b in zip(ll, ll[1:]))
    ll_truth = float(em.gaussian_log_likelihood(truth, obs).mean())
    assert ll[-1] >= ll_truth
    assert float(em.gaussian_log_likelihood(gauss, obs).mean()) == pytest.approx(ll[-1],
                                                                                  abs=1e-9)
    # the low-rank and the dense log-likelihoods agree on the same Gaussian
    dense = GaussianDenoiser(gauss.mean, gauss.covariance)
    assert float(em.gaussian_log_likelihood(dense, obs).mean()) == pytest.approx(ll[-1],
                                                                                 abs=1e-8)
    # covariance error: relative Frobenius error of a few 1/sqrt(N * observed fraction)
    err = float((gauss.covariance - truth.covariance).norm() / truth.covariance.norm())
    assert err < 10 / math.sqrt(N * 0.5)


# -- vectorised MMPS ------------------------------------------------------------------------


def _operators(N: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(N, D, generator=g) < 0.6
    masks[:, 0] = True
    yield em.Masks(masks)
    yield projections(N, 3, D, seed)


@pytest.mark.parametrize("learned", [False, True])
def test_batched_mmps_equals_per_item_mmps(learned):
    """One vectorised MMPS call over items with different masks / matrices gives the same
    one-step posterior mean, and the same deterministic (DDIM) samples, as plausible.MMPS
    applied to each item alone (with a Gaussian prior and a converged solve, and with an
    untrained network prior and a capped GMRES solve)."""
    D, N = 6, 5
    if learned:
        torch.manual_seed(0)
        prior = plausible.Denoiser(plausible.nets.ResMLP(features=D, hidden=32, blocks=1),
                                   shape=(D,)).to(f64)
        options = {"maxiter": 3, "tol": 0.0}
    else:
        prior = random_gaussian(D, 4)
        options = {"maxiter": None, "tol": 1e-12}
    # BatchedMMPS has no curvature safeguard: compare with MMPS without it
    single = dict(options, **({"safeguard": False} if "safeguard" in inspect.signature(
        MMPS).parameters else {}))
    g = torch.Generator().manual_seed(5)
    for A in _operators(N, D, 6):
        x = torch.randn(N, D, generator=g, dtype=f64)
        obs = em.Observations.simulate(x, A, 0.1, generator=g)
        if isinstance(A, em.Masks):  # unobserved entries may hold anything, NaN included
            obs.y[~A.masks] = float("nan")
        post = em.BatchedMMPS(prior, obs, **options)
        x_t = torch.randn(N, D, generator=g, dtype=f64)
        t = torch.full((N,), 0.6, dtype=f64)
        batched = post(x_t, t)
        looped = torch.cat([MMPS(prior, obs.item(i), **single)(x_t[i:i + 1], t[i:i + 1])
                            for i in range(N)])
        assert torch.allclose(batched, looped, atol=1e-9, rtol=1e-9)
        x_1 = torch.randn(N, D, generator=g, dtype=f64)
        xs = sample(post, N, steps=8, sampler="ddim", x_1=x_1, dtype=f64, progress=False)
        xl = torch.cat([sample(MMPS(prior, obs.item(i), **single), 1, steps=8,
                               sampler="ddim", x_1=x_1[i:i + 1], dtype=f64, progress=False)
                        for i in range(N)])
        assert torch.allclose(xs, xl, atol=1e-8, rtol=1e-8)


def test_posterior_samples_pass_the_pc_options_to_the_sampler():
    """em's sampling options eta / corrections / tau / correct_above reach plausible.sample:
    posterior_samples equals sample() of the same BatchedMMPS with them, and differs
    without them."""
    D, N = 4, 6
    prior = random_gaussian(D, 7)
    g = torch.Generator().manual_seed(8)
    obs = em.Observations.simulate(prior.sample(N, generator=g), projections(N, 2, D, 9), 0.1,
                                   generator=g)
    pc = {"sampler": "pc", "eta": 1.0, "corrections": 2, "tau": 0.1, "correct_above": 0.3}
    x = em.posterior_samples(prior, obs, steps=8, maxiter=None, tol=1e-12, batch_size=N,
                             seed=3, dtype=f64, progress=False, **pc)
    post = em.BatchedMMPS(prior, obs, tol=1e-12, maxiter=None)
    ref = sample(post, N, steps=8, generator=torch.Generator().manual_seed(3 * 1_000_003),
                 dtype=f64, progress=False, **pc)
    torch.testing.assert_close(x, ref)
    assert 8 < post.stats["calls"] < 24  # the low-noise steps skip their 2 corrections
    plain = em.posterior_samples(prior, obs, steps=8, sampler="pc", maxiter=None, tol=1e-12,
                                 batch_size=N, seed=3, dtype=f64, progress=False)
    assert not torch.allclose(x, plain)


def test_posterior_samples_are_exact_under_a_gaussian_prior():
    """With the exact Gaussian denoiser and a converged solve, the MMPS samples of N
    problems with different projections follow their closed-form posteriors: whitened by
    each posterior, they are N(0, I) (mean and covariance within 5 MC floors). DDPM's own
    discretisation shrinks the variance by O(1 / steps) (measured: 30% at 64 steps, 8% at
    256), hence 256 steps."""
    D, M, N = 4, 2, 2000
    prior = random_gaussian(D, 7)
    g = torch.Generator().manual_seed(8)
    A = projections(N, M, D, 9)
    obs = em.Observations.simulate(prior.sample(N, generator=g), A, 0.1, generator=g)
    x = em.posterior_samples(prior, obs, steps=256, maxiter=None, tol=1e-10,
                             batch_size=1024, seed=3, dtype=f64, progress=False)
    assert x.shape == (N, D)
    # the same seed gives the same samples
    again = em.posterior_samples(prior, obs[:1024], steps=256, maxiter=None, tol=1e-10,
                                 batch_size=1024, seed=3, dtype=f64, progress=False)
    assert torch.equal(again, x[:1024])
    C, m = prior.covariance, prior.mean
    W = A.weight
    S = torch.einsum("bmd,de,bne->bmn", W, C, W) + 0.01 * torch.eye(M, dtype=f64)
    K = torch.linalg.solve(S, W @ C).transpose(1, 2)  # (N, D, M)
    mu = m + torch.einsum("bdm,bm->bd", K, obs.y - W @ m)
    P = C - K @ W @ C
    L = torch.linalg.cholesky((P + P.transpose(1, 2)) / 2)
    z = torch.linalg.solve_triangular(L, (x - mu)[..., None], upper=False)[..., 0]
    mean_err = float(z.mean(0).norm()) / math.sqrt(D / N)
    cov_err = float((torch.cov(z.T) - torch.eye(D, dtype=f64)).norm()) / math.sqrt(
        D * (D + 1) / N)
    assert mean_err < 5 and cov_err < 5, (mean_err, cov_err)


# -- laps ---------------------------------------------------------------------------------


def test_gaussian_family_laps_increase_the_log_likelihood():
    """Laps with a GaussianDenoiser prior (MMPS samples, closed-form refit) are Monte-Carlo
    EM: starting from a poor Gaussian (one EM iteration), the exact marginal log-likelihood
    increases lap after lap, within the Monte-Carlo error of refitting p = 14 parameters
    from N samples (p / N per observation), and approaches the exact EM optimum."""
    D, M, N = 4, 2, 2000
    truth = random_gaussian(D, 10)
    g = torch.Generator().manual_seed(11)
    obs = em.Observations.simulate(truth.sample(N, generator=g), projections(N, M, D, 12),
                                   0.1, generator=g)
    start, _ = em.gaussian_em(obs, (D,), iterations=1, progress=False)
    best, ll_best = em.gaussian_em(obs, (D,), iterations=300, progress=False)
    lls = []

    def metric(lap, prior, samples):
        value = float(em.gaussian_log_likelihood(prior, obs).mean())
        lls.append(value)
        return {"log_likelihood_exact": value}

    result = em.fit(start, obs, laps=6, gaussian=start,
                    sampling={"steps": 32, "maxiter": None, "tol": 1e-10, "batch_size": 1024},
                    metric=metric, progress=False)
    assert isinstance(result.prior, GaussianDenoiser)
    p = D + D * (D + 1) // 2
    tol = p / N  # twice the expected deficit p / (2N) of a refit from N samples
    assert all(b >= a - tol for a, b in zip(lls, lls[1:])), lls
    # measured: -3.117 -> -2.789 in 6 laps, the exact optimum is -2.776
    assert lls[-1] - lls[0] > 0.25
    assert ll_best[-1] - 0.05 < lls[-1] <= ll_best[-1] + tol  # nothing beats the MLE
    assert [r["lap"] for r in result.laps] == list(range(7))


def _manifold_run(out, laps=2, metric=None, resume=False, steps=30):
    problem = manifold_problem(256, seed=0)
    torch.manual_seed(0)
    prior = plausible.Denoiser(plausible.nets.ResMLP(features=5, hidden=32, blocks=1),
                               shape=(5,))
    result = em.fit(prior, problem.observations, laps=laps,
                    sampling={"steps": 8, "maxiter": 2, "batch_size": 128},
                    training={"steps": steps, "batch_size": 64, "checkpoint_every": 10},
                    out=out, resume=resume, metric=metric, progress=False)
    return prior, result


def test_resume_after_an_interrupted_lap_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Interrupt lap 2 in the middle of its training (the loss raises at step 15; the last
    checkpoint is at step 10), resume: the completed laps are not recomputed (no metric call,
    no sampling for them), lap 2 reuses its samples and continues its training from step
    10, and the final prior equals an uninterrupted run's bit for bit."""
    reference, ref_result = _manifold_run(tmp_path / "a")

    calls = []
    original = plausible.Preconditioned.loss
    state = {"n": 0, "armed": False}

    def metric(lap, prior, samples):
        calls.append(lap)
        if lap == 1:
            state["armed"] = True
        return {}

    def loss(self, *args, **kwargs):
        if state["armed"]:
            state["n"] += 1
            if state["n"] == 15:
                raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(plausible.Preconditioned, "loss", loss)
    with pytest.raises(KeyboardInterrupt):
        _manifold_run(tmp_path / "b", metric=metric)
    assert calls == [0, 1]
    lap2 = tmp_path / "b" / "lap-0002"
    assert (lap2 / "samples.safetensors").is_file()
    assert (lap2 / "training" / "step-00000010").is_dir()
    with pytest.raises(CheckpointError, match="resume"):
        _manifold_run(tmp_path / "b")

    sampled = []
    real = em.posterior_samples
    monkeypatch.setattr(em, "posterior_samples",
                        lambda *a, **k: sampled.append(1) or real(*a, **k))
    state["armed"] = False
    calls.clear()
    prior, result = _manifold_run(tmp_path / "b", metric=metric, resume=True)
    assert calls == [2] and sampled == []
    assert [r["lap"] for r in result.laps] == [0, 1, 2]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, prior.state_dict()[key]), key
    assert not (lap2 / "samples.safetensors").exists()  # deleted once the lap is complete
    # a finished run resumed with more laps continues; the model folders load
    prior3, result3 = _manifold_run(tmp_path / "b", laps=3, resume=True)
    assert [r["lap"] for r in result3.laps] == [0, 1, 2, 3]
    loaded = plausible.load(tmp_path / "b" / "lap-0003" / "model")
    for key, value in prior3.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert isinstance(plausible.load(tmp_path / "b" / "lap-0000" / "model"), GaussianDenoiser)


def test_resume_refuses_another_prior(tmp_path):
    _manifold_run(tmp_path, laps=1, steps=10)
    problem = manifold_problem(256, seed=0)
    other = plausible.Denoiser(plausible.nets.ResMLP(features=5, hidden=16, blocks=1),
                               shape=(5,))
    with pytest.raises(CheckpointError, match="another prior"):
        em.fit(other, problem.observations, laps=2, out=tmp_path, resume=True,
               progress=False)


# -- observations: files and bad input ------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".zarr"])
def test_observations_round_trip(tmp_path, suffix):
    g = torch.Generator().manual_seed(0)
    N = 7
    ops = [em.Masks(torch.rand(N, 3, 4, generator=g) < 0.5), projections(N, 2, 12, 1),
           em.FourierMasks(torch.rand(N, 4, 4, generator=g) < 0.5),
           em.Shared(plausible.ops.Mask(torch.rand(3, 4, generator=g) < 0.5), N)]
    shapes = [(3, 4), (12,), (4, 4), (3, 4)]
    for k, (A, shape) in enumerate(zip(ops, shapes)):
        x = torch.randn(N, *shape, generator=g, dtype=f64)
        noise = torch.rand(N, generator=g, dtype=f64) + 0.1
        obs = em.Observations.simulate(x, A, noise, generator=g)
        path = tmp_path / f"obs{k}{suffix}"
        obs.save(path)
        back = em.Observations.load(path)
        assert type(back.A) is type(A) and len(back) == N
        assert torch.equal(back.y, obs.y) and torch.equal(back.noise, obs.noise)
        z = torch.randn(N, *shape, dtype=f64)
        assert torch.equal(back.A(z), A(z))
        # item i is the plain operator of item i
        assert torch.allclose(obs.item(3).A(z[3:4]), A(z)[3:4])


def test_batched_operator_adjoints():
    """<A x, v> = <x, A^T v> item-wise for every batched operator (VJP adjoint)."""
    g = torch.Generator().manual_seed(1)
    N = 4
    cases = [(em.Masks(torch.rand(N, 5, generator=g) < 0.5), (5,)),
             (projections(N, 3, 5, 2), (5,)),
             (em.FourierMasks(torch.rand(N, 4, 6, generator=g) < 0.5), (4, 6))]
    for A, shape in cases:
        x = torch.randn(N, *shape, generator=g, dtype=f64)
        v = torch.randn(A(x).shape, generator=g, dtype=f64)
        lhs = (A(x) * v).flatten(1).sum(1)
        rhs = (x * A.adjoint(v, x)).flatten(1).sum(1)
        assert torch.allclose(lhs, rhs, atol=1e-12)
        dense = A.matrices(shape)
        assert torch.allclose(torch.einsum("bmd,bd->bm", dense, x.flatten(1)),
                              A(x).flatten(1), atol=1e-12)


def test_bad_input_is_reported():
    y = torch.randn(4, 2)
    A = projections(4, 2, 5, 0)
    with pytest.raises(ValueError, match="holds 4 operators for 3"):
        em.Observations(y[:3], A, 0.1)
    with pytest.raises(ValueError, match="noise must be"):
        em.Observations(y, A, torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        em.Observations(y, A, -1.0)
    with pytest.raises(TypeError, match="floating-point"):
        em.Observations(torch.ones(4, 2, dtype=torch.long), A, 0.1)
    obs = em.Observations(y.double(), A, 0.1)
    with pytest.raises(ValueError, match="expect states of 5 entries, got 6"):
        obs.validate((6,))
    masked = em.Observations(torch.zeros(4, 3, dtype=f64), em.Masks(torch.ones(4, 5)), 0.1)
    with pytest.raises(ValueError, match="expects states of shape"):
        masked.validate((3,))
    bad = em.Observations(torch.full((4, 2), float("nan"), dtype=f64), A, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        bad.validate((5,))
    with pytest.raises(ValueError, match="selection operators"):
        em.gaussian_em(obs, (5,), rank=2, progress=False)
    prior = random_gaussian(5, 0)
    with pytest.raises(ValueError, match="x_t must have 4 rows"):
        em.BatchedMMPS(prior, obs)(torch.zeros(3, 5, dtype=f64), 0.5)
    with pytest.raises(ValueError, match="unknown sampling option"):
        em.fit(prior, obs, laps=1, sampling={"stepz": 3}, progress=False)
    with pytest.raises(ValueError, match="set by em.fit"):
        em.fit(prior, obs, laps=1, training={"checkpoint": "x"}, progress=False)
    with pytest.raises(ValueError, match="expected a batch of 4"):
        A(torch.zeros(3, 5))


def test_accept_trains_on_the_accepted_samples_only():
    """With ``accept``, the M-step sees only the accepted posterior samples (here: the
    refitted Gaussian's mean is exactly the mean of the accepted ones), the metric still
    gets all of them, and the accepted fraction is logged; rejecting all is an error."""
    D, N = 3, 512
    prior = random_gaussian(D, 20)
    g = torch.Generator().manual_seed(21)
    obs = em.Observations.simulate(prior.sample(N, generator=g), projections(N, 2, D, 22),
                                   0.1, generator=g)
    seen = {}

    def metric(lap, current, samples):
        if samples is not None:
            seen["x"] = samples
        return {}

    result = em.fit(prior, obs, laps=1, gaussian=prior, accept=lambda x: x[:, 0] > 0,
                    sampling={"steps": 8, "maxiter": None, "batch_size": 512}, metric=metric,
                    progress=False)
    x = seen["x"]
    assert x.shape == (N, D)
    kept = x[x[:, 0] > 0]
    assert 0 < len(kept) < N
    assert result.laps[1]["accepted"] == pytest.approx(len(kept) / N)
    assert torch.allclose(result.prior.mean, kept.double().mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="rejected every posterior sample"):
        em.fit(prior, obs, laps=1, gaussian=prior, accept=lambda x: x[:, 0] > 1e9,
               sampling={"steps": 4, "batch_size": 512}, progress=False)
    with pytest.raises(ValueError, match="booleans of shape"):
        em.fit(prior, obs, laps=1, gaussian=prior, accept=lambda x: x[:, 0],
               sampling={"steps": 4, "batch_size": 512}, progress=False)


def test_safeguard_matches_mmps_and_is_inert_on_exact_priors():
    """With ``safeguard=True`` (truncated CG at negative curvature of the prior part), the
    vectorised solve equals plausible.MMPS(safeguard=True) per item on an untrained network
    prior (where the Tweedie covariance is not positive), and changes nothing with an exact
    Gaussian prior (whose Tweedie covariance is positive semi-definite)."""
    if "safeguard" not in inspect.signature(MMPS).parameters:
        pytest.skip("plausible.MMPS has no safeguard")
    D, N = 6, 5
    g = torch.Generator().manual_seed(30)
    torch.manual_seed(1)
    net = plausible.Denoiser(plausible.nets.ResMLP(features=D, hidden=32, blocks=1),
                             shape=(D,)).to(f64)
    for prior in (net, random_gaussian(D, 31)):
        A = projections(N, 3, D, 32)
        obs = em.Observations.simulate(torch.randn(N, D, generator=g, dtype=f64), A, 0.1,
                                       generator=g)
        x_t = torch.randn(N, D, generator=g, dtype=f64)
        t = torch.full((N,), 0.9, dtype=f64)
        options = {"maxiter": None, "tol": 1e-12, "solver": "cg"}
        step = em.BatchedMMPS(prior, obs, safeguard=True, **options).step(x_t, t)
        guarded = step.x_post
        # the untrained network truncates some rows (2 of 5 here), the exact prior none
        assert bool(step.solution.truncated.any()) == (prior is net)
        looped = torch.cat([MMPS(prior, obs.item(i), safeguard=True, **options)(
            x_t[i:i + 1], t[i:i + 1]) for i in range(N)])
        assert torch.allclose(guarded, looped, atol=1e-9, rtol=1e-9)
        if isinstance(prior, GaussianDenoiser):
            plain = em.BatchedMMPS(prior, obs, safeguard=False, **options)(x_t, t)
            assert torch.allclose(guarded, plain, atol=1e-12)
