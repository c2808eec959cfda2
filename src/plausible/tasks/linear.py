r"""Linear-Gaussian Markov chains with exact answers, and the Kalman (RTS) smoother.

An autoregressive chain of order :math:`k` on states :math:`x_i \in \mathbb{R}^D`,

.. math:: x_i - \mu = \sum_{j=1}^{k} A_j (x_{i-j} - \mu) + w_i, \qquad
    w_i \sim \mathcal{N}(0, Q),

started from its stationary distribution, is Gaussian over any stretch of ``L`` states, with
block-Toeplitz covariance :math:`\mathrm{Cov}(x_{i+h}, x_i) = \Gamma_h`,
:math:`\Gamma_h = \sum_j A_j \Gamma_{h-j}` for :math:`h \geq 1` and
:math:`\Gamma_{-h} = \Gamma_h^\top`. Its companion form :math:`z_i = (x_i, x_{i-1}, \dots,
x_{i-k+1})` is a first-order chain :math:`z_i = F z_{i-1} + (w_i, 0, \dots, 0)` whose
stationary covariance solves the discrete Lyapunov equation :math:`\Sigma = F \Sigma F^\top
+ Q_c`; its blocks are :math:`\Gamma_0, \dots, \Gamma_{k-1}`.

:class:`ARChain` gives the exact trajectory Gaussian, the exact denoisers of windows of
``2k'+1`` states and of whole trajectories, exact samples and log-densities; and
:func:`kalman_smoother` the exact posterior marginals and evidence of linear-Gaussian
state-space models with missing observations (an AR chain through its companion form:
:meth:`ARChain.smooth`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from ..denoisers import GaussianDenoiser
from ..schedules import Schedule

__all__ = ["ARChain", "kalman_smoother", "companion_form"]

_f64 = torch.float64


def _matrix(a: Any, shape: tuple[int, int], name: str) -> Tensor:
    a = torch.as_tensor(a, dtype=_f64)
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} must be finite")
    return a


def _covariance(a: Any, n: int, name: str, definite: bool) -> Tensor:
    """A scalar variance, an ``(n,)`` diagonal or an ``(n, n)`` matrix, as ``(n, n)`` float64,
    checked symmetric and positive (semi-)definite."""
    a = torch.as_tensor(a, dtype=_f64)
    if a.dim() == 0:
        a = a * torch.eye(n, dtype=_f64)
    elif a.dim() == 1:
        if a.shape != (n,):
            raise ValueError(f"{name} as a diagonal must have shape ({n},), got {tuple(a.shape)}")
        a = torch.diag(a)
    if tuple(a.shape) != (n, n):
        raise ValueError(f"{name} must be a scalar, a diagonal ({n},) or a matrix ({n}, {n}), "
                         f"got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} must be finite")
    scale = float(a.abs().max()) if a.numel() else 0.0
    if not torch.allclose(a, a.T, rtol=1e-8, atol=1e-12 * max(scale, 1e-300)):
        raise ValueError(f"{name} must be symmetric")
    a = (a + a.T) / 2
    lam = torch.linalg.eigvalsh(a) if n else a.new_zeros(0)
    bound = -1e-10 * max(scale, 1e-300)
    if definite and not bool((lam > 0).all()):
        raise ValueError(f"{name} must be positive definite (smallest eigenvalue "
                         f"{float(lam.min()):.3g})")
    if not definite and not bool((lam >= bound).all()):
        raise ValueError(f"{name} must be positive semi-definite (smallest eigenvalue "
                         f"{float(lam.min()):.3g})")
    return a


def _solve_psd(P: Tensor, B: Tensor) -> Tensor:
    r""":math:`P^{-1} B` for a symmetric positive semi-definite ``P`` (Cholesky; the
    pseudo-inverse where ``P`` is singular)."""
    chol, info = torch.linalg.cholesky_ex(P)
    if int(info) == 0:
        return torch.cholesky_solve(B, chol)
    return torch.linalg.pinv(P, hermitian=True) @ B


def kalman_smoother(
    y: Tensor,
    F: Tensor,
    Q: Tensor,
    H: Tensor,
    R: Tensor | float,
    m0: Tensor,
    P0: Tensor,
    observed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Rauch-Tung-Striebel smoother of a linear-Gaussian state-space model,

    .. math:: x_0 \sim \mathcal{N}(m_0, P_0), \quad x_i = F x_{i-1} + \mathcal{N}(0, Q), \quad
        y_i = H x_i + \mathcal{N}(0, R), \qquad i = 0, \dots, L - 1.

    Forward (Kalman filter): :math:`m^-_i = F m_{i-1}`, :math:`P^-_i = F P_{i-1} F^\top + Q`
    (:math:`m^-_0 = m_0`, :math:`P^-_0 = P_0`), then with the observed entries :math:`o` of
    :math:`y_i`: :math:`S = H_o P^-_i H_o^\top + R_{oo}`, :math:`K = P^-_i H_o^\top S^{-1}`,
    :math:`m_i = m^-_i + K (y_{i,o} - H_o m^-_i)`, :math:`P_i = (I - K H_o) P^-_i (I - K
    H_o)^\top + K R_{oo} K^\top` (Joseph form). Backward: :math:`G_i = P_i F^\top
    (P^-_{i+1})^{-1}`, :math:`m^s_i = m_i + G_i (m^s_{i+1} - m^-_{i+1})`, :math:`P^s_i = P_i +
    G_i (P^s_{i+1} - P^-_{i+1}) G_i^\top`. The log-evidence is :math:`\sum_i \log
    \mathcal{N}(y_{i,o}; H_o m^-_i, S_i)`. Everything is computed in float64.

    ``Q`` and ``P0`` may be singular (e.g. the companion form of an AR(k) chain, see
    :func:`companion_form` and :meth:`ARChain.smooth`); ``R`` must be positive definite.

    Arguments:
        y: Observations ``(L, M)``. A NaN entry is unobserved (a NaN row: no observation at
            that step; a partial row observes the finite entries only).
        F: Transition matrix ``(D, D)``.
        Q: Transition noise covariance ``(D, D)`` (or ``(D,)`` diagonal, or a scalar).
        H: Observation matrix ``(M, D)``.
        R: Observation noise covariance ``(M, M)`` (or ``(M,)`` diagonal, or a scalar).
        m0: Mean of the first state ``(D,)``; P0: its covariance ``(D, D)``.
        observed: Optional boolean ``(L,)``: steps whose observation is used (False drops the
            whole row, whatever it holds).

    Returns:
        ``(means (L, D), covs (L, D, D), log_evidence ())``, float64: the smoothed marginals
        :math:`p(x_i \mid y_{0:L-1})` and :math:`\log p(y_{0:L-1})` (0 when nothing is
        observed).

    Raises:
        ValueError: On shapes that do not match, non-finite matrices, infinite observations,
            a covariance that is not symmetric positive (semi-)definite, or a non-boolean
            ``observed`` of the wrong length.
    """
    F = torch.as_tensor(F, dtype=_f64)
    if F.dim() != 2 or F.shape[0] != F.shape[1]:
        raise ValueError(f"F must be a square matrix (D, D), got shape {tuple(F.shape)}")
    D = F.shape[0]
    F = _matrix(F, (D, D), "F")
    y = torch.as_tensor(y, dtype=_f64)
    if y.dim() != 2:
        raise ValueError(f"y must have shape (L, M), got {tuple(y.shape)}")
    L, M = y.shape
    if L < 1:
        raise ValueError("y must hold at least one step")
    if torch.isinf(y).any():
        raise ValueError("y must be finite or NaN (NaN marks a missing entry), got infinity")
    H = _matrix(H, (M, D), "H")
    Q = _covariance(Q, D, "Q", definite=False)
    R = _covariance(R, M, "R", definite=True)
    m0 = torch.as_tensor(m0, dtype=_f64)
    if m0.shape != (D,) or not torch.isfinite(m0).all():
        raise ValueError(f"m0 must be a finite vector of shape ({D},), got {tuple(m0.shape)}")
    P0 = _covariance(P0, D, "P0", definite=False)
    mask = ~torch.isnan(y)
    if observed is not None:
        observed = torch.as_tensor(observed)
        if observed.dtype != torch.bool or observed.shape != (L,):
            raise ValueError(f"observed must be a boolean tensor of shape ({L},), got "
                             f"{observed.dtype} {tuple(observed.shape)}")
        mask = mask & observed[:, None].to(mask.device)

    m_pred = torch.empty(L, D, dtype=_f64)
    P_pred = torch.empty(L, D, D, dtype=_f64)
    m_filt = torch.empty(L, D, dtype=_f64)
    P_filt = torch.empty(L, D, D, dtype=_f64)
    eye = torch.eye(D, dtype=_f64)
    log_evidence = torch.zeros((), dtype=_f64)
    m, P = m0, P0
    for i in range(L):
        if i > 0:
            m = F @ m
            P = F @ P @ F.T + Q
            P = (P + P.T) / 2
        m_pred[i], P_pred[i] = m, P
        o = mask[i].nonzero().squeeze(1)
        if o.numel() > 0:
            Ho, Ro = H[o], R[o][:, o]
            S = Ho @ P @ Ho.T + Ro
            S = (S + S.T) / 2
            chol = torch.linalg.cholesky(S)
            PHt = P @ Ho.T
            K = torch.cholesky_solve(PHt.T, chol).T
            r = y[i, o] - Ho @ m
            m = m + K @ r
            IKH = eye - K @ Ho
            P = IKH @ P @ IKH.T + K @ Ro @ K.T
            P = (P + P.T) / 2
            z = torch.linalg.solve_triangular(chol, r[:, None], upper=False)[:, 0]
            log_evidence = log_evidence - 0.5 * (z @ z) - torch.log(torch.diagonal(chol)).sum() \
                - 0.5 * o.numel() * math.log(2 * math.pi)
        m_filt[i], P_filt[i] = m, P

    means = torch.empty(L, D, dtype=_f64)
    covs = torch.empty(L, D, D, dtype=_f64)
    means[-1], covs[-1] = m_filt[-1], P_filt[-1]
    for i in range(L - 2, -1, -1):
        # G = P_i F^T (P^-_{i+1})^{-1} = ((P^-_{i+1})^{-1} F P_i)^T
        G = _solve_psd(P_pred[i + 1], F @ P_filt[i]).T
        means[i] = m_filt[i] + G @ (means[i + 1] - m_pred[i + 1])
        C = P_filt[i] + G @ (covs[i + 1] - P_pred[i + 1]) @ G.T
        covs[i] = (C + C.T) / 2
    return means, covs, log_evidence


def companion_form(coefficients: Tensor, noise_cov: Tensor) -> tuple[Tensor, Tensor]:
    r"""The first-order (companion) form of :math:`x_i = \sum_{j=1}^k A_j x_{i-j} + w_i`,
    :math:`w_i \sim \mathcal{N}(0, Q)`, on :math:`z_i = (x_i, x_{i-1}, \dots, x_{i-k+1})`:

    .. math:: F = \begin{pmatrix} A_1 & A_2 & \cdots & A_k \\ I & 0 & \cdots & 0 \\
        & \ddots & & \vdots \\ 0 & \cdots & I & 0 \end{pmatrix}, \qquad
        Q_c = \begin{pmatrix} Q & 0 \\ 0 & 0 \end{pmatrix}.

    Arguments:
        coefficients: ``(k, D, D)`` matrices :math:`A_1, \dots, A_k`.
        noise_cov: ``(D, D)`` covariance :math:`Q`.

    Returns:
        ``(F, Q_c)``, both ``(k D, k D)`` float64.
    """
    A = torch.as_tensor(coefficients, dtype=_f64)
    if A.dim() != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"coefficients must have shape (k, D, D), got {tuple(A.shape)}")
    k, D = A.shape[0], A.shape[1]
    Q = _covariance(noise_cov, D, "noise_cov", definite=False)
    F = torch.zeros(k * D, k * D, dtype=_f64)
    F[:D] = A.permute(1, 0, 2).reshape(D, k * D)
    if k > 1:
        F[D:, : (k - 1) * D] = torch.eye((k - 1) * D, dtype=_f64)
    Qc = torch.zeros(k * D, k * D, dtype=_f64)
    Qc[:D, :D] = Q
    return F, Qc


class ARChain:
    r"""A stationary linear-Gaussian autoregressive chain of order :math:`k`,

    .. math:: x_i - \mu = \sum_{j=1}^{k} A_j (x_{i-j} - \mu) + w_i, \qquad
        w_i \sim \mathcal{N}(0, Q), \qquad x_i \in \mathbb{R}^D,

    started from its stationary distribution (exact, from the discrete Lyapunov equation of
    the companion form). Trajectories of ``L`` states have shape ``(L, D)``.

    Arguments:
        coefficients: ``(k, D, D)`` matrices :math:`A_1, \dots, A_k` (``(k,)`` for scalar
            states, ``D = 1``).
        noise_cov: :math:`Q`, ``(D, D)``, a ``(D,)`` diagonal or a scalar; positive definite.
        mean: :math:`\mu`, ``(D,)`` (default 0).

    Raises:
        ValueError: On bad shapes, a non-positive-definite :math:`Q`, or a chain that is not
            stationary (spectral radius of the companion matrix >= 1).

    Example:
        >>> chain = ARChain(torch.tensor([0.9], dtype=torch.float64), 0.19)  # AR(1), variance 1
        >>> mean, cov = chain.trajectory_gaussian(5)
        >>> round(float(cov[0, 4]), 12)  # 0.9 ** 4
        0.6561
    """

    def __init__(self, coefficients: Tensor, noise_cov: Tensor | float,
                 mean: Tensor | None = None) -> None:
        A = torch.as_tensor(coefficients, dtype=_f64)
        if A.dim() == 1:
            A = A[:, None, None]
        if A.dim() != 3 or A.shape[1] != A.shape[2] or A.shape[0] < 1:
            raise ValueError(f"coefficients must have shape (k, D, D) with k >= 1 (or (k,) for "
                             f"scalar states), got {tuple(A.shape)}")
        if not torch.isfinite(A).all():
            raise ValueError("coefficients must be finite")
        self.order, self.dim = int(A.shape[0]), int(A.shape[1])
        D = self.dim
        self.coefficients = A
        self.noise_cov = _covariance(noise_cov, D, "noise_cov", definite=True)
        if mean is None:
            mean = torch.zeros(D, dtype=_f64)
        self.mean = torch.as_tensor(mean, dtype=_f64)
        if self.mean.shape != (D,) or not torch.isfinite(self.mean).all():
            raise ValueError(f"mean must be a finite vector of shape ({D},), got "
                             f"{tuple(self.mean.shape)}")
        self.F, self.Qc = companion_form(A, self.noise_cov)
        radius = float(np.abs(np.linalg.eigvals(self.F.numpy())).max())
        if not radius < 1:
            raise ValueError(f"the chain is not stationary: the companion matrix has spectral "
                             f"radius {radius:.6g} >= 1")
        self.spectral_radius = radius
        Sigma = scipy.linalg.solve_discrete_lyapunov(self.F.numpy(), self.Qc.numpy())
        Sigma = torch.from_numpy(np.ascontiguousarray(Sigma)).to(_f64)
        self.stationary_companion_cov = (Sigma + Sigma.T) / 2
        self._gammas = self._autocov_blocks(self.order)

    def _autocov_blocks(self, n: int) -> Tensor:
        r"""Autocovariances :math:`\Gamma_h = \mathrm{Cov}(x_{i+h}, x_i)`, ``(n, D, D)``,
        :math:`h = 0, \dots, n - 1`."""
        k, D = self.order, self.dim
        Sigma = self.stationary_companion_cov
        # block (0, b) of the companion covariance is Cov(x_i, x_{i-b}) = Gamma_b
        gammas = [Sigma[:D, b * D:(b + 1) * D] for b in range(min(k, n))]
        cached = getattr(self, "_gammas", None)
        if cached is not None and cached.shape[0] >= n:
            return cached[:n]
        if cached is not None:
            gammas = list(cached)
        for h in range(len(gammas), n):
            g = torch.zeros(D, D, dtype=_f64)
            for j in range(1, k + 1):
                gj = gammas[h - j] if h - j >= 0 else gammas[j - h].T
                g = g + self.coefficients[j - 1] @ gj
            gammas.append(g)
        out = torch.stack(gammas[:n]) if n > 0 else torch.zeros(0, D, D, dtype=_f64)
        if cached is None or out.shape[0] > cached.shape[0]:
            self._gammas = out
        return out

    def autocovariance(self, n: int) -> Tensor:
        r"""The stationary autocovariances :math:`\Gamma_0, \dots, \Gamma_{n-1}`,
        :math:`\Gamma_h = \mathrm{Cov}(x_{i+h}, x_i)`, ``(n, D, D)`` float64."""
        return self._autocov_blocks(int(n)).clone()

    def trajectory_gaussian(self, L: int) -> tuple[Tensor, Tensor]:
        r"""The exact law of ``L`` consecutive states: mean ``(L, D)`` and covariance
        ``(L D, L D)`` (float64) on the flattened trajectory (time-major), block
        :math:`(i, j) = \Gamma_{i - j}` (:math:`\Gamma_{-h} = \Gamma_h^\top`)."""
        L = _length(L, 1)
        D = self.dim
        G = self._autocov_blocks(L)
        i = torch.arange(L)
        lag = i[:, None] - i[None, :]
        blocks = G[lag.abs()]  # (L, L, D, D)
        blocks = torch.where((lag < 0)[..., None, None], blocks.transpose(-1, -2), blocks)
        cov = blocks.permute(0, 2, 1, 3).reshape(L * D, L * D)
        return self.mean.expand(L, D).clone(), (cov + cov.T) / 2

    def window_denoiser(self, schedule: Schedule | None = None, order: int | None = None,
                        flatten: bool = False) -> GaussianDenoiser:
        r"""The exact denoiser of the stationary law of ``W = 2 order + 1`` consecutive states
        (default ``order`` = the chain's order): a :class:`~plausible.GaussianDenoiser` of
        states of shape ``(W, D)``, or ``(W D,)`` with ``flatten=True`` (the layout of
        :class:`plausible.data.Windows` ``(..., flatten=True)``)."""
        order = self.order if order is None else int(order)
        if order < 0:
            raise ValueError(f"order must be non-negative, got {order}")
        W = 2 * order + 1
        mean, cov = self.trajectory_gaussian(W)
        if flatten:
            mean = mean.reshape(W * self.dim)
        return GaussianDenoiser(mean, cov, schedule)

    def trajectory_denoiser(self, L: int, schedule: Schedule | None = None) -> GaussianDenoiser:
        """The exact denoiser of whole trajectories of ``L`` states, shape ``(L, D)``."""
        mean, cov = self.trajectory_gaussian(L)
        return GaussianDenoiser(mean, cov, schedule)

    def sample(self, n: int, L: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact stationary trajectories ``(n, L, D)`` (float64), simulated step by step."""
        n, L = _length(n, 1, "n"), _length(L, 1)
        k, D = self.order, self.dim
        chol = torch.linalg.cholesky(self.stationary_companion_cov)
        z = torch.randn(n, k * D, generator=generator, dtype=_f64) @ chol.T
        # z = (x_{k-1}, ..., x_0) of the first k states (centred)
        first = z.reshape(n, k, D).flip(1)
        states = list(first.unbind(1))[:L]
        cq = torch.linalg.cholesky(self.noise_cov)
        for i in range(k, L):
            x = torch.randn(n, D, generator=generator, dtype=_f64) @ cq.T
            for j in range(1, k + 1):
                x = x + states[i - j] @ self.coefficients[j - 1].T
            states.append(x)
        return torch.stack(states, 1) + self.mean

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Exact log-density of trajectories ``(B, L, D)``: the stationary law of the first
        :math:`\min(k, L)` states times the transitions, ``(B,)`` float64."""
        x = torch.as_tensor(x, dtype=_f64)
        if x.dim() != 3 or x.shape[2] != self.dim:
            raise ValueError(f"x must have shape (B, L, {self.dim}), got {tuple(x.shape)}")
        B, L, D = x.shape
        k = min(self.order, L)
        xc = x - self.mean
        m, C = self.trajectory_gaussian(k)
        head = GaussianDenoiser(torch.zeros(k, D, dtype=_f64), C).log_prob(xc[:, :k])
        if L <= self.order:
            return head
        pred = torch.zeros(B, L - self.order, D, dtype=_f64)
        for j in range(1, self.order + 1):
            pred = pred + xc[:, self.order - j:L - j] @ self.coefficients[j - 1].T
        r = xc[:, self.order:] - pred
        chol = torch.linalg.cholesky(self.noise_cov)
        z = torch.linalg.solve_triangular(chol, r.reshape(-1, D).T, upper=False).T
        quad = z.square().sum(-1).reshape(B, -1).sum(-1)
        n = (L - self.order)
        logdet = 2 * torch.log(torch.diagonal(chol)).sum()
        return head - 0.5 * (quad + n * logdet + n * D * math.log(2 * math.pi))

    def state_space(self) -> dict[str, Tensor]:
        r"""The companion state-space model of :func:`kalman_smoother` for the centred chain:
        ``{"F", "Q", "m0", "P0", "lift"}`` with ``lift`` ``(D, k D)`` the selector of the
        current state :math:`x_i - \mu = \text{lift}\, z_i` (an observation matrix ``H`` of
        the states becomes ``H @ lift``). The first companion state
        :math:`z_0 = (x_0, x_{-1}, \dots)` is stationary (the past states are those of the
        stationary chain before the trajectory), which leaves the law of
        :math:`x_0, \dots, x_{L-1}` unchanged."""
        k, D = self.order, self.dim
        lift = torch.zeros(D, k * D, dtype=_f64)
        lift[:, :D] = torch.eye(D, dtype=_f64)
        return {"F": self.F.clone(), "Q": self.Qc.clone(), "m0": torch.zeros(k * D, dtype=_f64),
                "P0": self.stationary_companion_cov.clone(), "lift": lift}

    def smooth(self, y: Tensor, H: Tensor, R: Tensor | float,
               observed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        r"""Exact posterior marginals of the states given :math:`y_i = H x_i +
        \mathcal{N}(0, R)` (``y`` ``(L, M)``, NaN where missing), by :func:`kalman_smoother`
        on the companion form.

        Returns:
            ``(means (L, D), covs (L, D, D), log_evidence ())`` in float64.
        """
        ss = self.state_space()
        H = torch.as_tensor(H, dtype=_f64)
        if H.dim() != 2 or H.shape[1] != self.dim:
            raise ValueError(f"H must have shape (M, {self.dim}), got {tuple(H.shape)}")
        y = torch.as_tensor(y, dtype=_f64)
        if y.dim() != 2 or y.shape[1] != H.shape[0]:
            raise ValueError(f"y must have shape (L, {H.shape[0]}), got {tuple(y.shape)}")
        yc = y - H @ self.mean
        means, covs, log_ev = kalman_smoother(yc, ss["F"], ss["Q"], H @ ss["lift"], R,
                                              ss["m0"], ss["P0"], observed)
        D = self.dim
        return means[:, :D] + self.mean, covs[:, :D, :D].contiguous(), log_ev

    def __repr__(self) -> str:
        return (f"ARChain(order={self.order}, dim={self.dim}, "
                f"spectral_radius={self.spectral_radius:.4g})")


def _length(L: Any, minimum: int, name: str = "L") -> int:
    if isinstance(L, bool) or int(L) != L or int(L) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {L!r}")
    return int(L)
