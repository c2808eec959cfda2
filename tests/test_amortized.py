"""Amortized posteriors: bijection, densities by the probability-flow ODE, iid composition
(factorized / GAUSS) against closed-form posteriors, and a small trained NPE."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import plausible
from helpers import moment_errors
from plausible import GaussianDenoiser, sample
from plausible.amortized import (
    BoxDenoiser,
    ConditionalDenoiser,
    IIDPosterior,
    MLPEmbedding,
    ProductDenoiser,
    StackedDenoiser,
    flow_log_prob,
    logistic_prior_denoiser,
)
from plausible.checkpoints import load, save_model
from plausible.data import SimulatorStream
from plausible.nets import ResMLP

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _npe(D=2, dy=2, **kwargs) -> ConditionalDenoiser:
    torch.manual_seed(0)
    return ConditionalDenoiser.mlp(D, dy, hidden=32, blocks=1, context=16, **kwargs)


# ---------------------------------------------------------------------------------------------
# bijection


def test_bijection_round_trip_boundary_and_jacobian():
    low = torch.tensor([-1.0, 0.0, -math.inf, -math.inf])
    high = torch.tensor([1.0, math.inf, 2.0, math.inf])
    npe = ConditionalDenoiser(ResMLP(4, hidden=16, blocks=1, context=3), bounds=(low, high),
                              support="bijection")
    theta = torch.tensor([[0.3, 2.5, 1.0, -7.0], [-0.999, 1e-3, -3.0, 4.0]], dtype=F64)
    z = npe.encode(theta)
    assert torch.allclose(npe.decode(z), theta, rtol=1e-9, atol=1e-9)
    # exactly on the boundary (and beyond it): finite z, decoded back inside the support
    edge = torch.tensor([[-1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 2.0, 0.0], [1.5, -1.0, 3.0, 0.0]])
    z_edge = npe.encode(edge)
    assert torch.isfinite(z_edge).all()
    back = npe.decode(z_edge)
    assert (back[:, 0] >= -1).all() and (back[:, 0] <= 1).all() and (back[:, 1] >= 0).all()
    assert (back[:, 2] <= 2).all()
    assert torch.allclose(back[:2, 0], torch.tensor([-1.0, 1.0]), atol=1e-5)
    # huge latent values stay inside the support, without NaN, with a finite log-Jacobian
    z_far = torch.tensor([[1e4, 1e4, 1e4, 1e4], [-1e4, -1e4, -1e4, -1e4]])
    th = npe.decode(z_far)
    assert torch.isfinite(th[:, 0]).all() and th[:, 0].abs().max() <= 1
    assert torch.isfinite(npe.log_abs_det(torch.tensor([[30.0, 30.0, -30.0, 5.0]]))).all()
    # the log-Jacobian equals log|det| of the autograd Jacobian of decode
    for row in z:
        J = torch.func.jacrev(npe.decode)(row)
        assert torch.allclose(npe.log_abs_det(row), torch.logdet(J.abs()), atol=1e-9)


def test_prior_spec_from_task_priors_and_distributions():
    from plausible.amortized import prior_spec
    from plausible.tasks.sbi import get_task

    assert prior_spec(get_task("two_moons").prior)["kind"] == "box"
    assert prior_spec(get_task("gaussian_linear").prior)["kind"] == "gaussian"
    assert prior_spec(get_task("sir").prior)["kind"] == "lognormal"
    box = torch.distributions.Independent(
        torch.distributions.Uniform(-torch.ones(3), torch.ones(3)), 1)
    assert prior_spec(box) == {"kind": "box", "low": [-1.0] * 3, "high": [1.0] * 3}
    with pytest.raises(TypeError, match="cannot describe"):
        prior_spec(object())


# ---------------------------------------------------------------------------------------------
# densities


@pytest.fixture(scope="module")
def gaussian3():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=F64)
    C = A @ A.T / 3 + 0.3 * torch.eye(3, dtype=F64)
    m = 0.5 * torch.randn(3, generator=g, dtype=F64)
    return GaussianDenoiser(m, C), g


def test_flow_log_prob_exact_divergence_matches_gaussian(gaussian3):
    den, g = gaussian3
    x = den.sample(64, generator=g)
    err = flow_log_prob(den, x, steps=64) - den.log_prob(x)
    # Heun error O(h^2) plus the terminal approximation O(alpha_1): measured ~4e-3
    assert err.abs().max() < 0.02, err.abs().max()


def test_flow_log_prob_hutchinson_unbiased(gaussian3):
    den, g = gaussian3
    x = den.sample(256, generator=g)
    err = flow_log_prob(den, x, steps=32, exact=False, probes=2, seed=1) - den.log_prob(x)
    # unbiased: the mean error is within 4 standard errors of the O(h^2) bias of 32 steps
    assert abs(float(err.mean())) < 4 * float(err.std()) / math.sqrt(len(err)) + 0.03
    assert float(err.std()) < 1.0


def test_posterior_log_prob_carries_the_jacobian(gaussian3):
    """theta = decode(z) with z ~ N(m, C): log p(theta) = log N(z) - log|det dtheta/dz|."""
    den, g = gaussian3
    z = den.sample(48, generator=g)
    for support in ("bijection", "reject"):
        npe = ConditionalDenoiser(ResMLP(3, hidden=8, blocks=1, context=2),
                                  bounds=(torch.tensor([-1.0, 0.0, -2.0]),
                                          torch.tensor([1.0, math.inf, 3.0])), support=support)
        post = IIDPosterior(StackedDenoiser([den]), den, method="factorized", model=npe)
        theta = npe.decode(z)
        exact = den.log_prob(z) - npe.log_abs_det(z)
        got = post.log_prob(theta, steps=64)
        inside = npe.inside(theta)
        if support == "reject":  # the box coordinates are theta's own; outside the box: -inf
            assert torch.allclose(theta[:, 0], z[:, 0]) and 0 < int(inside.sum()) < 48
            assert (got[~inside] == -math.inf).all()
        else:
            assert inside.all()
        assert (got[inside] - exact[inside]).abs().max() < 0.02


# ---------------------------------------------------------------------------------------------
# iid composition with exact per-observation posteriors


def _linear_problem(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    D = 3
    A = torch.randn(D, D, generator=g, dtype=F64)
    C0 = A @ A.T / D + 0.2 * torch.eye(D, dtype=F64)
    m0 = 0.3 * torch.randn(D, generator=g, dtype=F64)
    prior = GaussianDenoiser(m0, C0)
    noise = torch.tensor([0.5, 0.3, 0.8], dtype=F64) ** 2
    theta = prior.sample(1, generator=g)[0]
    ys = theta + noise.sqrt() * torch.randn(n, D, generator=g, dtype=F64)
    eye = torch.eye(D, dtype=F64)
    posts = [prior.condition(eye, y, noise) for y in ys]
    tall = prior.condition(eye.repeat(n, 1), ys.reshape(-1), noise.repeat(n))
    return prior, posts, tall


@pytest.mark.parametrize("n", [1, 10, 100])
def test_gauss_composition_is_exact_for_gaussians(n):
    prior, posts, tall = _linear_problem(n)
    covs = torch.stack([p.covariance for p in posts])
    post = IIDPosterior(StackedDenoiser(posts), prior, method="gauss", covariances=covs)
    x = sample(post, 2000, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
               seed=3, progress=False)
    e_mean, e_cov = moment_errors(x, tall.mean, tall.covariance)
    assert e_mean < 3.0 and e_cov < 3.0, (n, e_mean, e_cov)


def test_factorized_composition_exact_at_n1_and_at_t0():
    prior, posts, tall = _linear_problem(1)
    post = IIDPosterior(StackedDenoiser(posts), prior, method="factorized")
    x = sample(post, 2000, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
               seed=4, progress=False)
    e_mean, e_cov = moment_errors(x, tall.mean, tall.covariance)
    assert e_mean < 3.0 and e_cov < 3.0
    # n = 10: the factorized score is the tall score at t = 0 ...
    prior, posts, tall = _linear_problem(10)
    post = IIDPosterior(StackedDenoiser(posts), prior, method="factorized")
    z = tall.sample(64, generator=torch.Generator().manual_seed(5))
    ref0 = tall.score(z, 0.0)
    assert (post.score(z, 0.0) - ref0).norm() < 1e-3 * ref0.norm()  # sigma_0 = 1e-3, not 0
    # ... but not at t > 0, where GAUSS stays exact
    covs = torch.stack([p.covariance for p in posts])
    gauss = IIDPosterior(StackedDenoiser(posts), prior, method="gauss", covariances=covs)
    t = torch.tensor(0.5, dtype=F64)
    ref = tall.score(z, t)
    assert torch.allclose(gauss.score(z, t), ref, rtol=1e-8, atol=1e-8)
    assert (post.score(z, t) - ref).norm() > 0.1 * ref.norm()


def test_langevin_refinement_samples_the_tall_gaussian_posterior():
    """refine=300 in IIDPosterior.sample keeps GAUSS exact (n = 10 Gaussians), and started
    from GAUSS's samples it makes the factorized score, wrong at t > 0 (18 and 23 Monte-Carlo
    errors off without refinement), sample the exact tall posterior: its score is exact at
    t -> 0. Tolerance: 3 Monte-Carlo errors (the step's bias, 1 % in the variance, is a third
    of one here)."""
    prior, posts, tall = _linear_problem(10)
    covs = torch.stack([p.covariance for p in posts])
    gauss = IIDPosterior(StackedDenoiser(posts), prior, method="gauss", covariances=covs)
    x = gauss.sample(2000, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
                     seed=3, refine=300)
    e_mean, e_cov = moment_errors(x, tall.mean, tall.covariance)
    assert e_mean < 3.0 and e_cov < 3.0, (e_mean, e_cov)
    fact = IIDPosterior(StackedDenoiser(posts), prior, method="factorized")
    unrefined = fact.sample(2000, steps=32, sampler="dpm++", order=2, grid="logsnr",
                            dtype=F64, seed=3)
    assert max(moment_errors(unrefined, tall.mean, tall.covariance)) > 10
    z = sample(gauss, 2000, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
               seed=4, progress=False)
    x = plausible.langevin(fact, z, steps=300, seed=5)
    e_mean, e_cov = moment_errors(x, tall.mean, tall.covariance)
    assert e_mean < 3.0 and e_cov < 3.0, (e_mean, e_cov)


def test_gauss_composition_survives_indefinite_precisions():
    """Covariances too large for n observations (P indefinite) give no NaN: P is clamped."""
    prior, posts, _ = _linear_problem(20)
    covs = torch.stack([4 * prior.covariance for _ in posts])
    post = IIDPosterior(StackedDenoiser(posts), prior, method="gauss", covariances=covs)
    # here P = 20 C^-1 / 4 - 19 C^-1 < 0 in every direction: all of them are clamped, where the
    # composition falls back to the prior, so the samples are the prior's (known answer)
    assert post.clamped == prior.shape[0]
    N = 4000
    x = sample(post, N, steps=32, sampler="dpm++", grid="logsnr", dtype=F64, seed=0,
               progress=False)
    assert torch.isfinite(x).all()
    std = prior.covariance.diagonal().sqrt()
    z_mean = (x.mean(0) - prior.mean.flatten()) / std
    assert z_mean.abs().max() < 4 / math.sqrt(N), z_mean
    err_var = x.var(0) / std**2 - 1
    assert err_var.abs().max() < 0.02 + 4 * math.sqrt(2 / N), err_var


def test_logistic_prior_denoiser_is_exact():
    """Small noise: Tweedie with the logistic score; large noise: a brute-force quadrature."""
    den = logistic_prior_denoiser(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]))
    z = torch.tensor([[0.3, -4.0], [8.0, 20.0], [-30.0, 0.0]], dtype=F64)
    t0 = torch.tensor(0.0, dtype=F64)
    alpha, sigma = den.schedule(t0)
    w = (z / alpha - den.loc) / den.scale
    rho = sigma / alpha
    tweedie = z / alpha + rho**2 * (-torch.tanh(w / 2) / den.scale)
    assert torch.allclose(den(z, t0), tweedie, rtol=1e-6, atol=1e-9)
    for t in (0.3, 0.7, 1.0):
        tt = torch.tensor(t, dtype=F64)
        a, s = den.schedule(tt)
        grid = torch.linspace(-400, 400, 400_001, dtype=F64)
        zz = den.loc[:, None] + den.scale[:, None] * grid  # (2, K)
        logw = -grid.abs() - 2 * torch.log1p(torch.exp(-grid.abs()))
        for row in z:
            lk = logw - 0.5 * ((row[:, None] - a * zz) / s) ** 2
            ref = (torch.softmax(lk, -1) * zz).sum(-1)
            assert torch.allclose(den(row[None], tt)[0], ref, rtol=1e-6, atol=1e-6), t


def _truncated_problem(n: int, ybar, seed: int = 0):
    """Box [-1, 1]^2 prior, y_j ~ N(theta, 0.1 I) with noise drawn then shifted so that the
    mean of the observations is ``ybar`` (so that the truncation matters for every n);
    sampling space z = logit((theta + 1) / 2)."""
    g = torch.Generator().manual_seed(seed)
    var = 0.1
    noise = math.sqrt(var) * torch.randn(n, 2, generator=g, dtype=F64)
    ys = torch.tensor(ybar, dtype=F64) + noise - noise.mean(0)

    def psi(z: Tensor) -> Tensor:  # (..., n, 2): log p(z | y_j) up to a constant
        th = 2 * torch.sigmoid(z) - 1
        return -0.5 * (th - ys) ** 2 / var + torch.nn.functional.logsigmoid(z) \
            + torch.nn.functional.logsigmoid(-z)

    posts = ProductDenoiser(psi, torch.zeros(2), torch.ones(2), grid=(-20.0, 20.0, 4001),
                            batch_shape=(n,))
    prior = logistic_prior_denoiser(torch.zeros(2), torch.ones(2))
    mean, var_z = posts.moments()
    covs = torch.diag_embed(var_z)
    # exact tall posterior: N(mean(y), var / n) truncated to [-1, 1], per dimension
    ybar, sd = ys.mean(0), math.sqrt(var / n)
    a, b = (-1 - ybar) / sd, (1 - ybar) / sd
    t_mean = torch.tensor(stats.truncnorm.mean(a, b, loc=ybar, scale=sd))
    t_std = torch.tensor(stats.truncnorm.std(a, b, loc=ybar, scale=sd))
    naive_mean = ybar
    return posts, prior, covs, t_mean, t_std, naive_mean, sd


Tensor = torch.Tensor


@pytest.mark.parametrize("n", [
    1,
    pytest.param(10, marks=pytest.mark.slow),
    # measured: the mean of the coordinate at the boundary is 1.7 posterior std off (the other
    # coordinate 0.14): the tall posterior in the logit space is far from Gaussian there
    pytest.param(100, marks=[pytest.mark.slow, pytest.mark.xfail(
        strict=True, reason="GAUSS in the logit space fails at n = 100 next to the boundary")]),
])
def test_gauss_composition_uniform_prior_truncated_gaussian(n):
    """Without refinement: exact at n = 1, approximate at n = 10, wrong at n = 100 (kept as a
    strict xfail: the failure the Langevin refinement below removes)."""
    # mean of the observations 0.98: 0.06 / 0.2 / 0.63 posterior std from the boundary 1
    posts, prior, covs, t_mean, t_std, naive_mean, sd = _truncated_problem(n, [0.98, -0.3])
    post = IIDPosterior(posts, prior, method="gauss", covariances=covs,
                        prior_covariance=torch.eye(2, dtype=F64) * math.pi**2 / 3)
    N = 1000
    z = sample(post, N, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
               seed=6, progress=False)
    theta = 2 * torch.sigmoid(z) - 1
    assert torch.isfinite(theta).all() and theta.abs().max() <= 1
    # n = 1 is exact (GAUSS reduces to the per-observation posterior): Monte-Carlo error only.
    # n > 1: GAUSS is approximate here (the per-observation posteriors are not Gaussian in the
    # logit space); measured at n = 10: mean error <= 0.07 posterior std, std 17% too small
    # (the factorized score collapses to a std of 0.004 instead of 0.09). The truncation moves
    # the first coordinate's mean by more than the tolerance (the untruncated answer fails).
    err_mean = ((theta.mean(0) - t_mean) / t_std).abs()
    err_std = (theta.std(0) / t_std - 1).abs()
    tol_mean, tol_std = (0.0, 0.0) if n == 1 else (0.15, 0.25)
    assert err_mean.max() < tol_mean + 4 / math.sqrt(N), (n, err_mean)
    assert err_std.max() < tol_std + 4 / math.sqrt(2 * N), (n, err_std)
    assert ((naive_mean[0] - t_mean[0]) / t_std[0]).abs() > tol_mean + 4 / math.sqrt(N)


@pytest.mark.slow
@pytest.mark.parametrize("n,method", [(10, "gauss"), (100, "gauss"), (100, "factorized")])
def test_langevin_refinement_makes_the_composition_exact(n, method):
    """The composed score is exact as the noise vanishes, so 300 Langevin steps at a small
    noise level (``refine``) remove the composition's error next to the box's face: the mean
    and std of theta against the exact truncated-Gaussian tall posterior within 4 Monte-Carlo
    standard errors plus the Langevin step's own bias (h = 0.02: at most 1 % in the std), where
    GAUSS alone is 1.7 std off at n = 100 and the factorized score alone collapses."""
    posts, prior, covs, t_mean, t_std, naive_mean, sd = _truncated_problem(n, [0.98, -0.3])
    post = IIDPosterior(posts, prior, method=method, covariances=covs,
                        prior_covariance=torch.eye(2, dtype=F64) * math.pi**2 / 3)
    N = 500
    # the factorized score alone collapses the samples: start it from the GAUSS samples' law
    start = post if method == "gauss" else IIDPosterior(
        posts, prior, method="gauss", covariances=covs,
        prior_covariance=torch.eye(2, dtype=F64) * math.pi**2 / 3)
    z = sample(start, N, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
               seed=6, progress=False)
    z = plausible.langevin(post, z, steps=300, step=0.02, seed=7)
    theta = 2 * torch.sigmoid(z) - 1
    assert torch.isfinite(theta).all() and theta.abs().max() <= 1
    err_mean = ((theta.mean(0) - t_mean) / t_std).abs()
    err_std = (theta.std(0) / t_std - 1).abs()
    assert err_mean.max() < 4 / math.sqrt(N), (n, err_mean)
    assert err_std.max() < 0.01 + 4 / math.sqrt(2 * N), (n, err_std)


def test_factorized_composition_uniform_prior_n1_exact():
    posts, prior, covs, t_mean, t_std, _, _ = _truncated_problem(1, [0.98, -0.3])
    post = IIDPosterior(posts, prior, method="factorized")
    z = sample(post, 2000, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
               seed=7, progress=False)
    theta = 2 * torch.sigmoid(z) - 1
    assert (((theta.mean(0) - t_mean) / t_std).abs() < 4 / math.sqrt(2000)).all()
    assert ((theta.std(0) / t_std - 1).abs() < 4 / math.sqrt(2 * 2000)).all()


# ---------------------------------------------------------------------------------------------
# the conditional denoiser


def test_validation_errors():
    with pytest.raises(ValueError, match="context"):
        ConditionalDenoiser(ResMLP(2, hidden=8, blocks=1))
    with pytest.raises(ValueError, match="y_shape"):
        ConditionalDenoiser(ResMLP(2, hidden=8, blocks=1, context=4), embed=torch.nn.Flatten())
    npe = _npe()
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        npe.given(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        npe.given(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="y must have shape"):
        npe.loss(torch.zeros(4, 2), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="method"):
        IIDPosterior(StackedDenoiser([GaussianDenoiser(torch.zeros(2), 1.0)]),
                     GaussianDenoiser(torch.zeros(2), 1.0), method="sum")


def test_standardisation_from_first_batch_of_a_stream_and_batched_given():
    """fit on a SimulatorStream fits the standardisation; the logit of a uniform is logistic
    (mean 0, std pi / sqrt(3)); without the logit (support="reject") it stays uniform (std
    2 / sqrt(12))."""
    low, high = -torch.ones(2), torch.ones(2)

    def prior(n, g):
        return low + (high - low) * torch.rand(n, 2, generator=g)

    def simulator(theta, g):
        return theta + 0.1 * torch.randn(theta.shape, generator=g)

    for support, sd in (("reject", 2 / math.sqrt(12)), ("bijection", math.pi / math.sqrt(3))):
        npe = _npe(bounds=(low, high), support=support)
        plausible.fit(npe, SimulatorStream(prior, simulator, batched=True), steps=20,
                      batch_size=512, progress=False, ema=0.9)
        assert npe.is_fitted
        assert (npe.z_loc.abs() < 4 * sd / math.sqrt(512)).all()
        assert ((npe.z_scale / sd - 1).abs() < 0.15).all()
    # M observations in one call equal M separate calls
    ys = torch.randn(3, 2)
    post = npe.given(ys)
    z = torch.randn(5, 3, 2)
    t = torch.tensor(0.4)
    together = post(z, t)
    for m in range(3):
        assert torch.allclose(together[:, m], npe.given(ys[m])(z[:, m], t), atol=1e-6)
    theta = post.sample(7, steps=4)
    assert theta.shape == (7, 3, 2) and theta.abs().max() <= 1
    lp = post.log_prob(theta[:2], steps=4)
    assert lp.shape == (2, 3) and torch.isfinite(lp).all()


@pytest.mark.parametrize("baseline", [False, True])
def test_checkpoint_round_trip(tmp_path, baseline):
    from plausible.tasks.sbi import get_task

    task = get_task("two_moons")
    npe = _npe(prior=task.prior, p_uncond=0.1, baseline=baseline)
    g = torch.Generator().manual_seed(0)
    theta = task.prior.sample(300, g)
    npe.standardize_from(theta, task.simulator(theta, g))
    with torch.no_grad():
        npe.null.normal_()
    save_model(npe, tmp_path / "npe")
    text = (tmp_path / "npe" / "model.json").read_text()
    assert "MLPEmbedding" in text and "box" in text
    back = load(tmp_path / "npe")
    assert isinstance(back, ConditionalDenoiser) and back.prior == npe.prior
    z, t, y = torch.randn(6, 2), torch.rand(6), torch.randn(6, 2)
    assert torch.equal(back(z, t, y), npe(z, t, y))
    assert torch.equal(back.prior_denoiser("learned")(z, t), npe.prior_denoiser("learned")(z, t))
    assert torch.equal(back.encode(theta), npe.encode(theta))
    assert isinstance(back.embed, MLPEmbedding)
    assert back.baseline == baseline
    if baseline:
        assert torch.equal(back.b_weight, npe.b_weight) and back.b_weight.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# the linear-Gaussian baseline


def _diagonal_linear_gaussian(N, g):
    """theta ~ N(m, diag(v)), y = theta + N(0, diag(n)): the posterior is diagonal, with
    variance 1 / (1/v + 1/n) and mean var (m / v + y / n)."""
    m, v, n = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([1.0, 4.0], dtype=F64), \
        torch.tensor([0.25, 0.04], dtype=F64)
    theta = m + v.sqrt() * torch.randn(N, 2, generator=g, dtype=F64)
    y = theta + n.sqrt() * torch.randn(N, 2, generator=g, dtype=F64)
    return m, v, n, theta, y


def test_baseline_is_the_exact_posterior_denoiser_of_a_linear_gaussian_model():
    """With the network's output zeroed, a ``baseline=True`` model is the Gaussian denoiser of
    N(W y + b, diag(s)^2): for a diagonal linear-Gaussian model, the exact posterior's. The
    fitted W, b, s come from N = 10^5 pairs, so they carry regression errors of about
    s / sqrt(N) ~ 0.002 (per unit of standardised y); the tolerance, 0.015 in z units at
    |y| up to 3 prior std, is 5 such errors."""
    g = torch.Generator().manual_seed(0)
    m, v, n, theta, y = _diagonal_linear_gaussian(100_000, g)
    npe = _npe(prior={"kind": "gaussian", "mean": m.tolist(), "cov": torch.diag(v).tolist()},
               baseline=True)
    npe.standardize_from(theta.float(), y.float())
    with torch.no_grad():
        for p in npe.backbone.parameters():
            p.zero_()
    var = 1 / (1 / v + 1 / n)
    loc, scale = npe.z_loc.double(), npe.z_scale.double()
    assert ((npe.b_scale.double() - var.sqrt() / scale).abs() < 0.01 * var.sqrt() / scale).all()
    ys = m + v.sqrt() * torch.tensor([[0.0, 0.0], [2.5, -1.0], [-3.0, 3.0]], dtype=F64)
    for yo in ys:
        mean_z = (var * (m / v + yo / n) - loc) / scale
        exact = GaussianDenoiser(mean_z, torch.diag(var / scale**2), npe.schedule)
        post = npe.given(yo.float())
        for t in (0.05, 0.3, 0.7, 0.95):
            x_t = exact.schedule(torch.tensor(t))[0] * mean_z + torch.randn(64, 2, generator=g,
                                                                             dtype=F64)
            err = (post(x_t.float(), t).double() - exact(x_t, t)).abs().max()
            assert err < 0.015, (yo, t, err)


def test_baseline_loss_weights_each_entry_by_its_own_scale():
    """The EDM weight (rho^2 + s_i^2) / (rho s_i)^2 is applied entry by entry, so the network's
    target has unit variance per entry; loc / scale follow keep (null rows: 0 and 1)."""
    g = torch.Generator().manual_seed(1)
    _, _, _, theta, y = _diagonal_linear_gaussian(4000, g)
    npe = _npe(p_uncond=0.5, baseline=True).double()
    npe.standardize_from(theta, y)
    z = npe.encode(theta[:8])
    t, eps = torch.rand(8, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
    keep = torch.tensor([True, False] * 4)
    cond = npe.condition(y[:8], keep)
    assert torch.equal(cond["loc"][~keep], torch.zeros(4, 2))
    assert torch.equal(cond["scale"][~keep], torch.ones(4, 2))
    assert torch.allclose(cond["scale"][keep], npe.b_scale.expand(4, 2))
    loss = plausible.Preconditioned.loss(npe, z, t, eps, **cond)
    alpha, sigma = npe.schedule(t)
    x_t = alpha[:, None] * z + sigma[:, None] * eps
    rho, s = (sigma / alpha)[:, None], cond["scale"]
    d = npe(x_t, t, **cond)
    manual = ((d - z) ** 2 * (rho**2 + s**2) / (rho * s) ** 2).mean()
    assert torch.allclose(loss, manual)
    # with the baseline, a precomputed context alone is refused (it would drop the baseline)
    with pytest.raises(ValueError, match="loc= and scale="):
        npe(x_t, t, context=cond["context"])
    # "auto": on where r is the identity (and y small enough), off under a bijection
    assert _npe(prior={"kind": "gaussian", "mean": [0.0, 0.0], "cov": torch.eye(2).tolist()}
                ).baseline
    assert _npe().baseline
    box = {"kind": "box", "low": [0.0, 0.0], "high": [1.0, 1.0]}
    assert _npe(prior=box, support="reject").baseline  # the box is sampled without the logit
    assert not _npe(prior=box, support="bijection").baseline
    assert not _npe(prior=box).baseline  # support="auto": decided with the data
    assert not _npe(bounds=([0.0, 0.0], [1.0, math.inf])).baseline  # a log coordinate
    assert not _npe(prior={"kind": "lognormal", "loc": [0.0, 0.0], "scale": [1.0, 1.0]}
                    ).baseline
    assert not _npe(D=2, dy=5000).baseline
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        _npe(baseline="yes")
    with pytest.raises(ValueError, match="at most 4096"):
        _npe(D=2, dy=5000, baseline=True)


def test_prior_denoisers_in_the_sampling_space():
    """Gaussian prior: exact Gaussian in z; box prior: logistic through the logit, uniform
    without it (support="reject"); either way its samples decode uniform."""
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[0.5, 0.2], [0.2, 0.3]])
    npe = _npe(prior={"kind": "gaussian", "mean": mean.tolist(), "cov": cov.tolist()})
    g = torch.Generator().manual_seed(0)
    theta = torch.distributions.MultivariateNormal(mean, cov).sample((1000,))
    npe.standardize_from(theta, theta + torch.randn(1000, 2, generator=g))
    zp = sample(npe.prior_denoiser(), 2000, steps=16, sampler="dpm++", grid="logsnr",
                dtype=F64, seed=1, progress=False)
    e_mean, e_cov = moment_errors(npe.decode(zp), mean.double(), cov.double())
    assert e_mean < 3 and e_cov < 3
    th = 4 * torch.rand(1000, 2, generator=g) - 1
    for support, kind in (("bijection", ProductDenoiser), ("reject", BoxDenoiser)):
        box = _npe(prior={"kind": "box", "low": [-1.0, -1.0], "high": [3.0, 3.0]},
                   support=support)
        box.standardize_from(th, th)
        prior = box.prior_denoiser()
        assert isinstance(prior, kind)
        zb = sample(prior, 4000, steps=32, sampler="dpm++", grid="logsnr", dtype=F64, seed=2,
                    progress=False)
        u = ((box.decode(zb) + 1) / 4).numpy()
        for k in range(2):  # Kolmogorov-Smirnov against U(0, 1)
            assert stats.kstest(u[:, k], "uniform").pvalue > 1e-3
        # the covariance given to GAUSS is the exact one of the prior in z
        cov_z = torch.cov(zb.T)
        assert torch.allclose(cov_z, box.prior_covariance(), rtol=0.1, atol=0.05)


def test_trained_npe_recovers_gaussian_linear_posterior():
    """Small budget (3000 pairs, 1500 steps): learned posterior mean and covariance against
    the closed form, for observations inside and at the edge of the prior mass."""
    D = 2
    prior_var, noise_var = 1.0, 0.25
    g = torch.Generator().manual_seed(0)
    theta = math.sqrt(prior_var) * torch.randn(3000, D, generator=g)
    y = theta + math.sqrt(noise_var) * torch.randn(3000, D, generator=g)
    npe = ConditionalDenoiser.mlp(D, D, hidden=64, blocks=2, context=32,
                                  prior={"kind": "gaussian", "mean": [0.0] * D,
                                         "cov": (prior_var * torch.eye(D)).tolist()})
    torch.manual_seed(0)
    plausible.fit(npe, (theta, y), steps=1500, batch_size=256, lr=2e-3, progress=False)
    post_var = 1 / (1 / prior_var + 1 / noise_var)
    ys = torch.tensor([[0.3, -0.5], [1.5, 1.0], [-2.0, 0.5]])
    x = npe.given(ys).sample(2000, steps=32, sampler="dpm++", grid="logsnr", seed=0)
    for m in range(3):
        mean = post_var * ys[m] / noise_var
        err_mean = ((x[:, m].mean(0) - mean) / math.sqrt(post_var)).abs().max()
        std_ratio = x[:, m].std(0) / math.sqrt(post_var)
        # loose but meaningful: 0.25 posterior std, std within 20% (the prior's std is
        # 2.2x the posterior's, so ignoring y or over-dispersing fails)
        assert err_mean < 0.25, (m, err_mean)
        assert ((std_ratio - 1).abs() < 0.2).all(), (m, std_ratio)
    # several observations of one theta: GAUSS with the exact Gaussian prior score
    y5 = torch.tensor([0.8, -0.4]) + 0.5 * torch.randn(5, D, generator=g)
    xs = npe.given_iid(y5, method="gauss").sample(2000, steps=32, sampler="dpm++",
                                                   grid="logsnr", seed=1)
    tall_var = 1 / (1 / prior_var + 5 / noise_var)
    tall_mean = tall_var * y5.sum(0) / noise_var
    assert ((xs.mean(0) - tall_mean) / math.sqrt(tall_var)).abs().max() < 0.4
    assert ((xs.std(0) / math.sqrt(tall_var) - 1).abs() < 0.3).all()


def test_plausible_sample_returns_theta_for_a_bounded_posterior():
    """DESIGN's contract: ``plausible.sample(npe.given(y), n)`` gives theta, inside a box
    prior's support, equal to ``npe.given(y).sample(n)`` with the same seed."""
    import plausible

    prior = plausible.tasks.sbi.UniformPrior(torch.zeros(2), torch.ones(2))
    npe = plausible.ConditionalDenoiser.mlp(2, 2, prior=prior)
    post = npe.given(torch.tensor([0.3, 0.7]))
    theta = plausible.sample(post, 256, steps=8, seed=3, progress=False)
    assert bool(((theta > 0) & (theta < 1)).all())
    torch.testing.assert_close(theta, post.sample(256, steps=8, seed=3))


def test_training_steps_bound():
    """The default step bound grows with the budget (early stopping decides below it)."""
    from plausible.amortized import training_steps

    assert training_steps(500) == training_steps(1000) == 2000
    assert training_steps(10_000) == 20_000
    assert training_steps(100_000) == 38_000
    with pytest.raises(ValueError, match="positive integer"):
        training_steps(0)


def test_network_width_by_budget():
    """The default width halves below SMALL_BUDGET simulations; bad budgets are refused."""
    from plausible.amortized import SMALL_BUDGET, network_width

    assert network_width(1000) == network_width(SMALL_BUDGET - 1) == 64
    assert network_width(SMALL_BUDGET) == network_width(100_000) == 128
    net = plausible.ConditionalDenoiser.mlp(2, 2, hidden=network_width(1000)).backbone
    assert net.config["hidden"] == 64
    for bad in (0, -5, 10.0, "1000"):
        with pytest.raises(ValueError, match="positive integer"):
            network_width(bad)  # type: ignore[arg-type]


def test_training_noise_levels_are_lognormal_with_the_set_moments():
    """draw_noise's times map back to log(sigma / alpha) ~ N(mean, std^2): the default
    LOG_RHO for a ConditionalDenoiser, EDM's (-1.2, 1.2) for Preconditioned, or log_rho=;
    mean within 4 standard errors (std / sqrt(N)), std within 4 of its own (std / sqrt(2N)),
    the schedule's range [1e-3, 1e3] clips the 0.1 % below 3 std, which moves the moments by
    far less."""
    from plausible.amortized import LOG_RHO
    from plausible.denoisers import Preconditioned

    N = 200_000
    npe = _npe()
    x = torch.zeros(N, 2)
    for draw, (mu, sd) in [
        (lambda g: npe.draw_noise(x, g), LOG_RHO),
        (lambda g: Preconditioned.draw_noise(npe, x, g, "lognormal"), (-1.2, 1.2)),
        (lambda g: npe.draw_noise(x, g, log_rho=(-3.0, 0.5)), (-3.0, 0.5)),
    ]:
        t = draw(torch.Generator().manual_seed(0))["t"].double()
        assert ((t > 0) & (t < 1)).float().mean() > 0.995
        log_rho = torch.log(npe.schedule.ratio(t))
        assert abs(float(log_rho.mean()) - mu) < 4 * sd / math.sqrt(N)
        assert abs(float(log_rho.std()) - sd) < 4 * sd / math.sqrt(2 * N)
    with pytest.raises(ValueError, match="std > 0"):
        npe.draw_noise(x[:4], None, log_rho=(-1.0, 0.0))


# ---------------------------------------------------------------------------------------------
# box priors by rejection (support="reject")


def test_box_denoiser_is_the_truncated_normal_mean():
    """BoxDenoiser against scipy's truncated-normal mean (E[x | x_t] for x ~ U(a, b) is the
    mean of N(x_t / alpha, rho^2) truncated to [a, b]), inside, near and far outside the box,
    at low and high noise; and the asymptote E ~ b - rho^2 / (m - b) far beyond b (where the
    direct formula is 0 / 0)."""
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 0.5])
    den = BoxDenoiser(low, high)
    x_t = torch.tensor([[0.3, 0.2], [2.5, -0.4], [-4.0, 3.0], [1.99, 0.01]], dtype=F64)
    for t in (0.02, 0.2, 0.5, 0.8, 0.98):
        tt = torch.full((4,), t, dtype=F64)
        alpha, sigma = den.schedule(tt)
        m, rho = (x_t / alpha[:, None]).numpy(), (sigma / alpha)[:, None].numpy()
        ref = stats.truncnorm.mean((low.numpy() - m) / rho, (high.numpy() - m) / rho, loc=m,
                                   scale=rho)
        assert torch.allclose(den(x_t, tt), torch.tensor(ref), rtol=0, atol=1e-9), t
    assert torch.allclose(den.covariance, torch.diag(torch.tensor([9.0, 0.25], dtype=F64) / 12))
    # far outside at tiny noise: m - b = 1000, rho = 1e-3 sigma... (30000 standard deviations)
    t = torch.tensor([1e-4], dtype=F64)
    alpha, sigma = den.schedule(t)
    rho = float(sigma / alpha)
    x_far = alpha * torch.tensor([[2.0 + 30, 0.5 + 30]], dtype=F64)
    asym = torch.tensor([2.0, 0.5], dtype=F64) - rho**2 / 30
    assert torch.allclose(den(x_far, t)[0], asym, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="low < high"):
        BoxDenoiser(torch.tensor([1.0]), torch.tensor([1.0]))


def _zeroed_baseline(W, b, s, z_scale=1.0, **kwargs):
    """A fitted model (standardisation z = theta / z_scale) whose network outputs zero, so that
    with the baseline it is the exact denoiser of z | y ~ N(W y + b, diag(s)^2)."""
    npe = _npe(D=2, dy=2, baseline=True, **kwargs)
    with torch.no_grad():
        for p in npe.backbone.parameters():
            p.zero_()
        npe.b_weight.copy_(W)
        npe.b_bias.copy_(b)
        npe.b_scale.copy_(s)
        npe.z_scale.fill_(z_scale)
        npe.fitted.fill_(1.0)
    return npe


def _rejecting_model(W, b, s, low, high):
    """:func:`_zeroed_baseline` on a box prior sampled by rejection."""
    return _zeroed_baseline(W, b, s, bounds=(low, high), support="reject")


def test_rejection_gives_the_gaussian_truncated_to_the_box():
    """z | y ~ N(W y + b, diag(s)^2) is theta's own space under support="reject": the samples
    follow the Gaussian truncated to the box, per coordinate (scipy's truncnorm moments, within
    4 Monte-Carlo standard errors), for M = 2 observations in one batched call; the acceptance
    rate matches the Gaussian's mass in the box; plausible.sample gives the same draw; and
    log_prob is -inf outside the box."""
    low, high = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 2.0])
    W, b, s = torch.eye(2), torch.tensor([0.0, 0.5]), torch.tensor([0.6, 1.0])
    npe = _rejecting_model(W, b, s, low, high)
    ys = torch.tensor([[0.8, -0.2], [-0.3, 1.2]])
    post = npe.given(ys)
    assert post.rejects
    N = 4000
    theta = post.sample(N, steps=64, sampler="dpm++", grid="logsnr", seed=0)
    assert theta.shape == (N, 2, 2) and bool(npe.inside(theta).all())
    mean, sd = ys + b, s.expand(2, 2)
    a, c = (low - mean) / sd, (high - mean) / sd
    t_mean = torch.tensor(stats.truncnorm.mean(a.numpy(), c.numpy(), loc=mean.numpy(),
                                               scale=sd.numpy()), dtype=torch.float32)
    t_std = torch.tensor(stats.truncnorm.std(a.numpy(), c.numpy(), loc=mean.numpy(),
                                             scale=sd.numpy()), dtype=torch.float32)
    assert (((theta.mean(0) - t_mean) / t_std).abs() < 4 / math.sqrt(N)).all()
    assert ((theta.std(0) / t_std - 1).abs() < 4 / math.sqrt(2 * N)).all()
    # the untruncated Gaussian is far off (the test can fail)
    assert (((mean - t_mean) / t_std).abs() > 4 / math.sqrt(N)).any()
    mass = torch.tensor(stats.norm.cdf(c.numpy()) - stats.norm.cdf(a.numpy())).prod(-1)
    drawn = N / post.acceptance
    assert ((post.acceptance - mass).abs() < 4 * (mass * (1 - mass) / drawn).sqrt()).all()
    again = plausible.sample(post, N, steps=64, sampler="dpm++", grid="logsnr", seed=0,
                             progress=False)
    assert torch.equal(again, theta)
    lp = post.log_prob(torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.5, 0.0], [0.0, 2.5]]]),
                       steps=8)
    assert torch.isfinite(lp[0]).all() and (lp[1] == -math.inf).all()
    # one observation
    one = npe.given(ys[0]).sample(200, steps=16, seed=1)
    assert one.shape == (200, 2) and bool(npe.inside(one).all())


def test_rejection_refuses_a_posterior_outside_the_support():
    npe = _rejecting_model(torch.eye(2), torch.tensor([9.0, 0.0]), torch.ones(2),
                           torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="fell inside the prior's support"):
        npe.given(torch.zeros(2)).sample(100, steps=8, seed=0)
    with pytest.raises(ValueError, match="x_1 cannot be given"):
        plausible.sample(npe.given(torch.zeros(2)), 4, steps=4, x_1=torch.zeros(4, 2))


def test_support_auto_rejects_for_posteriors_narrow_against_the_box():
    """support="auto" decides from the data: y = theta + noise on U(-10, 10)^2. The expected
    acceptance is about (1 - 2 s phi(0) / 20)^2 for a posterior std s: with noise std 0.3
    about 0.98 -> "reject" with the baseline; with noise std 3 about 0.78 (0.85 with the
    regression's shrinkage) -> the logit, without the baseline (its parameters are dropped, so
    checkpoints of either load). fit decides it before its weight average copies the model."""
    g = torch.Generator().manual_seed(0)
    low, high = -10 * torch.ones(2), 10 * torch.ones(2)
    theta = low + (high - low) * torch.rand(5000, 2, generator=g)
    for noise, support, baseline, lo, hi in ((0.3, "reject", True, 0.95, 0.99),
                                             (3.0, "bijection", False, 0.75, 0.9)):
        y = theta + noise * torch.randn(5000, 2, generator=g)
        npe = _npe(bounds=(low, high))
        assert npe.support == "auto" and not npe.baseline
        npe.standardize_from(theta, y)
        assert (npe.support, npe.baseline) == (support, baseline), noise
        assert lo < npe.expected_acceptance < hi, npe.expected_acceptance
        assert any(k.startswith("b_") for k in npe.state_dict()) == baseline
        # through fit (its prepare hook), then a checkpoint round trip
        fitted = _npe(bounds=(low, high))
        plausible.fit(fitted, (theta[:600], y[:600]), steps=3, batch_size=64, progress=False)
        assert (fitted.support, fitted.baseline) == (support, baseline)
    # unbounded or half-bounded theta: nothing to decide
    assert _npe().support == "bijection" and _npe().baseline
    with pytest.raises(ValueError, match="support must be"):
        _npe(support="clip")


def test_checkpoint_keeps_the_support(tmp_path):
    g = torch.Generator().manual_seed(0)
    theta = 20 * torch.rand(800, 2, generator=g) - 10
    y = theta + 0.3 * torch.randn(800, 2, generator=g)
    npe = _npe(bounds=(-10 * torch.ones(2), 10 * torch.ones(2)))
    npe.standardize_from(theta, y)
    save_model(npe, tmp_path / "npe")
    back = load(tmp_path / "npe")
    assert (back.support, back.baseline) == ("reject", True)
    z, t = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(back(z, t, y[:5]), npe(z, t, y[:5]))
    assert torch.equal(back.encode(theta), npe.encode(theta))
    # a checkpoint written before `support` existed was trained through the logit
    import json

    cfg = json.loads((tmp_path / "npe" / "model.json").read_text())
    assert cfg["config"]["support"] == "reject"


class _TruncatedGaussians(plausible.Denoiser):
    """Exact denoisers of n posteriors N(mu_j, v I) truncated to the box [a, b]^D (states
    (n, D)): given x_t, x is N(m, 1 / P) truncated, P = 1 / v + alpha^2 / sigma^2,
    m = (mu / v + alpha x_t / sigma^2) / P; its mean by the Mills ratio."""

    def __init__(self, mu: Tensor, v: float, a: float, b: float) -> None:
        super().__init__()
        from plausible.schedules import VPSchedule

        self.mu, self.v, self.a, self.b = mu, v, a, b
        self.schedule, self.shape = VPSchedule(), tuple(mu.shape)

    def forward(self, x_t: Tensor, t, **cond) -> Tensor:
        from plausible.amortized import _mills_ratio
        from plausible.denoisers import right_broadcast

        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t.to(F64))
        x = x_t.to(F64)
        alpha, sigma = right_broadcast(alpha, x), right_broadcast(sigma, x)
        P = 1 / self.v + alpha**2 / sigma**2
        m = (self.mu / self.v + alpha * x / sigma**2) / P
        r = P.rsqrt()
        return m + r * _mills_ratio((self.a - m) / r, (self.b - m) / r)

    @property
    def variances(self) -> Tensor:
        sd = math.sqrt(self.v)
        A, B = (self.a - self.mu) / sd, (self.b - self.mu) / sd
        return torch.tensor(stats.truncnorm.var(A.numpy(), B.numpy(), loc=self.mu.numpy(),
                                                scale=sd), dtype=F64)


@pytest.mark.parametrize("n", [1, 10, 100])
def test_gauss_composition_under_rejection_with_a_uniform_prior(n):
    """support="reject": the per-observation posteriors (box [-1, 1]^2 prior, y_j ~ N(theta,
    0.01 I), posteriors 7 std or more inside the box) composed by GAUSS with the exact uniform
    prior (BoxDenoiser) in theta's own coordinates, then restricted to the box by rejection,
    against the exact tall posterior (N(mean y, 0.01 / n) truncated to the box), within 4
    Monte-Carlo standard errors at every n (measured: at most 0.04 std in the mean and 6 % in
    the std). Near the box's faces this composition is not accurate (measured 0.8 std off at
    n = 10 with posteriors of std 0.3 at 0.06 std from a face): there the logit is the space
    to compose in (test_gauss_composition_uniform_prior_truncated_gaussian)."""
    g = torch.Generator().manual_seed(0)
    var = 0.01
    noise = math.sqrt(var) * torch.randn(n, 2, generator=g, dtype=F64)
    ys = torch.tensor([0.2, -0.3], dtype=F64) + noise - noise.mean(0)
    posts = _TruncatedGaussians(ys, var, -1.0, 1.0)
    npe = ConditionalDenoiser(ResMLP(2, hidden=8, blocks=1, context=2),
                              bounds=(-torch.ones(2), torch.ones(2)), support="reject")
    prior = BoxDenoiser(-torch.ones(2), torch.ones(2))
    post = IIDPosterior(posts, prior, method="gauss", covariances=torch.diag_embed(
        posts.variances), prior_covariance=prior.covariance, model=npe)
    N = 1000
    theta = post.sample(N, steps=32, sampler="dpm++", grid="logsnr", dtype=F64, seed=6)
    assert bool(npe.inside(theta).all())
    ybar, sd = ys.mean(0), math.sqrt(var / n)
    A, B = (-1 - ybar) / sd, (1 - ybar) / sd
    t_mean = torch.tensor(stats.truncnorm.mean(A.numpy(), B.numpy(), loc=ybar.numpy(), scale=sd))
    t_std = torch.tensor(stats.truncnorm.std(A.numpy(), B.numpy(), loc=ybar.numpy(), scale=sd))
    assert (((theta.mean(0) - t_mean) / t_std).abs() < 4 / math.sqrt(N)).all()
    assert ((theta.std(0) / t_std - 1).abs() < 4 / math.sqrt(2 * N)).all()


def test_given_iid_estimates_the_covariances_in_the_sampling_space():
    """GAUSS's default per-observation covariances are those of z, not of theta: with the
    network zeroed, the baseline model's posterior is z | y ~ N(W y + b, diag(s)^2) while theta
    = 3 z (z_scale 3; the bug this guards against estimated them 9x too large). Estimated from
    4000 samples, within 4 standard errors of a variance (sqrt(2 / 4000) relative) plus the
    3 % bias of DPM++ with 32 steps (measured +2.5 % on this Gaussian with 20000 samples)."""
    s = torch.tensor([0.5, 0.8])
    npe = _zeroed_baseline(torch.eye(2), torch.zeros(2), s, z_scale=3.0)
    iid = npe.given_iid(torch.tensor([[0.2, -0.1], [0.4, 0.3]]), cov_samples=4000)
    var = torch.diagonal(torch.linalg.inv(iid.prec), dim1=-2, dim2=-1)  # (2, 2)
    assert ((var / s.double() ** 2 - 1).abs() < 0.03 + 4 * math.sqrt(2 / 4000)).all(), var


def test_refine_restores_ddpm_variance_for_batched_and_rejecting_posteriors():
    """DDPM's under-dispersion (variance ratio 0.90 on this exact Gaussian posterior, see the
    next test) is removed by ``refine``: Langevin steps started from samples of variance 0.9 w
    have the stationary variance 2 w / (2 - 0.9 h) = 1.009 w (h = 0.02), checked within 4
    standard errors of a variance, for M = 2 observations in one batched call; and under
    support="reject" the refined samples are the Gaussian truncated to the box (scipy)."""
    s = torch.tensor([0.1, 0.02])
    npe = _zeroed_baseline(torch.eye(2), torch.zeros(2), s)
    ys = torch.tensor([[0.2, -0.1], [-0.5, 0.3]])
    N = 8000
    plain = npe.given(ys).sample(N, seed=0)
    x = npe.given(ys).sample(N, seed=0, refine=300)
    assert x.shape == (N, 2, 2)
    tol = 4 * math.sqrt(2 / N)
    assert ((plain.var(0) / s**2 - 1).abs() > tol).any()  # the test can fail
    assert ((x.var(0) / s**2 - 2 / (2 - 0.9 * 0.02)).abs() < tol).all(), x.var(0) / s**2
    assert (((x.mean(0) - ys) / s).abs() < 4 / math.sqrt(N)).all()
    # rejection: refined in z, then restricted to the box
    low, high = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 2.0])
    W, b, sd = torch.eye(2), torch.tensor([0.0, 0.5]), torch.tensor([0.6, 1.0])
    post = _rejecting_model(W, b, sd, low, high).given(torch.tensor([[0.8, -0.2]]))
    theta = post.sample(4000, steps=32, seed=1, refine=200)[:, 0]
    mean = torch.tensor([0.8, -0.2]) + b
    a, c = (low - mean) / sd, (high - mean) / sd
    t_mean = torch.tensor(stats.truncnorm.mean(a.numpy(), c.numpy(), loc=mean.numpy(),
                                               scale=sd.numpy()), dtype=torch.float32)
    t_std = torch.tensor(stats.truncnorm.std(a.numpy(), c.numpy(), loc=mean.numpy(),
                                             scale=sd.numpy()), dtype=torch.float32)
    assert (((theta.mean(0) - t_mean) / t_std).abs() < 4 / math.sqrt(4000)).all()
    assert ((theta.std(0) / t_std - 1).abs() < 0.01 + 4 / math.sqrt(2 * 4000)).all()


def test_default_sampler_keeps_narrow_posteriors_dispersed():
    """DDPM under-disperses (each step drops the spread of x_0 given x_t). On a uniform t grid
    that grows as the posterior narrows; the posteriors' default log-SNR grid keeps it about
    the same at every width. Exact Gaussian posterior N(W y + b, diag(0.1, 0.02)^2) (zeroed
    network with the baseline), 8000 draws of 128 steps: measured variance ratios 0.90 / 0.90
    by default and 0.76 / 0.42 on the uniform grid; bounds 0.8-1.0 (about 6 standard errors of
    a variance, sqrt(2 / 8000) = 1.6 %, below the measured value) and below 0.6."""
    s = torch.tensor([0.1, 0.02])
    npe = _zeroed_baseline(torch.eye(2), torch.zeros(2), s)
    post = npe.given(torch.tensor([0.2, -0.1]))
    ratio = post.sample(8000, seed=0).var(0) / s**2
    assert ((ratio > 0.8) & (ratio < 1.0)).all(), ratio
    assert torch.equal(plausible.sample(post, 300, steps=128, seed=1, progress=False),
                       post.sample(300, seed=1))  # the same default through plausible.sample
    uniform = post.sample(8000, seed=0, grid="uniform").var(0) / s**2
    assert uniform[1] < 0.6, uniform


def test_ddpm_cov_samples_an_exact_gaussian_posterior_in_theta():
    """The moment-matched sampler (``sampler="ddpm-cov"``) through an amortized posterior:
    exact Gaussian posterior N(W y + b, diag(0.1, 0.02)^2), 16 steps on
    the log-SNR grid, 8000 draws of theta: the variances within 4 standard errors (sqrt(2 /
    8000) = 1.6 %) of the truth, where the default DDPM is 10 % low (test above)."""
    s = torch.tensor([0.1, 0.02])
    npe = _zeroed_baseline(torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.tensor([0.3, -0.2]), s)
    y = torch.tensor([0.2, -0.1])
    post = npe.given(y)
    theta = post.sample(8000, seed=0, sampler="ddpm-cov", steps=16)
    ratio = theta.var(0) / s**2
    assert ((ratio - 1).abs() < 4 * (2 / 8000) ** 0.5).all(), ratio
    mean = torch.tensor([[1.0, 0.5], [0.0, 1.0]]) @ y + torch.tensor([0.3, -0.2])
    assert ((theta.mean(0) - mean).abs() / s < 4 / 8000**0.5).all(), (theta.mean(0), mean)
