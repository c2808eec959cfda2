"""Statistics shared by the tests: Monte-Carlo floors and two-sample distances."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mean_floor(cov: Tensor, n: int) -> float:
    r"""Expected error :math:`\sqrt{E\|\bar{x} - m\|^2} = \sqrt{\mathrm{tr}(C) / n}` of the mean
    of ``n`` exact samples."""
    return math.sqrt(float(torch.diagonal(cov).sum()) / n)


def cov_floor(cov: Tensor, n: int) -> float:
    r"""Expected Frobenius error of the sample covariance of ``n`` exact Gaussian samples:
    :math:`\sqrt{(\|C\|_F^2 + \mathrm{tr}(C)^2) / n}`."""
    return math.sqrt((float(cov.square().sum()) + float(torch.diagonal(cov).sum()) ** 2) / n)


def moment_errors(x: Tensor, mean: Tensor, cov: Tensor) -> tuple[float, float]:
    """Mean and covariance errors of samples ``x`` (N, D) in units of their MC floors."""
    n = x.shape[0]
    x = x.reshape(n, -1).to(torch.float64)
    mean, cov = mean.reshape(-1).to(torch.float64), cov.to(torch.float64)
    e_mean = float((x.mean(0) - mean).norm()) / mean_floor(cov, n)
    e_cov = float((torch.cov(x.T) - cov).norm()) / cov_floor(cov, n)
    return e_mean, e_cov


def sliced_w1(x: Tensor, y: Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between equal-size sample sets ``(N, D)``."""
    g = torch.Generator().manual_seed(seed)
    x, y = x.to(torch.float64), y.to(torch.float64)
    u = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=0)
    px, _ = torch.sort(x @ u, dim=0)
    py, _ = torch.sort(y @ u, dim=0)
    return float((px - py).abs().mean())


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance :math:`2E\\|X-Y\\| - E\\|X-X'\\| - E\\|Y-Y'\\|` (V-statistic)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
