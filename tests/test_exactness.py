"""Known-answer tests: Gaussian priors give exact Tweedie moments and exact posteriors.

Sample-based tolerances are multiples of the Monte-Carlo floor (the expected error of as many
exact samples; see ``helpers.py``), with fixed seeds.
"""

from __future__ import annotations

import pytest
import torch

import plausible
from helpers import moment_errors
from plausible import MMPS, GaussianDenoiser, Observation, ops, sample

F64 = torch.float64
D = 8


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(D, D, dtype=F64, generator=g)
    C = L @ L.T / D + 0.05 * torch.eye(D, dtype=F64)
    m = torch.randn(D, dtype=F64, generator=g)
    A = torch.randn(3, D, dtype=F64, generator=g) / D**0.5
    x_true = m + torch.linalg.cholesky(C) @ torch.randn(D, dtype=F64, generator=g)
    return m, C, A, x_true, g


def _time_points():
    return [0.05, 0.3, 0.6, 0.95]


@pytest.mark.parametrize("kind", ["dense", "diag", "lowrank"])
def test_gaussian_denoiser_matches_closed_form(problem, kind):
    m, C, *_ = problem
    if kind == "diag":
        cov = torch.diagonal(C).clone()
    elif kind == "lowrank":
        U = torch.linalg.cholesky(C)[:, :3]
        cov = (U, torch.full((D,), 0.1, dtype=F64))
    else:
        cov = C
    prior = GaussianDenoiser(m, cov)
    Cd = prior.covariance
    x_t = torch.randn(4, D, dtype=F64)
    v = torch.randn(4, D, dtype=F64)
    for t in _time_points():
        alpha, sigma = prior.schedule(torch.tensor(t, dtype=F64))
        K = alpha**2 * Cd + sigma**2 * torch.eye(D, dtype=F64)
        mean = m + (alpha * Cd @ torch.linalg.solve(K, (x_t - alpha * m).T)).T
        cov_t = Cd - alpha**2 * Cd @ torch.linalg.solve(K, Cd)
        torch.testing.assert_close(prior(x_t, t), mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(prior.tweedie_cov(x_t, t, v), v @ cov_t, rtol=1e-9, atol=1e-10)
        # Tweedie's formula through autograd agrees with the exact covariance
        generic = plausible.Denoiser.tweedie_cov(prior, x_t, t, v)
        torch.testing.assert_close(generic, v @ cov_t, rtol=1e-8, atol=1e-9)
    # one time per sample (the batched solve) equals one time for the batch (the shared solve)
    ts = torch.tensor(_time_points(), dtype=F64)
    per_sample = prior(x_t, ts)
    for i, t in enumerate(_time_points()):
        torch.testing.assert_close(per_sample[i], prior(x_t[i : i + 1], t)[0], rtol=1e-10,
                                   atol=1e-10)


def _stacked(obs_list, shape):
    """Dense (A, y, cov_y) of a list of linear observations, on observed entries only."""
    rows, ys, covs = [], [], []
    for obs in obs_list:
        keep = obs.observed_entries(shape).flatten()
        A = obs.A.to(F64).matrix(shape)[keep]
        rows.append(A)
        ys.append(obs.y.flatten().to(F64)[keep])
        if obs.noise_kind == "dense":
            covs.append(obs.noise.to(F64)[keep][:, keep])
        else:
            covs.append(torch.diag(obs.variance().flatten().to(F64)[keep]))
    return torch.cat(rows), torch.cat(ys), torch.block_diag(*covs)


def _observations(kind, problem):
    m, C, A, x_true, g = problem
    if kind == "dense":
        y = A @ x_true + 0.1 * torch.randn(3, dtype=F64, generator=g)
        return [Observation(y, ops.Matrix(A), noise=0.1)]
    if kind == "mask":
        mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
        y = torch.where(mask, x_true + 0.2 * torch.randn(D, dtype=F64, generator=g), torch.nan)
        return [Observation(y, ops.Mask(mask), noise=0.2)]
    if kind == "two":
        y1 = A @ x_true + 0.1 * torch.randn(3, dtype=F64, generator=g)
        mask = torch.zeros(D, dtype=torch.bool)
        mask[[0, 5]] = True
        std = torch.tensor([0.3, 0, 0, 0, 0, 0.05, 0, 0], dtype=F64) + 1.0 * ~mask
        y2 = torch.where(mask, x_true + std * torch.randn(D, dtype=F64, generator=g), 0.0)
        return [Observation(y1, ops.Matrix(A), noise=0.1), Observation(y2, ops.Mask(mask), std)]
    if kind == "dense_noise":
        S = torch.tensor([[0.02, 0.01, 0.0], [0.01, 0.03, 0.005], [0.0, 0.005, 0.01]], dtype=F64)
        y = A @ x_true + torch.linalg.cholesky(S) @ torch.randn(3, dtype=F64, generator=g)
        return [Observation(y, ops.Matrix(A), noise=S)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dense", "mask", "two", "dense_noise"])
@pytest.mark.parametrize("solver", ["cg", "gmres"])
def test_mmps_one_step_posterior_mean_is_exact(problem, kind, solver):
    """E[x | x_t, y] of converged MMPS on a Gaussian prior equals the closed form."""
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C)
    obs = _observations(kind, problem)
    post = MMPS(prior, obs, tol=1e-12, solver=solver)
    A, y, cov_y = _stacked(obs, (D,))
    exact = prior.condition(A, y, cov_y)
    x_t = torch.randn(5, D, dtype=F64)
    for t in _time_points():
        torch.testing.assert_close(post(x_t, t), exact(x_t, t), rtol=1e-7, atol=1e-8)
        assert post.last_solution.converged.all()


def test_two_observations_equal_one_stacked_observation(problem):
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C)
    obs = _observations("two", problem)
    A, y, cov_y = _stacked(obs, (D,))
    stacked = Observation(y, ops.Matrix(A), noise=torch.diagonal(cov_y).sqrt())
    x_t = torch.randn(6, D, dtype=F64)
    a = MMPS(prior, obs, tol=1e-12)(x_t, 0.4)
    b = MMPS(prior, stacked, tol=1e-12)(x_t, 0.4)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_nonlinear_operator_path_equals_linear_path(problem):
    """A linear map given as a non-linear Lambda (linearised by JVP/VJP) gives the same
    posterior as the exact one."""
    m, C, A, x_true, g = problem
    prior = GaussianDenoiser(m, C)
    y = A @ x_true + 0.1 * torch.randn(3, dtype=F64, generator=g)
    lam = ops.Lambda(lambda x: x @ A.T)
    assert not lam.linear
    post = MMPS(prior, Observation(y, lam, noise=0.1), tol=1e-12)
    exact = prior.condition(A, y, 0.01)
    x_t = torch.randn(5, D, dtype=F64)
    torch.testing.assert_close(post(x_t, 0.5), exact(x_t, 0.5), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["dense", "mask", "two"])
def test_mmps_samples_match_exact_posterior(problem, kind):
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C)
    obs = _observations(kind, problem)
    A, y, cov_y = _stacked(obs, (D,))
    exact = prior.condition(A, y, cov_y)
    post = MMPS(prior, obs, tol=1e-10)
    x = sample(post, 2000, steps=16, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
               seed=1, progress=False)
    e_mean, e_cov = moment_errors(x, exact.mean, exact.covariance)
    assert e_mean < 3.0 and e_cov < 3.0, (e_mean, e_cov)


SAMPLER_SETTINGS = [
    ("ddpm", dict(steps=256)),
    ("ddpm-cov", dict(steps=2)),
    ("ddim", dict(steps=64)),
    ("ddim", dict(steps=128, eta=0.5)),
    ("heun", dict(steps=32)),
    ("pc", dict(steps=128, corrections=1, tau=0.1)),
    ("dpm", dict(steps=32, order=3, grid="logsnr")),
    ("dpm++", dict(steps=16, order=2, grid="logsnr")),
    ("dpm++", dict(steps=32, order=3, grid="karras")),
]


@pytest.mark.parametrize("name,options", SAMPLER_SETTINGS)
def test_every_sampler_reproduces_gaussian_prior(problem, name, options):
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C)
    x = sample(prior, 2000, sampler=name, dtype=F64, seed=2, progress=False, **options)
    e_mean, e_cov = moment_errors(x, m, C)
    assert e_mean < 3.0 and e_cov < 3.0, (name, e_mean, e_cov)


@pytest.mark.parametrize(
    "schedule", [plausible.VESchedule(1e-3, 1e2), plausible.RectifiedSchedule()]
)
def test_other_schedules_sample_the_prior(problem, schedule):
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C, schedule)
    x = sample(prior, 2000, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=F64,
               seed=3, progress=False)
    e_mean, e_cov = moment_errors(x, m, C)
    assert e_mean < 3.0 and e_cov < 3.0, (e_mean, e_cov)


def test_sampling_is_reproducible_and_shaped(problem):
    m, C, *_ = problem
    prior = GaussianDenoiser(m.reshape(2, 4), C)
    a = sample(prior, 7, steps=8, sampler="ddpm", seed=11, progress=False)
    b = sample(prior, 7, steps=8, sampler="ddpm", seed=11, progress=False)
    c = sample(prior, 7, steps=8, sampler="ddpm", seed=12, progress=False)
    assert a.shape == (7, 2, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_ddpm_cov_is_exact_where_ddpm_under_disperses(problem, dtype):
    """On a Gaussian, the moment-matched step (Tweedie's covariance added to DDPM's) is exact
    at any number of steps; DDPM's own step loses the spread of x given x_t and
    under-disperses at 4 steps far beyond the Monte-Carlo error."""
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C)
    kw = dict(steps=4, dtype=dtype, seed=5, progress=False)
    e_plain = moment_errors(sample(prior, 4000, sampler="ddpm", **kw).double(), m, C)
    e_cov = moment_errors(sample(prior, 4000, sampler="ddpm-cov", **kw).double(), m, C)
    assert e_plain[1] > 8.0, e_plain
    assert e_cov[0] < 3.0 and e_cov[1] < 3.0, e_cov


def test_forward_difference_jacobian_of_a_gaussian_denoiser(problem):
    r"""``_jacobian`` against the closed form :math:`J = \alpha_t C (\alpha_t^2 C + \sigma_t^2
    I)^{-1}` of a Gaussian prior's denoiser, per sample, for states of shape (2, 4)."""
    from plausible.sampling import _jacobian

    m, C, *_ = problem
    prior = GaussianDenoiser(m.reshape(2, 4), C)
    t = torch.tensor(0.3, dtype=F64)
    alpha, sigma = prior.schedule(t)
    x = torch.randn(5, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    x_hat, jac = _jacobian(lambda v: prior(v, t), x)
    exact = alpha * C @ torch.linalg.inv(alpha**2 * C + sigma**2 * torch.eye(D, dtype=F64))
    assert torch.allclose(x_hat, prior(x, t))
    assert jac.shape == (5, D, D)
    assert torch.allclose(jac, exact.expand(5, D, D), atol=1e-6)


def test_ddpm_cov_refuses_large_states():
    prior = GaussianDenoiser(torch.zeros(65, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="at most 64 values"):
        sample(prior, 2, steps=2, sampler="ddpm-cov", progress=False)
    assert plausible.sampling.evaluations("ddpm-cov", 32, dim=10) == 352


def test_discretisation_error_shrinks_with_steps(problem):
    """Same noise, more steps: the deterministic sampler's covariance error decreases."""
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C)
    x_1 = torch.randn(4000, D, dtype=F64, generator=torch.Generator().manual_seed(4))
    errors = []
    for steps in (2, 4, 8):
        x = sample(prior, 4000, steps=steps, sampler="ddim", x_1=x_1, dtype=F64, progress=False)
        errors.append(float((torch.cov(x.T) - C).norm()))
    assert errors[0] > errors[1] > errors[2]


IMAGE_OPERATORS = {
    "blur": lambda: ops.Blur.gaussian(3, 1.0),
    "coarsen": lambda: ops.Coarsen(2),
    "subsample": lambda: ops.Subsample(2, offset=1),
    "fourier": lambda: ops.FourierMask(torch.rand(6, 6, generator=torch.Generator().manual_seed(1))
                                       < 0.4),
    "compose": lambda: ops.Compose(ops.Blur.gaussian(3, 0.7, padding="zeros"), ops.Coarsen(3)),
}


@pytest.mark.parametrize("name", sorted(IMAGE_OPERATORS))
def test_mmps_exact_on_images_with_natural_shape_observations(name):
    """Image states (1, 6, 6) with a dense Gaussian prior: observations keep their natural
    shape, and the one-step MMPS mean equals the closed form built from the operator's
    matrix."""
    g = torch.Generator().manual_seed(5)
    shape = (1, 6, 6)
    n = 36
    L = torch.randn(n, n, dtype=F64, generator=g)
    prior = GaussianDenoiser(torch.zeros(shape, dtype=F64), L @ L.T / n + 0.1 * torch.eye(n,
                             dtype=F64))
    op = IMAGE_OPERATORS[name]().to(F64)
    x_true = prior.sample(1, generator=g)
    y = Observation.simulate(x_true[0], op, 0.05, generator=g)
    obs = Observation(y, op, noise=0.05)
    assert y.dim() >= 2  # an image-like observation, not a flat vector
    post = MMPS(prior, obs, tol=1e-12)
    A, y_flat, cov_y = _stacked([obs], shape)
    exact = prior.condition(A, y_flat, cov_y)
    x_t = torch.randn(3, *shape, dtype=F64, generator=g)
    for t in (0.1, 0.7):
        torch.testing.assert_close(post(x_t, t), exact(x_t, t), rtol=1e-7, atol=1e-8)


def test_mmps_identity_holds_for_a_learned_unet_prior():
    """For any prior (here an untrained UNet, whose Jacobian is not symmetric) and a linear A,
    the converged MMPS output satisfies y - A(x_post) = Sigma_y u, where u solves
    (Sigma_y + A V A^T) u = y - A(x_hat): the defining identity of the moment-matched update."""
    torch.manual_seed(0)
    net = plausible.nets.UNet(1, hidden_channels=(8, 16), hidden_blocks=1, padding="circular")
    prior = plausible.Denoiser(net, shape=(1, 8, 8)).double()
    mask = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.3
    y = torch.where(mask, torch.randn(1, 8, 8, dtype=F64), torch.nan)
    post = MMPS(prior, Observation(y, ops.Mask(mask), noise=0.1), tol=1e-10, solver="gmres")
    x_t = torch.randn(2, 1, 8, 8, dtype=F64)
    x_post = post(x_t, 0.5)
    u = torch.zeros(2, 64, dtype=F64)
    u[:, mask.flatten()] = post.last_solution.x  # the solve runs over observed entries only
    u = u.reshape(2, 1, 8, 8)
    assert post.last_solution.converged.all()
    residual = torch.where(mask, torch.nan_to_num(y) - x_post * mask, 0.0)
    torch.testing.assert_close(residual, 0.01 * torch.where(mask, u, 0.0), rtol=1e-6, atol=1e-8)
    # and the correction is not trivial
    with torch.no_grad():
        assert float((x_post - prior(x_t, 0.5)).abs().max()) > 1e-2


def test_unipc_and_warm_started_solves(problem):
    """UniPC (predictor-corrector multistep) reproduces the posterior, and warm-starting the
    MMPS solve from the previous step changes iteration counts, not results."""
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C)
    obs = _observations("two", problem)
    A, y, cov_y = _stacked(obs, (D,))
    exact = prior.condition(A, y, cov_y)
    runs = {}
    for warm in (False, True):
        post = MMPS(prior, obs, tol=1e-10, warm_start=warm)
        runs[warm] = sample(post, 1000, steps=32, sampler="unipc", grid="logsnr", dtype=F64,
                            seed=7, progress=False)
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-6, atol=1e-7)
    e_mean, e_cov = moment_errors(runs[True], exact.mean, exact.covariance)
    assert e_mean < 3.0 and e_cov < 3.0, (e_mean, e_cov)


def test_default_posterior_sampler(problem):
    """``sample(post, n, steps)`` without ``sampler``: MMPS's own default (``MMPS.sampling``:
    the ancestral predictor and one Langevin correction, 2 evaluations a step) reproduces the
    exact posterior; given arguments override it; a prior's default stays DDPM."""
    m, C, *_ = problem
    prior = GaussianDenoiser(m, C)
    obs = _observations("two", problem)
    A, y, cov_y = _stacked(obs, (D,))
    exact = prior.condition(A, y, cov_y)
    post = MMPS(prior, obs, tol=1e-10)
    assert MMPS.sampling == {"sampler": "pc", "eta": 1.0, "corrections": 1, "tau": 0.25,
                             "correct_above": 0.2}
    post.reset_stats()
    x = sample(post, 2000, steps=32, dtype=F64, seed=4, progress=False)
    alphas, sigmas = prior.schedule(plausible.time_grid(32, "uniform", prior.schedule))
    corrected = int((sigmas[1:] / alphas[1:] > 0.2).sum())  # steps ending above rho = 0.2
    assert 24 < corrected < 32 and post.stats["calls"] == 32 + corrected
    e_mean, e_cov = moment_errors(x, exact.mean, exact.covariance)
    assert e_mean < 3.0 and e_cov < 3.0, (e_mean, e_cov)
    explicit = sample(post, 50, steps=8, sampler="pc", eta=1.0, corrections=1, tau=0.25,
                      correct_above=0.2, dtype=F64, seed=4, progress=False)
    torch.testing.assert_close(sample(post, 50, steps=8, dtype=F64, seed=4, progress=False),
                               explicit)
    post.reset_stats()
    sample(post, 3, steps=8, corrections=2, correct_above=0.0, dtype=F64, seed=4,
           progress=False)
    assert post.stats["calls"] == 24  # the default sampler with 2 corrections after every step
    post.reset_stats()
    sample(post, 3, steps=8, sampler="pc", dtype=F64, seed=4, progress=False)
    assert post.stats["calls"] == 16  # an explicit "pc" keeps its own defaults (eta 0, c 1)
    torch.testing.assert_close(
        sample(prior, 50, steps=8, dtype=F64, seed=5, progress=False),
        sample(prior, 50, steps=8, sampler="ddpm", dtype=F64, seed=5, progress=False))
