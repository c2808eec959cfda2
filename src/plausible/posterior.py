r"""Zero-shot posteriors: denoisers of :math:`p(x \mid y)` built from a prior denoiser and
observations, with no retraining.

By Bayes' rule on scores, :math:`\nabla \log p(x_t \mid y) = \nabla \log p(x_t) + \sum_i
\nabla \log p(y_i \mid x_t)`, and by Tweedie the posterior denoiser is

.. math:: \mathbb{E}[x \mid x_t, y] = d(x_t, t) + \frac{\sigma_t^2}{\alpha_t}
    \sum_i \nabla_{x_t} \log p(y_i \mid x_t).

The classes differ in how they approximate the intractable likelihood
:math:`p(y \mid x_t) = \int p(y \mid x) p(x \mid x_t) dx`:

- :class:`MMPS` (moment matching, Rozet et al. 2024): :math:`p(x \mid x_t) \approx
  \mathcal{N}(\hat{x}, V)` with :math:`\hat{x} = d(x_t, t)` and the Tweedie covariance
  :math:`V = \frac{\sigma_t^2}{\alpha_t} \partial_{x_t} \hat{x}`, giving
  :math:`\mathbb{E}[x \mid x_t, y] = \hat{x} + V A^\top (\Sigma_y + A V A^\top)^{-1}
  (y - A \hat{x})`, exact for a Gaussian prior (with a converged solve);
- :class:`DPS` (Chung et al. 2022): :math:`p(x \mid x_t) \approx \delta(x - \hat{x})`;
- :class:`SDA` (Rozet & Louppe 2023): a diagonal covariance :math:`\gamma (\sigma_t /
  \alpha_t)^2 I`.

Each is itself a :class:`~plausible.denoisers.Denoiser` (so every sampler works with it),
and takes one :class:`~plausible.observations.Observation` or a list of them (their
likelihoods multiply; MMPS solves one joint system).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .denoisers import Denoiser, right_broadcast
from .linalg import Solution, cg, gmres
from .observations import Observation

__all__ = ["ZeroShotPosterior", "MMPS", "MMPSStep", "DPS", "SDA"]


class ZeroShotPosterior(Denoiser):
    """Base of zero-shot posteriors: holds the prior and the observations, checks them.

    Attributes:
        stats: Running counts since construction (or :meth:`reset_stats`):
            ``calls`` (forward calls), ``vjps`` (vector-Jacobian products through the prior),
            ``solver_iterations``.
    """

    def __init__(self, prior: Denoiser, observations: Observation | Sequence[Observation]):
        super().__init__()
        if not isinstance(prior, Denoiser):
            raise TypeError(f"prior must be a Denoiser, got {type(prior).__name__}")
        if prior.shape is None:
            raise ValueError("the prior's state shape is unknown: build it with shape=(...)")
        if isinstance(observations, Observation):
            observations = [observations]
        observations = list(observations)
        if not observations or not all(isinstance(o, Observation) for o in observations):
            raise TypeError("observations must be an Observation or a non-empty list of them")
        for obs in observations:
            obs.validate(prior.shape)
        self.prior = prior
        self.observations = nn.ModuleList(observations)
        self.schedule = prior.schedule
        self.shape = tuple(prior.shape)
        self.reset_stats()

    def reset_stats(self) -> None:
        """Sets the counters of :attr:`stats` to zero."""
        self.stats = {"calls": 0, "vjps": 0, "solver_iterations": 0}

    def _guided(
        self,
        x_t: Tensor,
        t: Tensor | float,
        log_likelihood: Callable[[Tensor, Tensor, Tensor], Tensor],
        scale: float = 1.0,
        **cond: Any,
    ) -> Tensor:
        r"""The posterior denoiser of a likelihood surrogate :math:`\ell(\hat{x})`
        differentiated through the prior: :math:`\hat{x} + \frac{\sigma_t^2}{\alpha_t}
        \, \mathrm{scale} \, \nabla_{x_t} \ell`, with ``log_likelihood(x_hat, alpha,
        sigma) -> (B,)``. One VJP through the prior."""
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t)
        self.stats["calls"] += 1
        self.stats["vjps"] += 1
        with torch.enable_grad():
            x = x_t.detach().requires_grad_()
            x_hat = self.prior(x, t, **cond)
            log_lik = log_likelihood(x_hat, alpha, sigma)
            (grad,) = torch.autograd.grad(log_lik.sum(), x)
        gamma = right_broadcast(sigma**2 / alpha, x_t)
        return (x_hat + gamma * scale * grad).detach()

    def _residuals(self, x_hat: Tensor) -> list[Tensor]:
        """:math:`y_i - A_i(\\hat{x})`, zero at unobserved entries; list of ``(B, *S_yi)``."""
        out = []
        for obs in self.observations:
            observed = obs.observed_entries(self.shape)
            out.append(torch.where(observed, obs.y_clean.to(x_hat.dtype) - obs.A(x_hat), 0.0))
        return out


class MMPS(ZeroShotPosterior):
    r"""Moment-matching posterior sampling (Rozet et al., 2024) as a denoiser.

    .. math:: \mathbb{E}[x \mid x_t, y] \approx \hat{x} + V A^\top u, \qquad
        (\Sigma_y + A V A^\top)\, u = y - A(\hat{x}),

    with :math:`\hat{x} = d(x_t, t)`, :math:`V v = \frac{\sigma_t^2}{\alpha_t}
    J^\top v` (one VJP through the prior per solver iteration), and :math:`A` linearised at
    :math:`\hat{x}` (JVP/VJP) when non-linear. With several observations the system is the
    joint one over the stacked observations. The solve starts from :math:`u = 0` and stops at
    relative residual ``tol`` or after ``maxiter`` iterations; :math:`V A^\top u` is
    accumulated by the solver from the products it already made, so an iteration costs
    exactly one VJP and nothing is computed after the last one.

    Arguments:
        prior: The prior denoiser (any :class:`~plausible.denoisers.Denoiser`).
        observations: One :class:`~plausible.observations.Observation` or a list.
        tol: Relative residual tolerance of the solve.
        maxiter: Maximum solver iterations (``None``: the number of observed entries, where a
            converged Krylov solve stops in exact arithmetic).
        solver: ``"gmres"`` (any Jacobian) or ``"cg"`` (symmetric Jacobians, e.g. an exact
            Gaussian prior).
        warm_start: Start each solve from the previous call's solution when the batch has
            the same shape. It costs one more product per call and changes nothing but the
            iteration count of a converged solve; measured on Gaussian problems it saved
            fewer than one iteration per call, hence off by default.
        safeguard: Stop the solve of a batch element at the first Krylov direction ``p``
            along which the prior part has negative curvature,
            :math:`p^\top A V A^\top p < 0` (i.e. :math:`p^\top K p < p^\top \Sigma_y p`),
            keeping the solution of the directions before it (truncated CG / GMRES). A true
            Tweedie covariance is positive semi-definite, so this never triggers with an
            exact prior; with a learned prior it keeps a converged solve from following the
            network's spurious negative directions (see below).

    With a learned prior, the Tweedie covariance :math:`\frac{\sigma_t^2}{\alpha_t} J`
    multiplies the network Jacobian's errors by up to :math:`1/\alpha_t` at high noise and
    the system can become indefinite; a converged solve without the safeguard then follows
    those errors (measured in BENCHMARKS.md: variance errors of 10^3-10^4 times the
    Monte-Carlo floor, and diverging Lorenz-63 trajectories). The safeguard truncates such
    solves; capping them (``maxiter=1..8``, as published runs do with 1 to 5 iterations)
    also works and bounds the cost. With exact priors (and tests) a converged solve is exact.

    Shapes: ``x_t`` ``(B, *S)``, ``t`` ``()`` or ``(B,)``; returns ``(B, *S)`` (detached: the
    output is not differentiable with respect to ``x_t``). :attr:`last_solution` holds the
    last solve's iterations and residuals.

    Default sampler (:attr:`sampling`, what ``plausible.sample(post, n, steps)`` uses without
    ``sampler=``): ``"pc"`` with the ancestral (DDPM) predictor and one Langevin correction of
    ``tau = 0.25`` after each step that ends at a noise ratio :math:`\sigma_s / \alpha_s > 0.2`
    (about 2 evaluations a step). The MMPS guidance is only approximate for non-Gaussian
    priors, and the correction pulls each step back toward the guided marginal; the last,
    low-noise steps go without, as a finite Langevin step there would widen the directions
    the observations pin down. At equal evaluations it was closer to the exact posterior than
    DDPM (and than azula's MMPS + DDPM) on both Gaussian-mixture problems of BENCHMARKS.md
    section 2.
    """

    sampling = {"sampler": "pc", "eta": 1.0, "corrections": 1, "tau": 0.25, "correct_above": 0.2}

    def __init__(
        self,
        prior: Denoiser,
        observations: Observation | Sequence[Observation],
        tol: float = 1e-6,
        maxiter: int | None = None,
        solver: str = "gmres",
        warm_start: bool = False,
        safeguard: bool = True,
    ) -> None:
        super().__init__(prior, observations)
        self.warm_start = bool(warm_start)
        self.safeguard = bool(safeguard)
        self._u_previous: Tensor | None = None
        if solver not in ("cg", "gmres"):
            raise ValueError(f"solver must be 'cg' or 'gmres', got {solver!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be non-negative, got {tol}")
        if maxiter is not None and (not isinstance(maxiter, int) or maxiter < 0):
            raise ValueError(f"maxiter must be a non-negative integer or None, got {maxiter!r}")
        self.tol, self.maxiter, self.solver = float(tol), maxiter, solver
        self.last_solution: Solution | None = None

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self.step(x_t, t, **cond).x_post

    def step(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> MMPSStep:
        """One MMPS evaluation with its by-products (see :class:`MMPSStep`)."""
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t)
        gamma = right_broadcast(sigma**2 / alpha, x_t)
        self.stats["calls"] += 1
        with torch.enable_grad():
            x_hat, vjp_prior = torch.func.vjp(lambda x: self.prior(x, t, **cond), x_t.detach())
        x_hat = x_hat.detach()
        B = x_t.shape[0]

        masks, linear_maps = [], []
        for obs in self.observations:
            masks.append(obs.observed_entries(self.shape))
            A = obs.A
            if A.linear:
                with torch.enable_grad():
                    _, vjp_A = torch.func.vjp(A, x_hat)
                linear_maps.append((A, vjp_A))
            else:
                with torch.enable_grad():
                    _, vjp_A = torch.func.vjp(A, x_hat)

                def jvp_A(v: Tensor, A: nn.Module = A) -> Tensor:
                    return torch.func.jvp(A, (x_hat,), (v,))[1]

                linear_maps.append((jvp_A, vjp_A))
        residuals = self._residuals(x_hat)
        sizes = [r[0].numel() for r in residuals]
        shapes = [r.shape[1:] for r in residuals]
        # the solve runs over the observed entries only (a mask's holes are not carried)
        observed = torch.cat([m.expand(s).flatten() for m, s in zip(masks, shapes)])
        index = None if bool(observed.all()) else observed.nonzero().squeeze(1)
        total = observed.numel()

        def unpack(u: Tensor) -> list[Tensor]:
            if index is not None:
                full = u.new_zeros(B, total)
                full[:, index] = u
                u = full
            return [part.reshape(B, *s) for part, s in zip(u.split(sizes, dim=1), shapes)]

        def pack(parts: list[Tensor]) -> Tensor:
            flat = torch.cat([p.flatten(1) for p in parts], dim=1)
            return flat if index is None else flat[:, index]

        def matvec(u: Tensor) -> tuple[Tensor, Tensor]:
            parts = unpack(u)
            At_u = sum(vjp_A(p)[0] for (_, vjp_A), p in zip(linear_maps, parts))
            self.stats["vjps"] += 1
            w = gamma * vjp_prior(At_u)[0]
            out = [obs.cov_y(p) + jvp_A(w)
                   for obs, (jvp_A, _), p in zip(self.observations, linear_maps, parts)]
            return pack(out), w

        b = pack(residuals)
        solve = cg if self.solver == "cg" else gmres
        x0 = self._u_previous
        if not self.warm_start or x0 is None or x0.shape != b.shape or x0.dtype != b.dtype \
                or x0.device != b.device:
            x0 = None
        maxiter = self.maxiter if self.maxiter is not None else b.shape[1]

        def noise(u: Tensor) -> Tensor:
            r""":math:`\Sigma_y u`: the system minus the prior part, which is PSD."""
            return pack([obs.cov_y(p) for obs, p in zip(self.observations, unpack(u))])

        with torch.no_grad():
            solution = solve(matvec, b, tol=self.tol, maxiter=maxiter, x0=x0,
                             floor=noise if self.safeguard else None)
        self._u_previous = solution.x.detach() if self.warm_start else None
        self.last_solution = solution
        self.stats["solver_iterations"] += solution.iterations
        x_post = x_hat if solution.aux is None else (x_hat + solution.aux.to(x_hat.dtype))
        return MMPSStep(x_hat=x_hat, x_post=x_post.detach(), residual=b, u=solution.x,
                        solution=solution, observed=index if index is not None else
                        torch.arange(total, device=b.device),
                        matvec=lambda v: matvec(v)[0])

    def log_likelihood(self, step: MMPSStep) -> Tensor:
        r"""The moment-matched likelihood :math:`\log \mathcal{N}(y; A\hat{x}, \Sigma_y +
        A V A^\top)` of one :meth:`step`, per batch element ``(B,)`` (float64), over the
        observed entries. The log-determinant is exact: the ``M x M`` matrix is assembled
        from ``M`` products (``M`` VJPs through the prior), for moderate ``M``."""
        b, u = step.residual, step.u
        M = b.shape[1]
        with torch.no_grad():
            eye = torch.eye(M, dtype=b.dtype, device=b.device)
            cols = [step.matvec(eye[j].expand(b.shape[0], M)) for j in range(M)]
        S = torch.stack(cols, dim=-1).to(torch.float64)  # (B, M, M), column j = S e_j
        S = (S + S.transpose(1, 2)) / 2
        sign, logdet = torch.linalg.slogdet(S)
        if not bool((sign > 0).all()):
            raise FloatingPointError("the moment-matched covariance is not positive definite")
        quad = torch.einsum("bm,bm->b", b.to(torch.float64), u.to(torch.float64))
        return -0.5 * (quad + logdet + M * math.log(2 * math.pi))


@dataclass
class MMPSStep:
    r"""By-products of one MMPS evaluation at ``(x_t, t)``.

    Attributes:
        x_hat: The prior denoiser :math:`\hat{x} = d(x_t, t)`, ``(B, *S)``.
        x_post: The MMPS posterior mean :math:`\hat{x} + V A^\top u`, ``(B, *S)``.
        residual: :math:`r = y - A(\hat{x})` at the ``M`` observed entries of the stacked
            observations, ``(B, M)``.
        u: The solution of :math:`(\Sigma_y + A V A^\top) u = r`, ``(B, M)``.
        solution: The solver's :class:`~plausible.linalg.Solution`.
        observed: Positions of the ``M`` observed entries among all stacked entries, ``(M,)``.
        matvec: :math:`v \mapsto (\Sigma_y + A V A^\top) v` on ``(B, M)``.
    """

    x_hat: Tensor
    x_post: Tensor
    residual: Tensor
    u: Tensor
    solution: Solution
    observed: Tensor
    matvec: Callable[[Tensor], Tensor]


class DPS(ZeroShotPosterior):
    r"""Diffusion posterior sampling (Chung et al., 2022) as a denoiser: the likelihood of
    the denoised estimate, scaled by ``zeta``,

    .. math:: \nabla_{x_t} \log p(y \mid x_t) \approx -\zeta\, \nabla_{x_t}
        \tfrac{1}{2} \| y - A(\hat{x}) \|^2_{\Sigma_y^{-1}}

    or, with ``normalize=True``, Chung's normalised step :math:`-\zeta \nabla_{x_t}
    \|y - A(\hat{x})\|_{\Sigma_y^{-1}}`. One VJP through the prior per call.
    """

    def __init__(
        self,
        prior: Denoiser,
        observations: Observation | Sequence[Observation],
        zeta: float = 1.0,
        normalize: bool = False,
    ) -> None:
        super().__init__(prior, observations)
        if not zeta >= 0:
            raise ValueError(f"zeta must be non-negative, got {zeta}")
        self.zeta, self.normalize = float(zeta), bool(normalize)

    def log_likelihood_of_estimate(self, x_hat: Tensor) -> Tensor:
        """Per-sample ``-½ Σ_i ||y_i - A_i(x̂)||²_{Σ_i^{-1}}`` (or minus the norm), ``(B,)``."""
        total = 0.0
        for obs, r in zip(self.observations, self._residuals(x_hat)):
            total = total + obs.whiten(r).flatten(1).square().sum(1)
        return -(total.sqrt() if self.normalize else total / 2)

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self._guided(x_t, t, lambda x_hat, *_: self.log_likelihood_of_estimate(x_hat),
                            self.zeta, **cond)


class SDA(ZeroShotPosterior):
    r"""Diagonal-covariance likelihood of score-based data assimilation (Rozet & Louppe,
    2023):

    .. math:: \log p(y \mid x_t) \approx -\frac{1}{2} \sum_j
        \frac{(y - A(\hat{x}))_j^2}{\Sigma_{y,jj} + \gamma (\sigma_t / \alpha_t)^2},

    differentiated through the prior (one VJP per call). ``gamma = 1e-2`` in SDA (3e-2 for
    the Lorenz evaluation). A dense :math:`\Sigma_y` contributes its diagonal.
    """

    def __init__(
        self,
        prior: Denoiser,
        observations: Observation | Sequence[Observation],
        gamma: float = 1e-2,
    ) -> None:
        super().__init__(prior, observations)
        if not gamma >= 0:
            raise ValueError(f"gamma must be non-negative, got {gamma}")
        self.gamma = float(gamma)

    def log_likelihood_of_estimate(self, x_hat: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        r"""The diagonal Gaussian surrogate of :math:`\log p(y \mid x_t)`, ``(B,)``."""
        log_lik = 0.0
        for obs, r in zip(self.observations, self._residuals(x_hat)):
            var = obs.variance().to(x_hat.dtype) + self.gamma * right_broadcast(
                (sigma / alpha) ** 2, r
            )
            log_lik = log_lik - 0.5 * (r.square() / var).flatten(1).sum(1)
        return log_lik

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self._guided(x_t, t, self.log_likelihood_of_estimate, **cond)
