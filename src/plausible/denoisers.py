r"""Denoisers: the one interface that every sampler consumes.

A denoiser approximates the posterior mean of the clean state given a noisy one,

.. math:: d(x_t, t) \approx \mathbb{E}[x \mid x_t], \qquad x_t = \alpha_t x + \sigma_t \epsilon,

and, by Tweedie's formulas, gives the score and the posterior covariance

.. math:: \nabla_{x_t} \log p(x_t) = \frac{\alpha_t d(x_t, t) - x_t}{\sigma_t^2}, \qquad
    \mathbb{V}[x \mid x_t] = \frac{\sigma_t^2}{\alpha_t} \frac{\partial d(x_t, t)}{\partial x_t}.

Shapes: a denoiser of states of shape ``S`` (its :attr:`~Denoiser.shape`) takes ``x_t`` of
shape ``(B, *S)`` and ``t`` of shape ``()`` or ``(B,)``, and returns ``(B, *S)``.

This module holds the base class :class:`Denoiser` (``Denoiser(backbone, schedule)`` builds a
trainable :class:`Preconditioned` denoiser), and the exact denoisers of Gaussian
(:class:`GaussianDenoiser`) and Gaussian-mixture (:class:`GaussianMixtureDenoiser`) priors,
which know their exact posteriors under linear-Gaussian observations.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .schedules import Schedule, VPSchedule

__all__ = [
    "Denoiser",
    "Preconditioned",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "gaussian_condition",
    "expand_t",
    "right_broadcast",
]


def right_broadcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshapes a ``(B,)`` or ``()`` tensor ``v`` to broadcast against ``x`` ``(B, ...)``."""
    if v.dim() == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def expand_t(t: Tensor | float, x_t: Tensor) -> Tensor:
    """Checks ``t`` against ``x_t`` and returns it as a ``(B,)`` tensor of ``x_t``'s dtype.

    Raises:
        ValueError: If ``t`` is not of shape ``()`` or ``(B,)`` with ``B = x_t.shape[0]``.
    """
    dtype = x_t.dtype if x_t.is_floating_point() else torch.get_default_dtype()
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=dtype, device=x_t.device)
    if t.dim() == 0:
        t = t.expand(x_t.shape[0])
    elif t.shape != x_t.shape[:1]:
        raise ValueError(
            f"t must have shape () or (B,) = ({x_t.shape[0]},) for x_t of shape "
            f"{tuple(x_t.shape)}, got shape {tuple(t.shape)}"
        )
    return t.to(dtype=dtype, device=x_t.device)


class Denoiser(nn.Module):
    r"""Base class of denoisers :math:`d(x_t, t) \approx \mathbb{E}[x \mid x_t]`.

    Every denoiser has a :attr:`schedule` (the perturbation kernel) and a :attr:`shape`
    (the shape ``S`` of one state). Subclasses implement :meth:`forward`.

    Calling ``Denoiser(backbone, schedule, ...)`` directly builds the trainable, EDM-
    preconditioned :class:`Preconditioned` denoiser (the public API's ``pl.Denoiser``).
    """

    schedule: Schedule
    shape: tuple[int, ...] | None
    #: What :func:`~plausible.sample` uses when called without ``sampler``: keys ``sampler``,
    #: ``eta``, ``corrections``, ``tau`` (empty: ``"ddpm"``). :class:`~plausible.MMPS`
    #: overrides it.
    sampling: ClassVar[dict[str, Any]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Denoiser:
        if cls is Denoiser:
            return super().__new__(Preconditioned)
        return super().__new__(cls)

    def forward(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def check(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Validates ``x_t`` (shape ``(B, *S)``) and ``t``; returns ``t`` as a ``(B,)`` tensor.

        Raises:
            TypeError: If ``x_t`` is not a floating-point tensor.
            ValueError: If the shapes do not match ``(B, *self.shape)`` and ``()`` / ``(B,)``.
        """
        if not isinstance(x_t, Tensor) or not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point tensor, got {type(x_t).__name__}"
                            + (f" of dtype {x_t.dtype}" if isinstance(x_t, Tensor) else ""))
        if self.shape is not None and tuple(x_t.shape[1:]) != tuple(self.shape):
            raise ValueError(
                f"x_t must have shape (B, {', '.join(map(str, self.shape))}) for a denoiser of "
                f"states of shape {tuple(self.shape)}, got {tuple(x_t.shape)}"
            )
        return expand_t(t, x_t)

    def score(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        r"""Tweedie score :math:`(\alpha_t d(x_t, t) - x_t) / \sigma_t^2`, shape ``(B, *S)``."""
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t)
        alpha, sigma = right_broadcast(alpha, x_t), right_broadcast(sigma, x_t)
        return (alpha * self(x_t, t, **cond) - x_t) / sigma**2

    def tweedie_cov(self, x_t: Tensor, t: Tensor | float, v: Tensor, **cond: Any) -> Tensor:
        r"""Tweedie covariance-vector product
        :math:`\mathbb{V}[x \mid x_t]\, v = \frac{\sigma_t^2}{\alpha_t} J^\top v`, with
        :math:`J = \partial d / \partial x_t`, by one vector-Jacobian product.

        ``x_t`` and ``v`` have shape ``(B, *S)``; returns ``(B, *S)``.
        """
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t)
        with torch.enable_grad():
            _, vjp = torch.func.vjp(lambda x: self(x, t, **cond), x_t.detach())
            (jv,) = vjp(v)
        return right_broadcast(sigma**2 / alpha, x_t) * jv


class Preconditioned(Denoiser):
    r"""Trainable denoiser with EDM preconditioning (Karras et al., 2022).

    With :math:`\rho_t = \sigma_t / \alpha_t` and :math:`\tilde{x}_t = x_t / \alpha_t`
    (a variance-exploding state of noise :math:`\rho_t`),

    .. math:: d(x_t, t) = c_\text{skip} \tilde{x}_t + c_\text{out}
        F\big(c_\text{in} \tilde{x}_t, c_\text{noise}\big),

    :math:`c_\text{skip} = s^2 / (\rho^2 + s^2)`, :math:`c_\text{out} = \rho s /
    \sqrt{\rho^2 + s^2}`, :math:`c_\text{in} = 1 / \sqrt{\rho^2 + s^2}`,
    :math:`c_\text{noise} = \log(\rho) / 4`, where :math:`s` is ``sigma_data``.

    A per-sample Gaussian baseline :math:`\mathcal{N}(m, \operatorname{diag}(s)^2)` (the
    keyword arguments ``loc`` :math:`m` and ``scale`` :math:`s`, both broadcastable to
    ``(B, *S)``, e.g. a conditional mean and residual scale) generalises this to

    .. math:: d(x_t, t) = m + c_\text{skip} (\tilde{x}_t - m) + c_\text{out}
        F\big(c_\text{in} (\tilde{x}_t - m), c_\text{noise}\big),

    with the elementwise coefficients of :math:`s`: the exact denoiser of that Gaussian when
    :math:`F = 0`, and unit-variance network inputs and targets whatever its width. The
    ``"edm"`` loss weight becomes elementwise too.

    Arguments:
        backbone: A network ``F(x, c_noise, context=None)`` with input and output of shape
            ``(B, *S)`` (for example :class:`plausible.nets.ResMLP` or
            :class:`plausible.nets.UNet`).
        schedule: The noise schedule (default :class:`~plausible.schedules.VPSchedule`).
        sigma_data: The standard deviation of the (standardised) data.
        shape: The state shape ``S``; taken from ``backbone.shape`` when it has one.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: Schedule | None = None,
        sigma_data: float = 1.0,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.backbone = backbone
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.sigma_data = float(sigma_data)
        if shape is None:
            shape = getattr(backbone, "shape", None)
        self.shape = tuple(int(s) for s in shape) if shape is not None else None

    def forward(self, x_t: Tensor, t: Tensor | float, *, loc: Tensor | None = None,
                scale: Tensor | None = None, **cond: Any) -> Tensor:
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t)
        rho = right_broadcast(sigma / alpha, x_t)
        s = self.sigma_data if scale is None else scale.to(x_t)
        c_skip = s**2 / (rho**2 + s**2)
        c_out = rho * s / torch.sqrt(rho**2 + s**2)
        c_in = 1 / torch.sqrt(rho**2 + s**2)
        c_noise = torch.log(sigma / alpha) / 4
        x_ve = x_t / right_broadcast(alpha, x_t)
        if loc is not None:
            loc = loc.to(x_t)
            x_ve = x_ve - loc
        param = next(self.backbone.parameters(), None)
        dtype = param.dtype if param is not None else x_t.dtype
        out = self.backbone((c_in * x_ve).to(dtype), c_noise.to(dtype), **cond).to(x_t.dtype)
        d = c_skip * x_ve + c_out * out
        return d if loc is None else d + loc

    def draw_noise(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        t_distribution: str = "uniform",
        log_rho: tuple[float, float] = (-1.2, 1.2),
        **_: Any,
    ) -> dict[str, Tensor]:
        r"""Draws the times and the noise of the denoising loss for a batch ``x`` ``(B, *S)``.

        Arguments:
            t_distribution: ``"uniform"`` on [0, 1], or ``"lognormal"`` (EDM: :math:`\log
                \rho \sim \mathcal{N}(\mu, s^2)`, mapped to t and clipped to [0, 1]).
            log_rho: ``(mu, s)`` of the log-normal levels (EDM's ``(-1.2, 1.2)``).

        Returns:
            ``{"t": (B,), "eps": (B, *S)}``, to pass to :meth:`loss` (drawing them apart from
            the loss lets data-parallel training slice one global draw between processes).
        """
        B = x.shape[0]
        if t_distribution == "uniform":
            t = torch.rand(B, generator=generator, dtype=x.dtype, device=x.device)
        elif t_distribution == "lognormal":
            mu, s = (float(v) for v in log_rho)
            if not (math.isfinite(mu) and s > 0):
                raise ValueError(f"log_rho must be (mean, std) with std > 0, got {log_rho!r}")
            log_rho_ = mu + s * torch.randn(
                B, generator=generator, dtype=torch.float64, device=x.device
            )
            t = self.schedule.t_of_ratio(torch.exp(log_rho_)).to(x.dtype)
        else:
            raise ValueError(
                f"t_distribution must be 'uniform' or 'lognormal', got {t_distribution!r}"
            )
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return {"t": t, "eps": eps}

    def loss(
        self,
        x: Tensor,
        t: Tensor | None = None,
        eps: Tensor | None = None,
        *,
        weighting: str = "edm",
        t_distribution: str = "uniform",
        generator: torch.Generator | None = None,
        log_rho: tuple[float, float] = (-1.2, 1.2),
        **cond: Any,
    ) -> Tensor:
        r"""Denoising score-matching loss :math:`\mathbb{E}\, w(t) \|d(x_t, t) - x\|^2 / |S|`
        with :math:`x_t = \alpha_t x + \sigma_t \epsilon`.

        Arguments:
            x: Clean states, shape ``(B, *S)``.
            t: Times, shape ``(B,)``, and eps: noise ``(B, *S)``; drawn by
                :meth:`draw_noise` (with ``t_distribution`` and ``generator``) when ``None``.
            weighting: ``"edm"`` (:math:`w = (\rho^2 + s^2) / (\rho s)^2`, unit-variance
                targets for the network) or ``"none"`` (:math:`w = 1`).
            t_distribution, log_rho: See :meth:`draw_noise`.
            generator: Random generator for t and the noise.
            cond: Passed to the backbone (e.g. ``context``).

        Returns:
            The scalar mean loss.
        """
        if self.shape is not None and tuple(x.shape[1:]) != tuple(self.shape):
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}"
            )
        if t is None or eps is None:
            noise = self.draw_noise(x, generator, t_distribution, log_rho=log_rho)
            t = noise["t"] if t is None else t
            eps = noise["eps"] if eps is None else eps
        if eps.shape != x.shape:
            raise ValueError(f"eps must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(eps.shape)}")
        t = expand_t(t, x)
        alpha, sigma = self.schedule(t)
        x_t = right_broadcast(alpha, x) * x + right_broadcast(sigma, x) * eps
        if weighting not in ("edm", "none"):
            raise ValueError(f"weighting must be 'edm' or 'none', got {weighting!r}")
        err = (self(x_t, t, **cond) - x).square()
        if weighting == "edm":
            rho = right_broadcast(sigma / alpha, x)
            s = cond["scale"].to(x) if cond.get("scale") is not None else self.sigma_data
            err = err * ((rho**2 + s**2) / (rho * s) ** 2)
        return err.flatten(1).mean(dim=1).mean()


def _as_cov(cov: Tensor | float | tuple[Tensor, Tensor], D: int) -> tuple[str, Any]:
    """Classifies a covariance argument as dense ``(D, D)``, diagonal ``(D,)`` or low-rank
    plus diagonal ``(U (D, r), d (D,))``, checks it and returns ``(kind, float64 data)``."""
    if isinstance(cov, tuple):
        if len(cov) != 2:
            raise ValueError("a low-rank covariance must be a tuple (U, d) with U (D, r), d (D,)")
        U, d = (torch.as_tensor(c, dtype=torch.float64) for c in cov)
        if U.dim() != 2 or U.shape[0] != D or d.shape != (D,):
            raise ValueError(
                f"low-rank covariance (U, d) expects U of shape ({D}, r) and d of shape ({D},), "
                f"got {tuple(U.shape)} and {tuple(d.shape)}"
            )
        if not (torch.isfinite(U).all() and torch.isfinite(d).all()) or not (d > 0).all():
            raise ValueError("low-rank covariance: U must be finite and d finite and positive")
        return "lowrank", (U, d)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.dim() == 0:
        cov = cov.expand(D).clone()
    if not torch.isfinite(cov).all():
        raise ValueError("the covariance must be finite")
    if cov.shape == (D,):
        if not (cov > 0).all():
            raise ValueError("a diagonal covariance must be positive")
        return "diag", cov
    if cov.shape == (D, D):
        if not torch.allclose(cov, cov.T, rtol=1e-6, atol=1e-10 * float(cov.abs().max())):
            raise ValueError("a dense covariance must be symmetric")
        lam, Q = torch.linalg.eigh(cov)
        if not (lam > 0).all():
            raise ValueError(
                f"a dense covariance must be positive definite (smallest eigenvalue "
                f"{float(lam.min()):.3g})"
            )
        return "dense", (Q, lam)
    raise ValueError(
        f"cov must be a scalar, a diagonal of shape ({D},), a matrix of shape ({D}, {D}) or a "
        f"tuple (U, d), got shape {tuple(cov.shape)}"
    )


def gaussian_condition(
    mean: Tensor, cov: Tensor, A: Tensor, y: Tensor, cov_y: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Closed-form posterior of :math:`x \sim \mathcal{N}(m, C)`,
    :math:`y \mid x \sim \mathcal{N}(A x, \Sigma_y)`:

    .. math:: K = C A^\top (A C A^\top + \Sigma_y)^{-1}, \quad m' = m + K (y - A m), \quad
        C' = C - K A C,

    and the log-evidence :math:`\log \mathcal{N}(y; A m, A C A^\top + \Sigma_y)`.

    Arguments:
        mean: ``(D,)``; cov: ``(D, D)``; A: ``(M, D)``; y: ``(M,)``;
        cov_y: a scalar variance, a ``(M,)`` diagonal of variances or a ``(M, M)`` matrix.

    Returns:
        ``(mean', cov', log_evidence)`` in float64, shapes ``(D,)``, ``(D, D)``, ``()``.
    """
    f64 = torch.float64
    mean, cov, A, y = (torch.as_tensor(a, dtype=f64) for a in (mean, cov, A, y))
    M = A.shape[0]
    cov_y = torch.as_tensor(cov_y, dtype=f64, device=mean.device)
    if cov_y.dim() == 0:
        cov_y = cov_y * torch.eye(M, dtype=f64, device=mean.device)
    elif cov_y.dim() == 1:
        cov_y = torch.diag(cov_y)
    S = A @ cov @ A.T + cov_y
    S = (S + S.T) / 2
    L = torch.linalg.cholesky(S)
    CAt = cov @ A.T
    K = torch.cholesky_solve(CAt.T, L).T
    r = y - A @ mean
    post_mean = mean + K @ r
    post_cov = cov - K @ CAt.T
    post_cov = (post_cov + post_cov.T) / 2
    z = torch.linalg.solve_triangular(L, r[:, None], upper=False)[:, 0]
    log_ev = -0.5 * (z @ z) - torch.log(torch.diagonal(L)).sum() - 0.5 * M * math.log(2 * math.pi)
    return post_mean, post_cov, log_ev


class GaussianDenoiser(Denoiser):
    r"""Exact denoiser of a Gaussian prior :math:`x \sim \mathcal{N}(m, C)`.

    .. math:: \mathbb{E}[x \mid x_t] = m + \alpha_t C (\alpha_t^2 C + \sigma_t^2 I)^{-1}
        (x_t - \alpha_t m), \qquad
        \mathbb{V}[x \mid x_t] = C - \alpha_t^2 C (\alpha_t^2 C + \sigma_t^2 I)^{-1} C.

    Computed in float64 and returned in ``x_t``'s dtype; differentiable (so that zero-shot
    posteriors can take vector-Jacobian products through it).

    Arguments:
        mean: The prior mean, of the state shape ``S`` (any shape; ``cov`` acts on the
            flattened state of size ``D``).
        cov: A dense ``(D, D)`` matrix, a diagonal ``(D,)`` (or a scalar), or a low-rank plus
            diagonal tuple ``(U, d)`` meaning :math:`U U^\top + \mathrm{diag}(d)`.
        schedule: The noise schedule (default VP).
    """

    def __init__(
        self,
        mean: Tensor,
        cov: Tensor | float | tuple[Tensor, Tensor],
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__()
        mean = torch.as_tensor(mean)
        if not mean.is_floating_point() or mean.dim() == 0:
            raise ValueError("mean must be a floating-point tensor of the state shape (D,) or S")
        if not torch.isfinite(mean).all():
            raise ValueError("mean must be finite")
        self.shape = tuple(mean.shape)
        self.schedule = schedule if schedule is not None else VPSchedule()
        D = mean.numel()
        self.kind, data = _as_cov(cov, D)
        self.register_buffer("mean", mean.to(torch.float64).flatten())
        if self.kind == "dense":
            self.register_buffer("Q", data[0])
            self.register_buffer("lam", data[1])
        elif self.kind == "diag":
            self.register_buffer("lam", data)
        else:
            self.register_buffer("U", data[0])
            self.register_buffer("d", data[1])

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def cov_matvec(self, v: Tensor) -> Tensor:
        """Prior covariance times ``v`` of shape ``(B, D)`` (float64)."""
        if self.kind == "dense":
            return ((v @ self.Q) * self.lam) @ self.Q.T
        if self.kind == "diag":
            return v * self.lam
        return (v @ self.U) @ self.U.T + v * self.d

    @property
    def covariance(self) -> Tensor:
        """The dense ``(D, D)`` prior covariance (float64)."""
        if self.kind == "dense":
            return (self.Q * self.lam) @ self.Q.T
        if self.kind == "diag":
            return torch.diag(self.lam)
        return self.U @ self.U.T + torch.diag(self.d)

    def _solve_t(self, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        r""":math:`(\alpha^2 C + \sigma^2 I)^{-1} v` for ``v`` ``(B, D)``, ``alpha``/``sigma``
        ``(B,)`` (float64)."""
        a2, s2 = (alpha**2)[:, None], (sigma**2)[:, None]
        if self.kind == "dense":
            return ((v @ self.Q) / (a2 * self.lam + s2)) @ self.Q.T
        if self.kind == "diag":
            return v / (a2 * self.lam + s2)
        # Woodbury: (D_t + a2 U U^T)^-1 with D_t = a2 d + s2
        Dt = a2 * self.d + s2  # (B, D)
        w = v / Dt
        eye = torch.eye(self.U.shape[1], dtype=v.dtype, device=v.device)
        if bool((alpha == alpha[0]).all() and (sigma == sigma[0]).all()):
            # one time for the whole batch (the samplers' case): a single r x r Cholesky
            inner = (self.U / Dt[0, :, None]).T @ self.U + eye / a2[0]
            c = torch.cholesky_solve((w @ self.U).T, torch.linalg.cholesky(inner)).T
        else:
            UtDU = torch.einsum("dr,bd,ds->brs", self.U, 1 / Dt, self.U)
            inner = UtDU + eye / a2[..., None]
            c = torch.linalg.solve(inner, (w @ self.U)[..., None])[..., 0]
        return w - (c @ self.U.T) / Dt

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t.to(torch.float64))
        x = x_t.flatten(1).to(torch.float64)
        r = x - alpha[:, None] * self.mean
        out = self.mean + alpha[:, None] * self.cov_matvec(self._solve_t(r, alpha, sigma))
        return out.to(x_t.dtype).reshape(x_t.shape)

    def tweedie_cov(self, x_t: Tensor, t: Tensor | float, v: Tensor, **cond: Any) -> Tensor:
        r"""Exact :math:`\mathbb{V}[x \mid x_t]\, v` (no autograd), shapes ``(B, *S)``."""
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t.to(torch.float64))
        w = self.cov_matvec(v.flatten(1).to(torch.float64))
        out = w - alpha[:, None] ** 2 * self.cov_matvec(self._solve_t(w, alpha, sigma))
        return out.to(v.dtype).reshape(v.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact prior samples, shape ``(n, *S)`` (float64)."""
        dev = self.mean.device
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=dev)
        if self.kind == "dense":
            x = (z * self.lam.sqrt()) @ self.Q.T
        elif self.kind == "diag":
            x = z * self.lam.sqrt()
        else:
            r = self.U.shape[1]
            z2 = torch.randn(n, r, generator=generator, dtype=torch.float64, device=dev)
            x = z2 @ self.U.T + z * self.d.sqrt()
        return (self.mean + x).reshape(n, *self.shape)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of states ``x`` of shape ``(B, *S)``; returns ``(B,)`` float64."""
        r = x.flatten(1).to(torch.float64) - self.mean
        D = self.dim
        if self.kind == "dense":
            z = r @ self.Q
            quad, logdet = (z**2 / self.lam).sum(-1), torch.log(self.lam).sum()
        elif self.kind == "diag":
            quad, logdet = (r**2 / self.lam).sum(-1), torch.log(self.lam).sum()
        else:
            ones = torch.ones(r.shape[0], dtype=torch.float64, device=r.device)
            sol = self._solve_t(r, ones, torch.zeros_like(ones))
            quad = (r * sol).sum(-1)
            inner = torch.eye(self.U.shape[1], dtype=torch.float64) + (self.U.T / self.d) @ self.U
            logdet = torch.logdet(inner) + torch.log(self.d).sum()
        return -0.5 * (quad + logdet + D * math.log(2 * math.pi))

    def condition(
        self, A: Tensor, y: Tensor, cov_y: Tensor | float
    ) -> GaussianDenoiser:
        r"""The exact posterior :math:`p(x \mid y)` for :math:`y = A x + \mathcal{N}(0,
        \Sigma_y)`, as a (dense) :class:`GaussianDenoiser` with the same schedule.

        Arguments:
            A: ``(M, D)`` matrix acting on the flattened state; y: ``(M,)``;
            cov_y: scalar variance, ``(M,)`` variances or ``(M, M)`` covariance.
        """
        m, C, log_ev = gaussian_condition(self.mean, self.covariance, A, y, cov_y)
        post = GaussianDenoiser(m.reshape(self.shape), C, self.schedule)
        post.log_evidence = log_ev
        return post


class GaussianMixtureDenoiser(Denoiser):
    r"""Exact denoiser of a Gaussian-mixture prior
    :math:`x \sim \sum_k \pi_k \mathcal{N}(m_k, C_k)`:

    .. math:: \mathbb{E}[x \mid x_t] = \sum_k w_k(x_t)\, \mathbb{E}_k[x \mid x_t], \qquad
        w_k(x_t) \propto \pi_k\, \mathcal{N}(x_t; \alpha_t m_k, \alpha_t^2 C_k + \sigma_t^2 I).

    Arguments:
        weights: ``(K,)`` positive mixture weights (normalised here).
        means: ``(K, D)`` component means.
        covs: ``(K, D, D)`` dense or ``(K, D)`` diagonal component covariances.
        schedule: The noise schedule (default VP).
    """

    def __init__(
        self, weights: Tensor, means: Tensor, covs: Tensor, schedule: Schedule | None = None
    ) -> None:
        super().__init__()
        f64 = torch.float64
        weights, means, covs = (torch.as_tensor(a, dtype=f64) for a in (weights, means, covs))
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        K, D = means.shape
        if weights.shape != (K,) or not (weights > 0).all():
            raise ValueError(f"weights must be positive with shape ({K},)")
        if covs.shape == (K, D):
            covs = torch.diag_embed(covs)
        if covs.shape != (K, D, D):
            raise ValueError(f"covs must have shape ({K}, {D}, {D}) or ({K}, {D})")
        lam, Q = torch.linalg.eigh((covs + covs.transpose(1, 2)) / 2)
        if not (lam > 0).all():
            raise ValueError("every component covariance must be positive definite")
        self.shape = (D,)
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("Q", Q)
        self.register_buffer("lam", lam)

    def responsibilities(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        r"""Posterior component probabilities :math:`w_k(x_t)`, shape ``(B, K)``."""
        return self._components(x_t, t)[0]

    def _components(self, x_t: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t.to(torch.float64))
        a, s2 = alpha[:, None, None], (sigma**2)[:, None, None]
        x = x_t.to(torch.float64)
        r = x[:, None, :] - a * self.means  # (B, K, D)
        z = torch.einsum("bkd,kde->bke", r, self.Q)  # eigen-coordinates
        var = a**2 * self.lam + s2  # (B, K, D)
        log_p = -0.5 * (z**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        w = torch.softmax(self.log_weights + log_p, dim=-1)
        mean_k = self.means + torch.einsum("bke,kde->bkd", a * self.lam / var * z, self.Q)
        return w, mean_k

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        w, mean_k = self._components(x_t, t)
        return torch.einsum("bk,bkd->bd", w, mean_k).to(x_t.dtype)

    def sample(
        self, n: int, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Exact samples ``(n, D)`` (float64), and their component labels ``(n,)`` if asked."""
        dev = self.means.device
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.shape[0], generator=generator, dtype=torch.float64, device=dev)
        x = self.means[k] + torch.einsum("nde,ne->nd", self.Q[k], z * self.lam[k].sqrt())
        return (x, k) if return_labels else x

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of ``x`` ``(B, D)``; returns ``(B,)`` float64."""
        r = x.to(torch.float64)[:, None, :] - self.means
        z = torch.einsum("bkd,kde->bke", r, self.Q)
        log_p = -0.5 * (z**2 / self.lam + torch.log(2 * math.pi * self.lam)).sum(-1)
        return torch.logsumexp(self.log_weights + log_p, dim=-1)

    @property
    def weights(self) -> Tensor:
        """Normalised mixture weights ``(K,)``."""
        return self.log_weights.exp()

    def condition(self, A: Tensor, y: Tensor, cov_y: Tensor | float) -> GaussianMixtureDenoiser:
        r"""The exact mixture posterior for :math:`y = A x + \mathcal{N}(0, \Sigma_y)`: each
        component conditioned in closed form, weights :math:`\propto \pi_k \mathcal{N}(y; A m_k,
        A C_k A^\top + \Sigma_y)`. ``log_evidence`` (the log-marginal of y) is attached."""
        posts = [gaussian_condition(m, C, A, y, cov_y) for m, C in zip(self.means, self.covs)]
        log_w = self.log_weights + torch.stack([p[2] for p in posts])
        post = GaussianMixtureDenoiser(
            torch.softmax(log_w, 0),
            torch.stack([p[0] for p in posts]),
            torch.stack([p[1] for p in posts]),
            self.schedule,
        )
        post.log_evidence = torch.logsumexp(log_w, 0)
        return post
