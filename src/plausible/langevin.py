r"""Langevin refinement of samples at a small noise level.

A composed denoiser (the posterior of several iid observations,
:class:`~plausible.amortized.IIDPosterior`) has the exact score only where the noise
vanishes: at :math:`t \to 0` the factorized score
:math:`\sum_j \nabla \log p(\theta \mid y_j) - (n - 1) \nabla \log p(\theta)` *is* the score of
the posterior given all observations, while at larger noise it (or GAUSS's Gaussian
correction) only approximates the diffused posterior, so a sampler that walks down from pure
noise inherits that error. :func:`langevin` removes it by running preconditioned unadjusted
Langevin dynamics on the density at a small noise ratio :math:`\rho = \sigma_t / \alpha_t`,

.. math:: x \leftarrow x + h\, D\, \nabla_x \log p_t(\alpha_t x) + \sqrt{2 h D}\,\xi, \qquad
    \nabla_x \log p_t(\alpha_t x) = \frac{d(\alpha_t x, t) - x}{\rho^2},

with :math:`D` a per-coordinate variance (by default that of the samples it starts from) and
:math:`\xi \sim \mathcal{N}(0, I)`. Its stationary law is that of :math:`x + \rho \epsilon`
with :math:`x` from the data distribution (variances inflated by :math:`\rho^2`), up to the
step's bias: on a Gaussian of variance :math:`w` with :math:`D = w` the stationary variance is
:math:`w / (1 - h / 2)`. It needs one denoiser evaluation a step and no densities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoisers import Denoiser

__all__ = ["langevin"]


@torch.no_grad()
def langevin(
    denoiser: Denoiser,
    x: Tensor,
    steps: int = 200,
    step: float = 0.02,
    ratio: float | None = None,
    scale: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Refines samples ``x`` of a denoiser's data distribution by ``steps`` preconditioned
    unadjusted Langevin steps at the noise ratio ``ratio`` (module docstring).

    Arguments:
        denoiser: Any :class:`~plausible.denoisers.Denoiser` of states ``S``.
        x: Starting samples ``(n, *S)``, e.g. from :func:`plausible.sample` (their spread sets
            the default preconditioner, so they must not be collapsed).
        steps: Number of Langevin steps (one denoiser evaluation each).
        step: Step size :math:`h` relative to the preconditioner (the variance bias on a
            Gaussian is a factor :math:`1 / (1 - h / 2)`).
        ratio: Noise ratio :math:`\rho = \sigma_t / \alpha_t` of the density; default 0.05
            times the smallest per-coordinate standard deviation of ``x`` (small against
            every direction of the samples, so the smoothing inflates variances by at most
            0.25 %), floored at the schedule's smallest ratio.
        scale: Per-coordinate standard deviations ``S`` (or a scalar) of the preconditioner
            :math:`D = \mathrm{scale}^2`; default: those of ``x`` over its first axis.
        generator, seed: Random source.
        progress: Show a tqdm progress bar.

    Returns:
        The refined samples, ``(n, *S)``, in ``x``'s dtype.

    Raises:
        ValueError: On a shape mismatch, non-finite or collapsed ``x``, or a non-positive
            ``steps`` / ``step`` / ``ratio`` / ``scale``.
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"langevin expects a Denoiser, got {type(denoiser).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    S = tuple(denoiser.shape) if denoiser.shape is not None else tuple(x.shape[1:])
    if x.dim() < 1 or tuple(x.shape[1:]) != S:
        raise ValueError(f"x must have shape (n, {', '.join(map(str, S))}), got "
                         f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinity")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    if steps == 0:
        return x
    if scale is None:
        if x.shape[0] < 2:
            raise ValueError("the default preconditioner needs at least 2 samples: pass scale")
        scale = x.std(0)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("the preconditioner's scales must be finite and positive (samples "
                         "collapsed onto a point in some coordinate? pass scale)")
    schedule = denoiser.schedule
    rho_min = float(schedule.ratio(torch.tensor(0.0, dtype=torch.float64)))
    if ratio is None:
        ratio = max(0.05 * float(scale.min()), rho_min)
    if not ratio > 0 or not math.isfinite(ratio):
        raise ValueError(f"ratio must be > 0, got {ratio!r}")
    t = schedule.t_of_ratio(torch.tensor(float(ratio), dtype=torch.float64))
    alpha = float(schedule(t)[0])
    tt = t.to(x.dtype).to(x.device).expand(x.shape[0])
    var = scale.square().expand(S)
    drift = step * var / ratio**2
    noise = torch.sqrt(2 * step * var)
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    for _ in tqdm(range(steps), desc="langevin", disable=not progress, leave=False):
        d = denoiser(alpha * x, tt)
        x = x + drift * (d - x) + noise * torch.randn(x.shape, generator=generator,
                                                       dtype=x.dtype, device=x.device)
    if not torch.isfinite(x).all():
        raise FloatingPointError("Langevin refinement diverged (NaN or infinity): lower step")
    return x
