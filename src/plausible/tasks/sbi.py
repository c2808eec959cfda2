r"""The sbi-benchmark tasks, defined exactly as ``sbibm`` 1.1.0 defines them.

API summary::

    from plausible.tasks.sbi import TASKS, get_task

    task = get_task("two_moons")            # names: TASKS
    task.name, task.dim_theta, task.dim_y   # "two_moons", 2, 2
    theta = task.prior.sample(1000, generator)         # (1000, dim_theta), float32
    task.prior.log_prob(theta)                         # (1000,), -inf outside the support
    task.prior.bounds                                  # (lower, upper) tensors, or None
    y = task.simulator(theta, generator)               # (1000, dim_y), float32 (NaN rows
                                                       # where sbibm's ODE solve fails)
    task.observation(1)                                # (dim_y,)  sbibm's observation 1..10
    task.true_parameters(1)                            # (dim_theta,)
    task.reference_samples(1)                          # (10000, dim_theta) reference posterior
    task.sample_posterior(y, n, generator)             # closed-form posteriors only (see below)
    sbibm_wheel()                                      # path of the sbibm wheel (files inside)
    tsit5(f, u0, t, rtol=1e-8, atol=1e-8)              # batched adaptive ODE solver

The priors, simulators and dimensions are copied from the sources in the ``sbibm`` 1.1.0
wheel (``sbibm/tasks/<task>/task.py``); ``sbibm`` is never imported. Its observations, true
parameters and reference posterior samples (10,000 for each of 10 observations) are read from
the wheel's ``sbibm/tasks/<task>/files/num_observation_<i>/`` CSV files with ``zipfile``,
``bz2`` and ``numpy`` (nothing is unpickled). The wheel is found, in order, from the
``wheel=`` argument of :func:`get_task`, the environment variable ``PLAUSIBLE_SBIBM_WHEEL``
(a file or a folder), or ``~/.cache/plausible/sbibm/`` (``$XDG_CACHE_HOME`` respected); get it
with::

    pip download --no-deps sbibm==1.1.0 -d ~/.cache/plausible/sbibm

The tasks (``theta``: parameters, ``y``: data; ``N(m, C)`` a normal with covariance ``C``):

- ``gaussian_linear``: ``theta ~ N(0, 0.1 I_10)``, ``y ~ N(theta, 0.1 I_10)`` (sbibm's
  ``prior_scale = simulator_scale = 0.1`` enter as precisions ``10 I``, i.e. variances 0.1).
- ``gaussian_linear_uniform``: ``theta ~ U([-1, 1]^10)``, ``y ~ N(theta, 0.1 I_10)``.
- ``gaussian_mixture``: ``theta ~ U([-10, 10]^2)``,
  ``y ~ 0.5 N(theta, I_2) + 0.5 N(theta, 0.01 I_2)`` (one component per draw).
- ``two_moons``: ``theta ~ U([-1, 1]^2)``; ``a ~ U(-pi/2, pi/2)``, ``r ~ N(0.1, 0.01^2)``,
  ``y = (r cos a + 0.25 - |theta_1 + theta_2| / sqrt(2), r sin a + (theta_2 - theta_1) /
  sqrt(2))``.
- ``slcp``: ``theta ~ U([-3, 3]^5)``; 4 iid draws ``y_k ~ N(m, S)`` with
  ``m = theta[:2]``, ``s_1 = theta_3^2``, ``s_2 = theta_4^2``, ``rho = tanh(theta_5)``,
  ``S = [[s_1^2 + 1e-6, rho s_1 s_2], [rho s_1 s_2, s_2^2 + 1e-6]]``; ``y`` is the 8-vector
  ``(y_1, y_2, y_3, y_4)``.
- ``bernoulli_glm``: ``theta ~ N(0, B^{-1})`` with the smoothness precision ``B`` of sbibm
  (offset precision 0.5, ``F^T F`` on the 9 filter weights, ``F = D D + diag(sqrt(j / 9))``,
  ``D`` the first-difference matrix); spikes ``z_t ~ Bernoulli(sigmoid(X theta)_t)`` for 100
  steps with the design matrix ``X`` of sbibm (a column of ones and 9 lags of the white-noise
  stimulus ``RandomState(42).randn(100)``); ``y = (sum_t z_t, STA_0..8)`` with the
  spike-triggered sums ``STA_m = sum_t z_{t+m} I_t`` (sbibm's ``conv1d(..., padding=8)[-9:]``).
- ``sir``: ``theta = (beta, gamma) ~ LogNormal((log 0.4, log 0.125), (0.5, 0.2))``; the SIR
  ODE ``S' = -beta S I / N``, ``I' = beta S I / N - gamma I``, ``R' = gamma I`` with
  ``N = 10^6``, ``(S, I, R)(0) = (N - 1, 1, 0)`` solved on days 0..160 (saved daily) by Tsit5
  with ``rtol = atol = 1e-8`` (diffeqtorch's settings); ``y_k ~ Binomial(1000, I(17 k) / N)``,
  ``k = 0..9``.
- ``lotka_volterra``: ``theta = (alpha, beta, gamma, delta) ~ LogNormal((-0.125, -3, -0.125,
  -3), 0.5)``; ``x' = alpha x - beta x y``, ``y' = -gamma y + delta x y`` from ``(30, 1)``,
  saved every 0.1 on ``[0, 20]`` (201 points), Tsit5 with ``rtol = atol = 1e-8``; the data are
  the 10 points ``t = 2.1 k`` (``k = 0..9``) of each species, prey first, each
  ``~ LogNormal(log(clamp(u, 1e-10, 1e4)), 0.1)``.

As in sbibm, an ODE solve that fails (more than ``10^5`` solver iterations, a non-finite
state, or a step below ``1e-12``) gives a row of NaN.

Closed-form posteriors (:meth:`Task.sample_posterior`, sbibm's ``_sample_reference_posterior``
for these tasks): ``gaussian_linear`` (the exact Gaussian, :func:`gaussian_linear_posterior`),
``gaussian_linear_uniform`` and ``gaussian_mixture`` (the likelihood as a function of
``theta``, truncated to the prior by rejection), ``two_moons`` (the simulator's noise inverted,
both branches, truncated by rejection).
"""

from __future__ import annotations

import bz2
import functools
import io
import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TASKS",
    "SBI_TASKS",
    "Task",
    "Prior",
    "UniformPrior",
    "GaussianPrior",
    "LogNormalPrior",
    "get_task",
    "sbibm_wheel",
    "tsit5",
    "gaussian_linear_posterior",
    "bernoulli_glm_design",
]

TASKS: tuple[str, ...] = (
    "two_moons",
    "gaussian_linear",
    "gaussian_linear_uniform",
    "gaussian_mixture",
    "slcp",
    "bernoulli_glm",
    "sir",
    "lotka_volterra",
)

SBI_TASKS = TASKS  # the name under which ``plausible.tasks`` exports the list

SBIBM_VERSION = "1.1.0"
_PIP_COMMAND = f"pip download --no-deps sbibm=={SBIBM_VERSION} -d ~/.cache/plausible/sbibm"


# ---------------------------------------------------------------------------------------------
# priors


def _check_theta(theta: Tensor, dim: int, what: str = "theta") -> Tensor:
    if not isinstance(theta, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dim() != 2 or theta.shape[1] != dim:
        raise ValueError(f"{what} must have shape (N, {dim}), got {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {theta.dtype}")
    return theta


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of samples must be a non-negative int, got {n!r}")
    return n


class Prior:
    """A prior over ``D`` parameters: :meth:`sample`, :meth:`log_prob` and :attr:`bounds`."""

    dim: int

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent draws, shape ``(n, D)``, float32."""
        raise NotImplementedError

    def log_prob(self, theta: Tensor) -> Tensor:
        """Log density of ``theta`` ``(N, D)``; returns ``(N,)`` (``-inf`` off the support)."""
        raise NotImplementedError

    @property
    def bounds(self) -> tuple[Tensor, Tensor] | None:
        """``(lower, upper)`` of the support, each ``(D,)`` (``inf`` where unbounded), or
        ``None`` when the support is all of ``R^D``."""
        return None


class UniformPrior(Prior):
    r"""Uniform on the box :math:`[\mathrm{low}, \mathrm{high}]`, ``(D,)`` each."""

    def __init__(self, low: Tensor, high: Tensor) -> None:
        self.low = torch.as_tensor(low, dtype=torch.float32).reshape(-1)
        self.high = torch.as_tensor(high, dtype=torch.float32).reshape(-1)
        if self.low.shape != self.high.shape or not bool((self.high > self.low).all()):
            raise ValueError("UniformPrior needs low < high, both of shape (D,)")
        self.dim = self.low.numel()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(_check_n(n), self.dim, generator=generator)
        return self.low + (self.high - self.low) * u

    def log_prob(self, theta: Tensor) -> Tensor:
        theta = _check_theta(theta, self.dim)
        low, high = self.low.to(theta), self.high.to(theta)
        inside = ((theta >= low) & (theta < high)).all(dim=1)
        lp = -torch.log(high - low).sum()
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    @property
    def bounds(self) -> tuple[Tensor, Tensor]:
        return self.low.clone(), self.high.clone()


class GaussianPrior(Prior):
    r""":math:`\mathcal{N}(\mathrm{loc}, C)` given its precision :math:`C^{-1}` ``(D, D)``."""

    def __init__(self, loc: Tensor, precision: Tensor) -> None:
        self.loc = torch.as_tensor(loc, dtype=torch.float64).reshape(-1)
        self.precision = torch.as_tensor(precision, dtype=torch.float64)
        self.dim = self.loc.numel()
        if self.precision.shape != (self.dim, self.dim):
            raise ValueError(f"precision must be ({self.dim}, {self.dim})")
        self.cov = torch.linalg.inv(self.precision)
        self.cov = (self.cov + self.cov.T) / 2
        self._chol = torch.linalg.cholesky(self.cov)
        self._dist = torch.distributions.MultivariateNormal(self.loc, scale_tril=self._chol)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(_check_n(n), self.dim, generator=generator, dtype=torch.float64)
        return (self.loc + eps @ self._chol.T).float()

    def log_prob(self, theta: Tensor) -> Tensor:
        theta = _check_theta(theta, self.dim)
        return self._dist.log_prob(theta.double()).to(theta.dtype)


class LogNormalPrior(Prior):
    r"""Independent log-normals: :math:`\log \theta_d \sim \mathcal{N}(\mathrm{loc}_d,
    \mathrm{scale}_d^2)`."""

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        self.loc = torch.as_tensor(loc, dtype=torch.float64).reshape(-1)
        self.scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
        self.dim = self.loc.numel()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(_check_n(n), self.dim, generator=generator, dtype=torch.float64)
        return torch.exp(self.loc + self.scale * eps).float()

    def log_prob(self, theta: Tensor) -> Tensor:
        theta = _check_theta(theta, self.dim)
        t = theta.double()
        positive = (t > 0).all(dim=1)
        log_t = torch.log(t.clamp_min(1e-300))
        lp = (-0.5 * ((log_t - self.loc) / self.scale) ** 2 - torch.log(self.scale) - log_t
              - 0.5 * math.log(2 * math.pi)).sum(dim=1)
        return torch.where(positive, lp, torch.full_like(lp, -math.inf)).to(theta.dtype)

    @property
    def bounds(self) -> tuple[Tensor, Tensor]:
        return torch.zeros(self.dim), torch.full((self.dim,), math.inf)


# ---------------------------------------------------------------------------------------------
# ODE solver


# Tsitouras (2011) 5(4) pair, as in OrdinaryDiffEq.jl's Tsit5.
_TSIT5_C = (0.161, 0.327, 0.9, 0.9800255409045096857298102862870245954942137979563, 1.0, 1.0)
_TSIT5_A = (
    (0.161,),
    (-0.008480655492356988544426874250230774675121177393430,
     0.3354806554923569885444268742502307746751211773934),
    (2.897153057105493432130432594192938764924887287701866,
     -6.359448489975074843148159912383825625952700647415627,
     4.362295432869581411017727318190886861027813359713760),
    (5.325864828439256604428877920840511317836476253097040,
     -11.74888356406282787774717033978577296188744178259863,
     7.495539342889836208304604784564358155658679161518187,
     -0.09249506636175524925650207933207191611349983406029535),
    (5.861455442946420028659251486982647890394337666164814,
     -12.92096931784710929170611868178335939541780751955743,
     8.159367898576158643180400794539253485181918321135053,
     -0.07158497328140099722453054252582973869127213147363545,
     -0.02826905039406838290900305721271224146717633626879770),
    (0.09646076681806522951816731316512876333711995238157997,
     0.01,
     0.4798896504144995747752495322905965199130404621990332,
     1.379008574103741893192274821856872770756462643091361,
     -3.290069515436080679901047585711363850115683290894937,
     2.324710524099773982415355918398765796109060233222962),
)
# b (5th order) is the last row of A (FSAL); b_hat is the embedded 4th-order solution.
_TSIT5_B_HAT = (
    0.09468075576583945807478876255758922856117527357724631,
    0.009183565540343253096776363936645313759813746240984095,
    0.4877705284247615707855642599631228241516691959761364,
    1.234297566930478985655109673884237654035539930748193,
    -2.707712349983525454881109975059321670689605166938197,
    1.866628418170587035753719399566211498666255505244123,
    1.0 / 66.0,
)


def tsit5(
    f: Callable[[Tensor, Tensor, Tensor], Tensor],
    u0: Tensor,
    t: Tensor,
    *,
    params: Tensor | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-8,
    max_iters: int = 100_000,
    min_step: float = 1e-12,
) -> Tensor:
    r"""Solves a batch of ODEs :math:`u' = f(t, u, p)` by Tsit5 with adaptive steps.

    Each trajectory has its own step size; a step is accepted when the RMS of the embedded
    error :math:`(u_5 - u_4) / (\mathrm{atol} + \mathrm{rtol} \max(|u|, |u_5|))` is at most 1
    (the norm and tolerances of DifferentialEquations.jl), the next step is
    :math:`h \min(10, \max(0.2, 0.9\, \mathrm{err}^{-1/5}))`, and steps end exactly on the
    save times ``t`` (DifferentialEquations.jl steps over them and interpolates; at these
    tolerances both agree to far below float32 resolution).

    Arguments:
        f: The vector field ``f(t, u, p)``: ``t`` ``(B,)``, ``u`` ``(B, S)``, ``p`` ``(B, P)``
            -> ``(B, S)``; it must act row by row (it is called on subsets of the batch).
        u0: Initial states ``(B, S)`` (computed in float64).
        t: Increasing save times ``(T,)``; ``t[0]`` is the initial time.
        params: Parameters ``(B, P)`` of each trajectory (default: none, ``P = 0``).
        rtol, atol: Relative and absolute tolerances.
        max_iters: Solver iterations (accepted or rejected steps) after which a trajectory
            is abandoned, as DifferentialEquations.jl's ``maxiters``.
        min_step: A step below this also abandons a trajectory.

    Returns:
        ``(B, T, S)`` float64 states at the save times; abandoned trajectories (too many
        iterations, a tiny step or a non-finite state) are NaN throughout.
    """
    if u0.dim() != 2:
        raise ValueError(f"u0 must have shape (B, S), got {tuple(u0.shape)}")
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if t.numel() < 2 or not bool((t[1:] > t[:-1]).all()):
        raise ValueError("t must hold at least two increasing save times")
    u = u0.to(torch.float64).clone()
    B, S = u.shape
    T = t.numel()
    if params is None:
        params = torch.zeros(B, 0, dtype=torch.float64)
    if params.dim() != 2 or params.shape[0] != B:
        raise ValueError(f"params must have shape ({B}, P), got {tuple(params.shape)}")
    params = params.to(torch.float64)
    out = torch.full((B, T, S), math.nan, dtype=torch.float64)
    out[:, 0] = u
    failed = torch.zeros(B, dtype=torch.bool)

    a = [torch.tensor(row, dtype=torch.float64) for row in _TSIT5_A]
    c = torch.tensor(_TSIT5_C, dtype=torch.float64)
    b_err = torch.tensor(_TSIT5_A[-1] + (0.0,), dtype=torch.float64) - torch.tensor(
        _TSIT5_B_HAT, dtype=torch.float64)

    active = torch.arange(B)
    tc = torch.full((B,), float(t[0]), dtype=torch.float64)
    nxt = torch.ones(B, dtype=torch.long)  # index of the next save time
    k1 = f(tc, u, params)
    # initial step: Hairer's heuristic (as OrdinaryDiffEq's ode_determine_initdt, simplified)
    scale = atol + rtol * u.abs()
    d0 = (u / scale).square().mean(1).sqrt()
    d1 = (k1 / scale).square().mean(1).sqrt()
    h = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h = torch.minimum(h, t[-1] - t[0])
    iters = 0
    while active.numel() > 0:
        iters += 1
        if iters > max_iters:
            failed[active] = True
            break
        ua, ta, ha, k1a = u[active], tc[active], h[active], k1[active]
        pa = params[active]
        target = t[nxt[active]]
        step = torch.minimum(ha, target - ta)
        hits = step >= target - ta
        ks = [k1a]
        for i in range(6):
            ui = ua + step[:, None] * sum(a[i][j] * ks[j] for j in range(i + 1))
            ks.append(f(ta + c[i] * step, ui, pa))
        u5 = ua + step[:, None] * sum(a[5][j] * ks[j] for j in range(6))
        err_vec = step[:, None] * sum(b_err[j] * ks[j] for j in range(7))
        sc = atol + rtol * torch.maximum(ua.abs(), u5.abs())
        err = (err_vec / sc).square().mean(1).sqrt()
        finite = torch.isfinite(u5).all(1) & torch.isfinite(err)
        accept = (err <= 1.0) & finite
        factor = torch.clamp(0.9 * err.clamp_min(1e-10) ** -0.2, 0.2, 10.0)
        factor = torch.where(finite, factor, torch.full_like(factor, 0.2))
        # accepted: advance; the proposal grows from the unclipped step when it was clipped
        new_h = torch.where(accept & hits, torch.maximum(ha, step * factor), step * factor)
        idx = active[accept]
        u[idx] = u5[accept]
        k1[idx] = ks[6][accept]  # FSAL
        tc[idx] = torch.where(hits[accept], target[accept], ta[accept] + step[accept])
        h[active] = new_h
        saved = active[accept & hits]
        out[saved, nxt[saved]] = u[saved]
        nxt[saved] += 1
        bad = new_h < min_step  # non-finite stages shrink the step until it gets here
        failed[active[bad]] = True
        keep = (nxt[active] < T) & ~failed[active]
        active = active[keep]
    out[failed] = math.nan
    return out


# ---------------------------------------------------------------------------------------------
# wheel access


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "plausible" / "sbibm"


def sbibm_wheel(path: str | os.PathLike[str] | None = None) -> Path:
    """Locates the ``sbibm`` 1.1.0 wheel that holds the reference files.

    Arguments:
        path: The wheel, or a folder holding it. Default: ``$PLAUSIBLE_SBIBM_WHEEL``, then
            ``~/.cache/plausible/sbibm/`` (under ``$XDG_CACHE_HOME`` when set).

    Raises:
        FileNotFoundError: When no wheel is found; the message gives the ``pip download``
            command that fetches it.
    """
    if path is None:
        path = os.environ.get("PLAUSIBLE_SBIBM_WHEEL") or _cache_dir()
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob(f"sbibm-{SBIBM_VERSION}-*.whl"))
        if not found:
            raise FileNotFoundError(
                f"no sbibm-{SBIBM_VERSION} wheel in {p}; the reference posteriors of the "
                f"sbi-benchmark tasks ship inside it: run\n    {_PIP_COMMAND}\n(or set "
                "PLAUSIBLE_SBIBM_WHEEL to the wheel's path)")
        p = found[-1]
    if not p.is_file():
        raise FileNotFoundError(
            f"sbibm wheel {p} does not exist; run\n    {_PIP_COMMAND}\n(or set "
            "PLAUSIBLE_SBIBM_WHEEL to the wheel's path)")
    return p


@functools.lru_cache(maxsize=64)
def _read_csv(wheel: str, member: str) -> np.ndarray:
    """A CSV member of the wheel (optionally ``.bz2``), header skipped, as float32 ``(R, C)``."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            raw = zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in {wheel}") from None
    if member.endswith(".bz2"):
        raw = bz2.decompress(raw)
    arr = np.loadtxt(io.StringIO(raw.decode("utf-8")), delimiter=",", skiprows=1, ndmin=2,
                     dtype=np.float64)
    arr = arr.astype(np.float32)
    arr.setflags(write=False)
    return arr


# ---------------------------------------------------------------------------------------------
# simulators


def _gaussian_noise(theta: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    eps = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
    return theta + std * eps


def _simulate_gaussian_linear(theta: Tensor, generator: torch.Generator | None) -> Tensor:
    return _gaussian_noise(theta, math.sqrt(0.1), generator)


def _simulate_gaussian_mixture(theta: Tensor, generator: torch.Generator | None) -> Tensor:
    n = theta.shape[0]
    second = torch.rand(n, 1, generator=generator, dtype=theta.dtype) < 0.5  # weights 0.5
    scale = torch.where(second, 0.1, 1.0).to(theta.dtype)
    eps = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
    return theta + scale * eps


def _two_moons_map(theta: Tensor) -> Tensor:
    """sbibm's ``_map_fun`` offset ``(-|z_0|, z_1)``, rotation by ``-pi/4``."""
    c = math.cos(-math.pi / 4)
    s = math.sin(-math.pi / 4)
    z0 = c * theta[:, 0] - s * theta[:, 1]
    z1 = s * theta[:, 0] + c * theta[:, 1]
    return torch.stack((-z0.abs(), z1), dim=1)


def _two_moons_noise(n: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    a = -math.pi / 2 + math.pi * torch.rand(n, generator=generator, dtype=dtype)
    r = 0.1 + 0.01 * torch.randn(n, generator=generator, dtype=dtype)
    return torch.stack((torch.cos(a) * r + 0.25, torch.sin(a) * r), dim=1)


def _simulate_two_moons(theta: Tensor, generator: torch.Generator | None) -> Tensor:
    return _two_moons_noise(theta.shape[0], generator, theta.dtype) + _two_moons_map(theta)


def _simulate_slcp(theta: Tensor, generator: torch.Generator | None) -> Tensor:
    n = theta.shape[0]
    th = theta.to(torch.float64)
    s1, s2 = th[:, 2] ** 2, th[:, 3] ** 2
    rho = torch.tanh(th[:, 4])
    S = torch.empty(n, 2, 2, dtype=torch.float64)
    S[:, 0, 0] = s1**2 + 1e-6
    S[:, 0, 1] = S[:, 1, 0] = rho * s1 * s2
    S[:, 1, 1] = s2**2 + 1e-6
    L = torch.linalg.cholesky(S)
    eps = torch.randn(n, 4, 2, generator=generator, dtype=torch.float64)
    y = th[:, None, :2] + torch.einsum("nij,nkj->nki", L, eps)
    return y.reshape(n, 8).to(theta.dtype)


@functools.lru_cache(maxsize=1)
def _bernoulli_glm_arrays() -> tuple[Tensor, Tensor, Tensor]:
    stimulus = torch.from_numpy(np.random.RandomState(42).randn(100).astype(np.float32))
    X = torch.zeros(100, 9)
    for j in range(9):
        X[j:, j] = stimulus[: 100 - j]
    X = torch.cat((torch.ones(100, 1), X), dim=1)
    M = 9
    D = torch.diag(torch.ones(M)) - torch.diag(torch.ones(M - 1), -1)
    F = D @ D + torch.diag(1.0 * torch.arange(M) / M) ** 0.5
    precision = torch.zeros(M + 1, M + 1)
    precision[0, 0] = 0.5
    precision[1:, 1:] = F.T @ F
    return stimulus, X, precision


def bernoulli_glm_design() -> tuple[Tensor, Tensor, Tensor]:
    """The fixed arrays of ``bernoulli_glm``, rebuilt as sbibm built them:

    Returns:
        ``stimulus`` ``(100,)`` (``RandomState(42).randn(100)`` in float32), the design matrix
        ``X`` ``(100, 10)`` (ones, then the stimulus delayed by 0..8 steps) and the prior
        precision ``(10, 10)``.
    """
    return tuple(a.clone() for a in _bernoulli_glm_arrays())  # type: ignore[return-value]


def _simulate_bernoulli_glm(theta: Tensor, generator: torch.Generator | None) -> Tensor:
    stimulus, X, _ = _bernoulli_glm_arrays()
    psi = theta.float() @ X.T  # (n, 100)
    z = 1 / (1 + torch.exp(-psi))
    spikes = (torch.rand(psi.shape, generator=generator) < z).float()
    num = spikes.sum(dim=1, keepdim=True)
    sta = torch.nn.functional.conv1d(spikes[:, None], stimulus.reshape(1, 1, -1), padding=8)
    return torch.cat((num, sta[:, 0, -9:]), dim=1).to(theta.dtype)


_SIR_N = 1_000_000.0


def _solve_rows(field: Callable[[Tensor, Tensor], Tensor], params: Tensor, u0: Tensor,
                t: Tensor) -> Tensor:
    """Solves ``u' = field(u, p)`` with one parameter row ``p`` per trajectory (Tsit5,
    ``rtol = atol = 1e-8``, as diffeqtorch's ``DiffEq`` defaults that sbibm uses)."""
    return tsit5(lambda _t, u, p: field(u, p), u0, t, params=params)


def _sir_rhs(u: Tensor, p: Tensor) -> Tensor:
    S, infected = u[:, 0], u[:, 1]
    beta, gamma = p[:, 0], p[:, 1]
    infection = beta * S * infected / _SIR_N
    recovery = gamma * infected
    return torch.stack((-infection, infection - recovery, recovery), dim=1)


def _simulate_sir(theta: Tensor, generator: torch.Generator | None) -> Tensor:
    n = theta.shape[0]
    u0 = torch.tensor([[_SIR_N - 1.0, 1.0, 0.0]], dtype=torch.float64).expand(n, 3)
    t = torch.arange(161, dtype=torch.float64)
    us = _solve_rows(_sir_rhs, theta.to(torch.float64), u0, t).float()  # (n, 161, 3)
    infected = us[:, ::17, 1]  # days 0, 17, ..., 153
    ok = torch.isfinite(infected).all(dim=1)
    probs = (infected / _SIR_N).clamp(0.0, 1.0).nan_to_num(0.0)
    count = torch.full_like(probs, 1000.0)
    y = torch.binomial(count, probs, generator=generator)
    y[~ok] = math.nan
    return y.to(theta.dtype)


def _lotka_volterra_rhs(u: Tensor, p: Tensor) -> Tensor:
    x, y = u[:, 0], u[:, 1]
    alpha, beta, gamma, delta = p.unbind(1)
    return torch.stack((alpha * x - beta * x * y, -gamma * y + delta * x * y), dim=1)


def _simulate_lotka_volterra(theta: Tensor, generator: torch.Generator | None) -> Tensor:
    n = theta.shape[0]
    u0 = torch.tensor([[30.0, 1.0]], dtype=torch.float64).expand(n, 2)
    t = torch.arange(201, dtype=torch.float64) / 10  # 0:0.1:20
    us = _solve_rows(_lotka_volterra_rhs, theta.to(torch.float64), u0, t).float()
    sub = us[:, ::21, :].transpose(1, 2).reshape(n, 20)  # prey at t = 0, 2.1, .., then predator
    ok = torch.isfinite(sub).all(dim=1)
    loc = torch.log(sub.clamp(1e-10, 10000.0)).nan_to_num(0.0)
    y = torch.exp(loc + 0.1 * torch.randn(loc.shape, generator=generator))
    y[~ok] = math.nan
    return y.to(theta.dtype)


# ---------------------------------------------------------------------------------------------
# closed-form posteriors


def gaussian_linear_posterior(y: Tensor) -> tuple[Tensor, Tensor]:
    r"""Exact posterior of ``gaussian_linear``: with prior :math:`\mathcal{N}(0, 0.1 I)` and
    likelihood :math:`\mathcal{N}(y; \theta, 0.1 I)`, :math:`\theta \mid y \sim
    \mathcal{N}(y / 2, 0.05 I)`.

    Arguments:
        y: Data ``(10,)`` or ``(B, 10)``.

    Returns:
        ``(mean, cov)``: mean of ``y``'s shape, covariance ``(10, 10)`` (float64).
    """
    if not isinstance(y, Tensor) or y.shape[-1] != 10 or y.dim() not in (1, 2):
        raise ValueError("y must be a tensor of shape (10,) or (B, 10)")
    precision = 10.0 * torch.eye(10, dtype=torch.float64) * 2  # prior + likelihood
    cov = torch.linalg.inv(precision)
    mean = (y.to(torch.float64) * 10.0) @ cov.T
    return mean, cov


def _rejection(
    draw: Callable[[int], Tensor], prior: Prior, n: int, max_rounds: int = 1000
) -> Tensor:
    """``n`` draws of ``draw`` that fall inside the prior's support."""
    kept: list[Tensor] = []
    total = 0
    for _ in range(max_rounds):
        x = draw(max(2 * (n - total), 64))
        x = x[torch.isfinite(prior.log_prob(x))]
        kept.append(x)
        total += x.shape[0]
        if total >= n:
            return torch.cat(kept)[:n]
    raise RuntimeError("rejection sampling accepted too few draws (observation far outside "
                       "the prior's support?)")


# ---------------------------------------------------------------------------------------------
# tasks


class Task:
    """One sbi-benchmark task: prior, simulator and the reference files of sbibm.

    Attributes:
        name: The sbibm name (one of :data:`TASKS`).
        dim_theta: Number of parameters.
        dim_y: Dimension of the data.
        prior: The prior (:class:`Prior`).
    """

    def __init__(
        self,
        name: str,
        dim_theta: int,
        dim_y: int,
        prior: Prior,
        simulate: Callable[[Tensor, torch.Generator | None], Tensor],
        wheel: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.dim_theta = dim_theta
        self.dim_y = dim_y
        self.prior = prior
        self._simulate = simulate
        self._wheel = wheel

    def __repr__(self) -> str:
        return f"Task({self.name!r}, dim_theta={self.dim_theta}, dim_y={self.dim_y})"

    def simulator(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draws ``y ~ p(y | theta)`` for each row of ``theta`` ``(N, dim_theta)``.

        Returns:
            ``(N, dim_y)`` in ``theta``'s dtype; rows of NaN where an ODE solve failed.
        """
        theta = _check_theta(theta, self.dim_theta)
        if not bool(torch.isfinite(theta).all()):
            raise ValueError("theta must be finite")
        return self._simulate(theta.detach().cpu(), generator)

    # -- reference files -------------------------------------------------------------------

    @property
    def wheel(self) -> Path:
        """The ``sbibm`` wheel that holds this task's reference files."""
        return sbibm_wheel(self._wheel)

    def _file(self, i: int, name: str) -> np.ndarray:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= 10:
            raise ValueError(f"the observation number must be an int in 1..10, got {i!r}")
        member = f"sbibm/tasks/{self.name}/files/num_observation_{i}/{name}"
        return _read_csv(str(self.wheel), member)

    def observation(self, i: int) -> Tensor:
        """sbibm's observation ``i`` (1..10), shape ``(dim_y,)``, float32."""
        return torch.from_numpy(self._file(i, "observation.csv").copy()).reshape(self.dim_y)

    def true_parameters(self, i: int) -> Tensor:
        """The parameters that generated observation ``i``, shape ``(dim_theta,)``."""
        arr = self._file(i, "true_parameters.csv").copy()
        return torch.from_numpy(arr).reshape(self.dim_theta)

    def reference_samples(self, i: int) -> Tensor:
        """sbibm's reference posterior samples for observation ``i``: ``(10000, dim_theta)``."""
        return torch.from_numpy(self._file(i, "reference_posterior_samples.csv.bz2").copy())

    # -- closed-form posteriors --------------------------------------------------------------

    def sample_posterior(
        self, y: Tensor, n: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` exact posterior samples given ``y`` ``(dim_y,)``, for the tasks whose
        posterior sbibm samples in closed form (``gaussian_linear``,
        ``gaussian_linear_uniform``, ``gaussian_mixture``, ``two_moons``).

        Raises:
            NotImplementedError: For the other tasks (their references are sampled by MCMC /
                rejection with learned proposals: use :meth:`reference_samples`).
        """
        if not isinstance(y, Tensor) or y.numel() != self.dim_y:
            raise ValueError(f"y must be a tensor with {self.dim_y} entries")
        y = y.reshape(-1).float()
        _check_n(n)
        g = generator
        if self.name == "gaussian_linear":
            mean, cov = gaussian_linear_posterior(y)
            eps = torch.randn(n, 10, generator=g, dtype=torch.float64)
            return (mean + eps @ torch.linalg.cholesky(cov).T).float()
        if self.name == "gaussian_linear_uniform":
            return _rejection(lambda m: y + math.sqrt(0.1) * torch.randn(m, 10, generator=g),
                              self.prior, n)
        if self.name == "gaussian_mixture":
            return _rejection(
                lambda m: _simulate_gaussian_mixture(y.expand(m, 2), g), self.prior, n)
        if self.name == "two_moons":
            c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)

            def draw(m: int) -> Tensor:
                p = _two_moons_noise(m, g, torch.float32)
                q0 = p[:, 0] - y[0]
                q1 = y[1] - p[:, 1]
                flip = torch.rand(m, generator=g) < 0.5
                q0 = torch.where(flip, -q0, q0)
                return torch.stack((c * q0 - s * q1, s * q0 + c * q1), dim=1)

            return _rejection(draw, self.prior, n)
        raise NotImplementedError(f"{self.name} has no closed-form posterior; use "
                                  "reference_samples(i)")


def _make(name: str, wheel: str | os.PathLike[str] | None) -> Task:
    if name == "gaussian_linear":
        prior: Prior = GaussianPrior(torch.zeros(10), 10.0 * torch.eye(10))
        return Task(name, 10, 10, prior, _simulate_gaussian_linear, wheel)
    if name == "gaussian_linear_uniform":
        prior = UniformPrior(-torch.ones(10), torch.ones(10))
        return Task(name, 10, 10, prior, _simulate_gaussian_linear, wheel)
    if name == "gaussian_mixture":
        prior = UniformPrior(-10 * torch.ones(2), 10 * torch.ones(2))
        return Task(name, 2, 2, prior, _simulate_gaussian_mixture, wheel)
    if name == "two_moons":
        prior = UniformPrior(-torch.ones(2), torch.ones(2))
        return Task(name, 2, 2, prior, _simulate_two_moons, wheel)
    if name == "slcp":
        prior = UniformPrior(-3 * torch.ones(5), 3 * torch.ones(5))
        return Task(name, 5, 8, prior, _simulate_slcp, wheel)
    if name == "bernoulli_glm":
        prior = GaussianPrior(torch.zeros(10), _bernoulli_glm_arrays()[2])
        return Task(name, 10, 10, prior, _simulate_bernoulli_glm, wheel)
    if name == "sir":
        prior = LogNormalPrior(torch.tensor([math.log(0.4), math.log(0.125)], dtype=torch.float64),
                               torch.tensor([0.5, 0.2], dtype=torch.float64))
        return Task(name, 2, 10, prior, _simulate_sir, wheel)
    if name == "lotka_volterra":
        prior = LogNormalPrior(torch.tensor([-0.125, -3.0, -0.125, -3.0]),
                               torch.full((4,), 0.5))
        return Task(name, 4, 20, prior, _simulate_lotka_volterra, wheel)
    raise ValueError(f"unknown sbi task {name!r}; expected one of {list(TASKS)}")


def get_task(name: str, wheel: str | os.PathLike[str] | None = None) -> Task:
    """The sbi-benchmark task ``name`` (one of :data:`TASKS`).

    Arguments:
        name: The sbibm task name.
        wheel: Where the ``sbibm`` wheel is (a file or a folder); only the reference files
            (:meth:`Task.observation`, :meth:`Task.true_parameters`,
            :meth:`Task.reference_samples`) need it. Default: see :func:`sbibm_wheel`.

    Raises:
        ValueError: On an unknown name.
    """
    if not isinstance(name, str):
        raise TypeError(f"the task name must be a str, got {type(name).__name__}")
    return _make(name, wheel)
