r"""The toy problem of empirical Bayes (Rozet et al. 2024): a smooth random 1-D manifold in
:math:`\mathbb{R}^5`, observed through one random :math:`2 \times 5` projection per sample.

The manifold is a random smooth curve :math:`x(u)`, :math:`u \sim \mathcal{U}(0, 1)`, made of
random Fourier features with decaying amplitudes,

.. math:: x(u) = \sum_{k=1}^{K} \frac{a_k \cos(\pi k u) + b_k \sin(\pi k u)}{k^{p}}, \qquad
    a_k, b_k \sim \mathcal{N}(0, I_D),

then standardised (each coordinate of zero mean and unit variance under :math:`u`). Each
observation is :math:`y_i = A_i x_i + \sigma_y \epsilon_i` with :math:`A_i` a ``2 x 5`` matrix
of independent Gaussian rows normalised to unit norm, and :math:`\sigma_y = 0.01`: no single
observation locates :math:`x_i`, only their population does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..em import Matrices, Observations

__all__ = ["Manifold", "random_projections", "manifold_problem", "ManifoldProblem"]


class Manifold:
    r"""A random smooth curve in :math:`\mathbb{R}^D` (see the module docstring).

    Arguments:
        features: The ambient dimension ``D`` (5 in the paper).
        frequencies: The number ``K`` of Fourier frequencies (the curve's wiggliness).
        decay: The exponent ``p`` of the amplitudes :math:`k^{-p}`.
        seed: Seed of the random curve.
    """

    def __init__(self, features: int = 5, frequencies: int = 3, decay: float = 1.0,
                 seed: int = 0) -> None:
        if features < 1 or frequencies < 1:
            raise ValueError(f"features and frequencies must be positive, got {features}, "
                             f"{frequencies}")
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        k = torch.arange(1, frequencies + 1, dtype=f64)
        scale = (k ** -float(decay))[:, None]
        self.features, self.frequencies = int(features), int(frequencies)
        self.a = torch.randn(frequencies, features, generator=g, dtype=f64) * scale
        self.b = torch.randn(frequencies, features, generator=g, dtype=f64) * scale
        self.k = k
        u = torch.linspace(0, 1, 1 << 16, dtype=f64)
        raw = self._raw(u)
        self.center, self.std = raw.mean(0), raw.std(0)

    def _raw(self, u: Tensor) -> Tensor:
        phase = math.pi * u.to(torch.float64)[:, None] * self.k  # (n, K)
        return torch.cos(phase) @ self.a + torch.sin(phase) @ self.b

    def __call__(self, u: Tensor) -> Tensor:
        """Points of the curve at latents ``u`` ``(n,)`` in [0, 1]: ``(n, D)`` float64."""
        u = torch.as_tensor(u)
        if u.dim() != 1:
            raise ValueError(f"u must have shape (n,), got {tuple(u.shape)}")
        return (self._raw(u) - self.center) / self.std

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points of the curve at :math:`u \\sim \\mathcal{U}(0, 1)`: ``(n, D)`` float64."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        return self(torch.rand(n, generator=generator, dtype=torch.float64))


def random_projections(n: int, rows: int = 2, features: int = 5,
                       generator: torch.Generator | None = None) -> Tensor:
    """``n`` random ``rows x features`` matrices with independent Gaussian rows of unit norm,
    ``(n, rows, features)`` float64."""
    if n < 1 or rows < 1 or features < 1:
        raise ValueError(f"n, rows and features must be positive, got {n}, {rows}, {features}")
    A = torch.randn(n, rows, features, generator=generator, dtype=torch.float64)
    return A / A.norm(dim=2, keepdim=True)


@dataclass
class ManifoldProblem:
    """Hidden states ``x`` ``(N, D)``, their observations, and the manifold."""

    x: Tensor
    observations: Observations
    manifold: Manifold


def manifold_problem(n: int, features: int = 5, rows: int = 2, noise: float = 0.01,
                     frequencies: int = 3, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> ManifoldProblem:
    r"""``n`` states of the manifold, each observed through its own random projection:
    :math:`y_i = A_i x_i + \sigma_y \epsilon_i` (:class:`plausible.em.Matrices` operators).

    The curve depends on ``seed``; the states, projections and noise on ``seed + 1``."""
    manifold = Manifold(features, frequencies, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = manifold.sample(n, generator=g)
    A = Matrices(random_projections(n, rows, features, generator=g).to(dtype))
    obs = Observations.simulate(x.to(dtype), A, noise, generator=g)
    return ManifoldProblem(x.to(dtype), obs, manifold)
