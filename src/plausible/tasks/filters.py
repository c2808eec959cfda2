r"""Reference posteriors of state-space models: bootstrap particle filter, particle smoother
(forward filtering, backward simulation) and the ensemble Kalman smoother.

The model is a Markov chain on states :math:`x_t \in \mathbb{R}^D`, :math:`t = 0, \dots,
L - 1`, with Gaussian transition and observation noise,

.. math:: x_0 \sim p_0, \qquad x_{t+1} = f(x_t) + w_t, \; w_t \sim \mathcal{N}(0, Q),
    \qquad y_k = h(x_{t_k}) + v_k, \; v_k \sim \mathcal{N}(0, R),

observed at the time steps :math:`t_1 < \dots < t_K`. ``f`` (the transition mean) and
``h`` (the observation operator) are batched callables ``(N, D) -> (N, D)`` and
``(N, D) -> (N, M)``; a noise is given as a scalar std, a vector of stds, or a covariance
matrix (as :class:`plausible.Observation`).

- :func:`particle_filter`: the bootstrap filter (proposal = transition), log-sum-exp weights,
  systematic resampling when the effective sample size falls below a threshold, and the
  unbiased evidence estimate :math:`\hat{p}(y) = \prod_k \sum_i W^i_{t_k^-}\, g(y_k \mid
  x^i_{t_k})`, returned as its log.
- :func:`backward_simulation`: FFBSi (Godsill, Doucet & West 2004): trajectories drawn
  backwards with :math:`P(a_t = i \mid x_{t+1}) \propto W_t^i\, \mathcal{N}(x_{t+1};
  f(x_t^i), Q)`, so that early states are not degenerate (unlike the filter's genealogy).
- :func:`particle_smoother`: both.
- :func:`ensemble_kalman_smoother`: the stochastic EnKS (Evensen & van Leeuwen 2000) with
  perturbed observations and optional multiplicative inflation; exact in the limit of large
  ensembles for linear-Gaussian models, and the usual reference for Lorenz-96.

All computations run in float64 by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..smc import effective_sample_size, systematic_resample

__all__ = [
    "GaussianNoise",
    "ParticleFilterResult",
    "particle_filter",
    "backward_simulation",
    "particle_smoother",
    "EnsembleSmootherResult",
    "ensemble_kalman_smoother",
]

Initial = Callable[[int, torch.Generator | None], Tensor] | Tensor


class GaussianNoise:
    r"""A centred Gaussian :math:`\mathcal{N}(0, \Sigma)` on vectors of size ``dim``: from a
    scalar std (:math:`\Sigma = s^2 I`), a ``(dim,)`` vector of stds (diagonal) or a
    ``(dim, dim)`` covariance (symmetric positive definite; a scalar ``0`` is allowed for a
    deterministic transition, see ``allow_zero``).

    Raises:
        ValueError: On a wrong shape, non-finite or non-positive values, or a covariance that
            is not symmetric positive definite.
    """

    def __init__(self, noise: float | Tensor, dim: int, name: str,
                 dtype: torch.dtype = torch.float64, allow_zero: bool = False) -> None:
        value = torch.as_tensor(noise, dtype=dtype)
        self.dim, self.name = dim, name
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite")
        if value.dim() == 0:
            self.kind = "scalar"
            if float(value) == 0 and allow_zero:
                self.kind = "zero"
            elif not float(value) > 0:
                raise ValueError(f"{name} must be a positive std, got {float(value)}")
            self.std = value
        elif value.shape == (dim,):
            if not (value > 0).all():
                raise ValueError(f"{name} stds must be positive, got min {float(value.min())}")
            self.kind, self.std = "diag", value
        elif value.shape == (dim, dim):
            if not torch.allclose(value, value.T, rtol=1e-8, atol=1e-12):
                raise ValueError(f"{name} covariance must be symmetric")
            L, info = torch.linalg.cholesky_ex(value)
            if int(info) != 0:
                raise ValueError(f"{name} covariance must be positive definite")
            self.kind, self.chol = "dense", L
        else:
            raise ValueError(f"{name} must be a scalar std, a ({dim},) vector of stds or a "
                             f"({dim}, {dim}) covariance, got shape {tuple(value.shape)}")

    @property
    def covariance(self) -> Tensor:
        """The ``(dim, dim)`` covariance matrix."""
        if self.kind == "dense":
            return self.chol @ self.chol.T
        if self.kind == "zero":
            return torch.zeros(self.dim, self.dim, dtype=self.std.dtype)
        var = self.std**2 * torch.ones(self.dim, dtype=self.std.dtype)
        return torch.diag(var)

    def sample(self, shape: Sequence[int], generator: torch.Generator | None,
               dtype: torch.dtype, device: torch.device) -> Tensor:
        """Draws of shape ``(*shape, dim)``."""
        if self.kind == "zero":
            return torch.zeros(*shape, self.dim, dtype=dtype, device=device)
        z = torch.randn(*shape, self.dim, generator=generator, dtype=dtype, device=device)
        if self.kind == "dense":
            return z @ self.chol.to(z).T
        return z * self.std.to(z)

    def whiten(self, r: Tensor) -> Tensor:
        r""":math:`L^{-1} r` with :math:`\Sigma = L L^\top`, on ``(..., dim)``."""
        if self.kind == "dense":
            L = self.chol.to(r)
            flat = r.reshape(-1, self.dim).T
            return torch.linalg.solve_triangular(L, flat, upper=False).T.reshape(r.shape)
        if self.kind == "zero":
            raise ValueError(f"{self.name} is zero: the Gaussian has no density")
        return r / self.std.to(r)

    def log_normaliser(self) -> float:
        r""":math:`-\frac{1}{2} \log \det (2 \pi \Sigma)`."""
        if self.kind == "dense":
            logdet = 2 * float(torch.log(torch.diagonal(self.chol)).sum())
        elif self.kind == "diag":
            logdet = 2 * float(torch.log(self.std).sum())
        elif self.kind == "scalar":
            logdet = 2 * self.dim * math.log(float(self.std))
        else:
            raise ValueError(f"{self.name} is zero: the Gaussian has no density")
        return -0.5 * (logdet + self.dim * math.log(2 * math.pi))

    def log_prob(self, r: Tensor) -> Tensor:
        """:math:`\\log \\mathcal{N}(r; 0, \\Sigma)` summed over the last axis."""
        return -0.5 * self.whiten(r).square().sum(-1) + self.log_normaliser()


@dataclass
class ParticleFilterResult:
    r"""Output of :func:`particle_filter`.

    Attributes:
        particles: :math:`x_t^i`, the filter's particles at every time, ``(L, N, D)``
            (before the resampling at time ``t``, if any).
        log_weights: Their normalised log-weights :math:`\log W_t^i` (after the observation
            at time ``t``), ``(L, N)``: :math:`\sum_i W_t^i \delta_{x_t^i}` approximates
            :math:`p(x_t \mid y_{1:k(t)})`.
        log_evidence: :math:`\log \hat{p}(y_{1:K})` (scalar tensor).
        ess: Effective sample size after each time's observation, ``(L,)``.
        resampled: Whether the particles were resampled after time ``t``, ``(L,)``.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: Tensor
    ess: Tensor
    resampled: Tensor

    def mean(self) -> Tensor:
        """Filtering means :math:`\\sum_i W_t^i x_t^i`, ``(L, D)``."""
        return torch.einsum("ln,lnd->ld", self.log_weights.exp(), self.particles)

    def covariance(self) -> Tensor:
        """Filtering covariances, ``(L, D, D)``."""
        W = self.log_weights.exp()
        r = self.particles - self.mean()[:, None]
        return torch.einsum("ln,lnd,lne->lde", W, r, r)


def _check_observations(
    y: Tensor, observed: Sequence[int] | Tensor, length: int,
) -> tuple[Tensor, list[int]]:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor (K, M), got {type(y).__name__}")
    steps = [int(s) for s in (observed.tolist() if isinstance(observed, Tensor) else observed)]
    if y.dim() == 1:
        y = y[:, None]
    if y.dim() != 2 or y.shape[0] != len(steps):
        raise ValueError(f"y must have shape (K, M) with K = len(observed) = {len(steps)}, "
                         f"got {tuple(y.shape)}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"observed time steps must be strictly increasing, got {steps}")
    if steps and (steps[0] < 0 or steps[-1] >= length):
        raise ValueError(f"observed time steps must lie in [0, {length}), got {steps}")
    if not torch.isfinite(y).all():
        raise ValueError("y contains NaN or infinity")
    return y, steps


def _initial_particles(initial: Initial, n: int, generator: torch.Generator | None,
                       dtype: torch.dtype) -> Tensor:
    x = initial if isinstance(initial, Tensor) else initial(n, generator)
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != n:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"the initial particles must have shape (N, D) = ({n}, D), got "
                         f"{shape}")
    if not torch.isfinite(x).all():
        raise ValueError("the initial particles contain NaN or infinity")
    return x.to(dtype)


def _apply(fn: Callable[[Tensor], Tensor], x: Tensor, out_dim: int | None, name: str) -> Tensor:
    out = fn(x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0] or \
            (out_dim is not None and out.shape[1] != out_dim):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        expected = f"({x.shape[0]}, {out_dim if out_dim is not None else 'M'})"
        raise ValueError(f"{name} must map (N, D) to {expected}, got {shape}")
    return out


@torch.no_grad()
def particle_filter(
    y: Tensor,
    observed: Sequence[int] | Tensor,
    length: int,
    initial: Initial,
    transition: Callable[[Tensor], Tensor],
    transition_noise: float | Tensor,
    observe: Callable[[Tensor], Tensor],
    observation_noise: float | Tensor,
    particles: int = 16384,
    ess_threshold: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> ParticleFilterResult:
    r"""Bootstrap particle filter of the state-space model of this module.

    At each time ``t``: weight :math:`\log w^i \mathrel{+}= \log \mathcal{N}(y_k; h(x^i_t),
    R)` if ``t`` is observed (and add :math:`\log \sum_i W^i w^i` to the log-evidence),
    normalise, resample systematically if :math:`\mathrm{ESS} < ` ``ess_threshold`` ``N``,
    then propagate :math:`x^i_{t+1} = f(x^i_t) + w^i`.

    Arguments:
        y: Observations ``(K, M)`` (or ``(K,)`` for ``M = 1``).
        observed: The ``K`` observed time steps, increasing, in ``[0, length)``.
        length: Number of states ``L``.
        initial: ``initial(N, generator) -> (N, D)`` draws from :math:`p_0`, or a tensor of
            ``N`` initial particles.
        transition: The transition mean :math:`f`, ``(N, D) -> (N, D)``.
        transition_noise: :math:`Q`: a scalar std, ``(D,)`` stds or a ``(D, D)`` covariance.
        observe: The observation operator :math:`h`, ``(N, D) -> (N, M)``.
        observation_noise: :math:`R`: a scalar std, ``(M,)`` stds or a ``(M, M)`` covariance.
        particles: Number of particles ``N`` (SDA: 16384).
        ess_threshold: Resample when the ESS falls below this fraction of ``N`` (``1``:
            after every observation, as SDA).
        generator: Random source.
        dtype: Of the computation (float64).
        progress: Show a progress bar over time.

    Returns:
        A :class:`ParticleFilterResult`.
    """
    y, steps = _check_observations(y, observed, length)
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 2:
        raise ValueError(f"particles must be an integer >= 2, got {particles!r}")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    N = particles
    x = _initial_particles(initial, N, generator, dtype)
    D = x.shape[1]
    M = y.shape[1]
    Q = GaussianNoise(transition_noise, D, "transition_noise", dtype)
    R = GaussianNoise(observation_noise, M, "observation_noise", dtype)
    y = y.to(dtype=dtype, device=x.device)
    obs_index = {t: k for k, t in enumerate(steps)}

    all_x = torch.empty(length, N, D, dtype=dtype, device=x.device)
    all_logw = torch.empty(length, N, dtype=dtype, device=x.device)
    ess = torch.empty(length, dtype=dtype)
    resampled = torch.zeros(length, dtype=torch.bool)
    logw = torch.full((N,), -math.log(N), dtype=dtype, device=x.device)
    log_evidence = torch.zeros((), dtype=dtype)
    for t in tqdm(range(length), desc="particle filter", disable=not progress, leave=False):
        if t > 0:
            mean = _apply(transition, x, D, "transition")
            x = mean + Q.sample((N,), generator, dtype, x.device)
        if t in obs_index:
            h = _apply(observe, x, M, "observe")
            log_lik = R.log_prob(y[obs_index[t]] - h)
            log_lik = torch.where(torch.isnan(log_lik), -math.inf, log_lik)
            joint = logw + log_lik
            increment = torch.logsumexp(joint, 0)
            if not torch.isfinite(increment):
                raise FloatingPointError(f"all particle weights vanished at time {t}: the "
                                         "observation is incompatible with every particle")
            log_evidence = log_evidence + increment.cpu()
            logw = joint - increment
        all_x[t], all_logw[t] = x, logw
        ess[t] = effective_sample_size(logw[None])[0].cpu()
        if t < length - 1 and float(ess[t]) < ess_threshold * N:
            ancestors = systematic_resample(logw[None], generator)[0]
            x = x[ancestors]
            logw = torch.full_like(logw, -math.log(N))
            resampled[t] = True
    return ParticleFilterResult(all_x, all_logw, log_evidence, ess, resampled)


def _categorical(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of unnormalised log-probabilities ``(C, N)`` by inverse CDF;
    ``(C,)`` int64."""
    cdf = torch.softmax(logits, dim=1).cumsum_(dim=1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=cdf.shape[1] - 1)


@torch.no_grad()
def backward_simulation(
    result: ParticleFilterResult,
    transition: Callable[[Tensor], Tensor],
    transition_noise: float | Tensor,
    samples: int = 1024,
    generator: torch.Generator | None = None,
    chunk: int = 128,
    progress: bool = False,
) -> Tensor:
    r"""Forward-filtering backward-simulation (FFBSi): ``samples`` trajectories from the
    particle approximation of the smoothing distribution :math:`p(x_{0:L-1} \mid y)`.

    Draw :math:`a_{L-1} \sim W_{L-1}`, then for :math:`t = L - 2, \dots, 0`

    .. math:: P(a_t = i) \propto W_t^i\, \mathcal{N}(x_{t+1}^{a_{t+1}}; f(x_t^i), Q),

    at cost :math:`O(\text{samples} \times N)` per time step, in blocks of ``chunk``
    trajectories (memory ``chunk x N``).

    Returns:
        Trajectories ``(samples, L, D)``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    X, logW = result.particles, result.log_weights
    L, N, D = X.shape
    Q = GaussianNoise(transition_noise, D, "transition_noise", X.dtype)
    out = torch.empty(samples, L, D, dtype=X.dtype, device=X.device)
    index = torch.multinomial(logW[-1].exp(), samples, replacement=True, generator=generator)
    out[:, -1] = X[-1, index]
    for t in tqdm(range(L - 2, -1, -1), desc="backward simulation", disable=not progress,
                  leave=False):
        mean = Q.whiten(_apply(transition, X[t], D, "transition"))  # (N, D), whitened
        for lo in range(0, samples, chunk):
            nxt = Q.whiten(out[lo:lo + chunk, t + 1])  # (C, D)
            log_b = logW[t][None] - 0.5 * torch.cdist(nxt, mean).square()
            pick = _categorical(log_b, generator)
            out[lo:lo + chunk, t] = X[t, pick]
    return out


def particle_smoother(
    y: Tensor,
    observed: Sequence[int] | Tensor,
    length: int,
    initial: Initial,
    transition: Callable[[Tensor], Tensor],
    transition_noise: float | Tensor,
    observe: Callable[[Tensor], Tensor],
    observation_noise: float | Tensor,
    particles: int = 16384,
    samples: int = 1024,
    ess_threshold: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int = 128,
    progress: bool = False,
) -> tuple[Tensor, ParticleFilterResult]:
    """:func:`particle_filter` then :func:`backward_simulation` (same arguments): returns
    ``(trajectories (samples, L, D), filter result)``; the log-evidence is
    ``result.log_evidence``."""
    result = particle_filter(y, observed, length, initial, transition, transition_noise,
                             observe, observation_noise, particles=particles,
                             ess_threshold=ess_threshold, generator=generator, dtype=dtype,
                             progress=progress)
    x = backward_simulation(result, transition, transition_noise, samples=samples,
                            generator=generator, chunk=chunk, progress=progress)
    return x, result


@dataclass
class EnsembleSmootherResult:
    """Output of :func:`ensemble_kalman_smoother`.

    Attributes:
        trajectories: The smoothed ensemble ``(E, L, D)`` (samples of :math:`p(x \\mid y)`
            for linear-Gaussian models as ``E`` grows).
        filtered: The filtering ensemble at each time, ``(E, L, D)`` (analysis at observed
            times, forecast elsewhere).
    """

    trajectories: Tensor
    filtered: Tensor

    def mean(self) -> Tensor:
        """Smoothing means ``(L, D)``."""
        return self.trajectories.mean(0)

    def covariance(self) -> Tensor:
        """Smoothing covariances ``(L, D, D)`` (unbiased ensemble estimates)."""
        r = self.trajectories - self.mean()
        return torch.einsum("eld,elf->ldf", r, r) / (r.shape[0] - 1)


@torch.no_grad()
def ensemble_kalman_smoother(
    y: Tensor,
    observed: Sequence[int] | Tensor,
    length: int,
    initial: Initial,
    transition: Callable[[Tensor], Tensor],
    transition_noise: float | Tensor,
    observe: Callable[[Tensor], Tensor],
    observation_noise: float | Tensor,
    members: int = 1024,
    inflation: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> EnsembleSmootherResult:
    r"""Stochastic ensemble Kalman smoother (EnKS) with perturbed observations.

    Forecast :math:`x^e_{t+1} = f(x^e_t) + w^e`. At an observed time :math:`t_k`, the
    forecast anomalies of :math:`x_{t_k}` are inflated by ``inflation``, then every state
    :math:`s \le t_k` of every member is updated with the ensemble gain

    .. math:: x^e_s \leftarrow x^e_s + C_{x_s \hat{y}} (C_{\hat{y}\hat{y}} + R)^{-1}
        (y_k + v^e - \hat{y}^e), \qquad \hat{y}^e = h(x^e_{t_k}), \; v^e \sim
        \mathcal{N}(0, R),

    with the ensemble (cross-)covariances :math:`C`. For linear-Gaussian models it converges
    to the Kalman (RTS) smoother as ``members`` grows; ``h`` may be non-linear (the gain is
    then the usual statistical linearisation).

    Arguments:
        Same as :func:`particle_filter`; ``transition_noise`` may be ``0`` (deterministic
        dynamics, e.g. Lorenz-96), and ``members`` is the ensemble size ``E``.
        inflation: Multiplicative inflation (``>= 1``) of the forecast anomalies.

    Returns:
        An :class:`EnsembleSmootherResult`.
    """
    y, steps = _check_observations(y, observed, length)
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise ValueError(f"members must be an integer >= 2, got {members!r}")
    if not inflation >= 1 or not math.isfinite(inflation):
        raise ValueError(f"inflation must be >= 1, got {inflation}")
    E = members
    x = _initial_particles(initial, E, generator, dtype)
    D = x.shape[1]
    M = y.shape[1]
    Q = GaussianNoise(transition_noise, D, "transition_noise", dtype, allow_zero=True)
    R = GaussianNoise(observation_noise, M, "observation_noise", dtype)
    R_cov = R.covariance.to(x.device)
    y = y.to(dtype=dtype, device=x.device)
    obs_index = {t: k for k, t in enumerate(steps)}

    traj = torch.empty(E, length, D, dtype=dtype, device=x.device)
    filtered = torch.empty_like(traj)
    for t in tqdm(range(length), desc="ensemble Kalman smoother", disable=not progress,
                  leave=False):
        if t > 0:
            x = _apply(transition, traj[:, t - 1], D, "transition")
            x = x + Q.sample((E,), generator, dtype, x.device)
        if t in obs_index and inflation != 1.0:
            x = x.mean(0) + inflation * (x - x.mean(0))
        traj[:, t] = x
        if t in obs_index:
            h = _apply(observe, x, M, "observe")
            v = R.sample((E,), generator, dtype, x.device)
            innovation = y[obs_index[t]] + v - h  # (E, M)
            B = h - h.mean(0)  # (E, M)
            past = traj[:, : t + 1].reshape(E, -1)
            A = past - past.mean(0)  # (E, (t+1) D)
            S = B.T @ B / (E - 1) + R_cov  # (M, M)
            S = (S + S.T) / 2
            gain_in = torch.linalg.solve(S, innovation.T)  # (M, E)
            past = past + (A.T @ (B @ gain_in)).T / (E - 1)
            traj[:, : t + 1] = past.reshape(E, t + 1, D)
            x = traj[:, t]
        filtered[:, t] = traj[:, t]
    return EnsembleSmootherResult(traj, filtered)
