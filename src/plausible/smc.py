r"""Asymptotically exact zero-shot posteriors: sequential Monte Carlo along the reverse
diffusion, with the MMPS Gaussian likelihood as twisting function and MMPS-guided proposals
(twisted diffusion sampling, Wu et al. 2023, with the moment-matched twist of Rozet et al.).

Particles follow the DDPM chain :math:`p(x_s \mid x_t) = \mathcal{N}(\mu_s(\hat{x}), c^2 I)`
of the prior, with :math:`\mu_s(\hat{x}) = \alpha_s \hat{x} + \sqrt{\sigma_s^2 - c^2}
(x_t - \alpha_t \hat{x}) / \sigma_t` and :math:`c^2 = \sigma_s^2 (1 - (\alpha_t \sigma_s /
\alpha_s \sigma_t)^2)`. The twist is :math:`\tilde{p}_t(y \mid x_t) = \mathcal{N}(y;
A\hat{x}_t, \Sigma_y + A V_t A^\top)`, the proposal :math:`q(x_s \mid x_t) =
\mathcal{N}(\mu_s(\hat{x}) + c^2 \nabla_{x_t} \log \tilde{p}_t(y \mid x_t), c^2 I)`
(the kernel moved by the twist's score, :math:`\nabla_{x_t} \log \tilde{p}_t =
\alpha_t (\hat{x}^{\text{MMPS}} - \hat{x}) / \sigma_t^2`), and the incremental weights

.. math:: w_s = \frac{p(x_s \mid x_t)\, \tilde{p}_s(y \mid x_s)}{q(x_s \mid x_t)\,
    \tilde{p}_t(y \mid x_t)}, \qquad
    w_0 = \frac{p(x_0 \mid x_t)\, p(y \mid x_0)}{q(x_0 \mid x_t)\, \tilde{p}_t(y \mid x_t)}

(with :math:`w_1 = \tilde{p}_1(y \mid x_1)` at the start) make the weighted particles target
:math:`p(x_0) p(y \mid x_0)` under the DDPM chain of the prior, whatever the quality of the twist,
as the number of particles grows. The product of the mean incremental weights estimates the
evidence :math:`p(y)`. Resampling (systematic) happens when the effective sample size falls
below a threshold. Log-weights are float64 and normalised by log-sum-exp at every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoisers import Denoiser
from .observations import Observation
from .posterior import MMPS
from .schedules import time_grid

__all__ = ["SMC", "SMCResult", "systematic_resample", "effective_sample_size"]


@dataclass
class SMCResult:
    """Outcome of :meth:`SMC.run` for ``P`` independent populations of ``N`` particles.

    Attributes:
        samples: Equally weighted samples (systematically resampled from the final weighted
            particles), ``(P, N, *S)``.
        particles: The final weighted particles, ``(P, N, *S)``.
        log_weights: Their normalised log-weights, ``(P, N)`` float64.
        log_evidence: Estimates of :math:`\\log p(y)`, ``(P,)`` float64.
        ess: Effective sample size after each step, ``(steps, P)``.
        resamples: Number of resampling events per population, ``(P,)``.
        evaluations: Denoiser evaluations per particle.
    """

    samples: Tensor
    particles: Tensor
    log_weights: Tensor
    log_evidence: Tensor
    ess: Tensor
    resamples: Tensor
    evaluations: int


def effective_sample_size(log_weights: Tensor) -> Tensor:
    r""":math:`1 / \sum_i W_i^2` of normalised log-weights ``(P, N)``; returns ``(P,)``."""
    return torch.exp(-torch.logsumexp(2 * log_weights, dim=-1))


def systematic_resample(log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Systematic resampling: ``N`` ancestor indices per population from normalised
    log-weights ``(P, N)``; returns ``(P, N)`` int64 (one uniform draw per population)."""
    P, N = log_weights.shape
    W = torch.softmax(log_weights, dim=-1)
    cdf = torch.cumsum(W, dim=-1)
    cdf[:, -1] = 1.0  # guard round-off
    u = (torch.rand(P, 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
         + torch.arange(N, dtype=cdf.dtype, device=cdf.device)) / N
    return torch.searchsorted(cdf, u).clamp(max=N - 1)


class SMC:
    r"""Sequential Monte Carlo sampler of :math:`p(x \mid y)` with MMPS twists.

    Arguments:
        prior: The prior denoiser (learned or exact).
        observations: One observation or a list (any operator that MMPS accepts).
        particles: Particles per population ``N``.
        steps: Steps of the reverse DDPM chain (denoiser evaluations per particle).
        grid: The time grid (``"uniform"``, ``"logsnr"``, ``"karras"``).
        ess_threshold: Resample when the ESS falls below ``ess_threshold * N``.
        tol, maxiter, solver: Of the MMPS solve (see :class:`~plausible.posterior.MMPS`).

    The twist's log-determinant is exact (``M`` products per step for ``M`` observed
    entries), which suits observations of moderate size.
    """

    def __init__(
        self,
        prior: Denoiser,
        observations: Observation | Sequence[Observation],
        particles: int = 256,
        steps: int = 256,
        grid: str = "uniform",
        ess_threshold: float = 0.5,
        tol: float = 1e-6,
        maxiter: int | None = None,
        solver: str = "gmres",
    ) -> None:
        if not isinstance(particles, int) or particles < 1:
            raise ValueError(f"particles must be a positive integer, got {particles!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
        self.posterior = MMPS(prior, observations, tol=tol, maxiter=maxiter, solver=solver)
        self.prior = prior
        self.particles, self.steps, self.grid = particles, steps, grid
        self.ess_threshold = float(ess_threshold)

    def _log_likelihood(self, x: Tensor) -> Tensor:
        return sum(obs.log_likelihood(x).to(torch.float64)
                   for obs in self.posterior.observations)

    @torch.no_grad()
    def run(
        self,
        populations: int = 1,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> SMCResult:
        """Runs ``populations`` independent particle systems in one batch."""
        dtype = dtype or torch.get_default_dtype()
        if device is None:
            tensors = list(self.prior.parameters()) + list(self.prior.buffers())
            device = tensors[0].device if tensors else torch.device("cpu")
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        P, N, shape = populations, self.particles, tuple(self.prior.shape)
        f64 = torch.float64
        schedule = self.prior.schedule
        ts = time_grid(self.steps, self.grid, schedule)
        alphas, sigmas = (a.to(dtype=dtype, device=device) for a in schedule(ts))
        ts = ts.to(dtype=dtype, device=device)

        def randn() -> Tensor:
            return torch.randn(P * N, *shape, generator=generator, dtype=dtype, device=device)

        post = self.posterior
        x = sigmas[0] * randn()
        step = post.step(x, ts[0])
        log_twist = post.log_likelihood(step)
        x_hat, x_post = step.x_hat, step.x_post
        lw = log_twist.reshape(P, N)
        log_z = torch.logsumexp(lw, dim=1) - math.log(N)
        lw = lw - torch.logsumexp(lw, dim=1, keepdim=True)
        ess_history, resamples = [], torch.zeros(P, dtype=torch.long, device=device)
        offsets = (torch.arange(P, device=device) * N)[:, None]

        for k in tqdm(range(self.steps), desc="SMC", disable=not progress, leave=False):
            a_t, s_t, a_s, s_s = alphas[k], sigmas[k], alphas[k + 1], sigmas[k + 1]
            c2 = s_s**2 * (1 - (a_t * s_s / (a_s * s_t)) ** 2).clamp(min=0)
            c = torch.sqrt(c2).clamp(min=torch.finfo(dtype).tiny)
            kappa = torch.sqrt((s_s**2 - c2).clamp(min=0))

            def mean(d: Tensor, x_t: Tensor = x) -> Tensor:
                return a_s * d + kappa * (x_t - a_t * d) / s_t

            mu_p = mean(x_hat)
            # twisted proposal: the kernel's mean moved by c^2 times the twist's score
            # grad log p~_t(y | x_t) = alpha_t (x_post - x_hat) / sigma_t^2
            mu_q = mu_p + c2 * a_t * (x_post - x_hat) / s_t**2
            x_new = mu_q + c * randn()
            log_pq = ((x_new - mu_q).flatten(1).to(f64).square().sum(1)
                      - (x_new - mu_p).flatten(1).to(f64).square().sum(1)) / (2 * c2.to(f64))
            last = k == self.steps - 1
            if last:
                new_twist = self._log_likelihood(x_new)
            else:
                step = post.step(x_new, ts[k + 1])
                new_twist = post.log_likelihood(step)
            log_inc = (new_twist - log_twist + log_pq).reshape(P, N)
            log_inc = torch.where(torch.isnan(log_inc), -torch.inf, log_inc)
            lw = lw + log_inc
            norm = torch.logsumexp(lw, dim=1, keepdim=True)
            if not bool(torch.isfinite(norm).all()):
                raise FloatingPointError(
                    f"all particle weights vanished at step {k + 1}/{self.steps}; use more "
                    "particles or steps"
                )
            log_z = log_z + norm[:, 0]
            lw = lw - norm
            x, log_twist = x_new, new_twist
            if not last:
                x_hat, x_post = step.x_hat, step.x_post
            ess = effective_sample_size(lw)
            ess_history.append(ess)
            if not last:
                need = ess < self.ess_threshold * N
                if bool(need.any()):
                    idx = systematic_resample(lw, generator)
                    keep = torch.arange(N, device=device).expand(P, N)
                    idx = torch.where(need[:, None], idx, keep)
                    flat = (idx + offsets).flatten()
                    x, x_hat, x_post = x[flat], x_hat[flat], x_post[flat]
                    log_twist = log_twist[flat]
                    if post._u_previous is not None:  # warm starts follow their particles
                        post._u_previous = post._u_previous[flat]
                    lw = torch.where(need[:, None], torch.full_like(lw, -math.log(N)), lw)
                    resamples += need.long()

        particles = x.reshape(P, N, *shape)
        idx = systematic_resample(lw, generator)
        samples = torch.stack([particles[p, idx[p]] for p in range(P)])
        return SMCResult(
            samples=samples, particles=particles, log_weights=lw, log_evidence=log_z,
            ess=torch.stack(ess_history), resamples=resamples, evaluations=self.steps,
        )

    def sample(self, n: int, **options) -> Tensor:
        """``n`` equally weighted posterior samples ``(n, *S)`` from ``ceil(n / particles)``
        independent populations (options as in :meth:`run`)."""
        populations = -(-n // self.particles)
        result = self.run(populations, **options)
        return result.samples.reshape(-1, *self.prior.shape)[:n]
