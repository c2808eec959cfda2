r"""Amortized posteriors: conditional denoisers :math:`d(\theta_t, t, y)` trained on simulations.

Neural posterior estimation with a diffusion model (NPSE). A :class:`ConditionalDenoiser` is
trained on pairs :math:`(\theta, y) \sim p(\theta) p(y \mid \theta)` with the denoising loss
:math:`\mathbb{E}\, w(t) \|d(z_t, t, y) - z\|^2`; its optimum is
:math:`\mathbb{E}[z \mid z_t, y]`, the denoiser of the posterior :math:`p(z \mid y)` for every
observation at once. :meth:`ConditionalDenoiser.given` binds observations and returns an
ordinary :class:`~plausible.denoisers.Denoiser` that every sampler consumes.

**Sampling space.** The network never sees :math:`\theta` itself but

.. math:: z = \frac{r(\theta) - \mu_r}{s_r}, \qquad r_k(\theta) = \begin{cases}
    \operatorname{logit}\big((\theta_k - l_k) / (h_k - l_k)\big) & l_k, h_k \text{ finite,}\\
    \log(\theta_k - l_k) & \text{only } l_k \text{ finite,}\\
    -\log(h_k - \theta_k) & \text{only } h_k \text{ finite,}\\
    \theta_k & \text{unbounded,} \end{cases}

a bijection from the prior's support onto :math:`\mathbb{R}^D` followed by a standardisation
(:math:`\mu_r, s_r` the mean and standard deviation of :math:`r(\theta)` over the training
data; :math:`y` is standardised entry by entry the same way). Samples are mapped back by
:math:`\theta = r^{-1}(\mu_r + s_r z)`, so they never leave the support; the box-normalised
value is clamped to :math:`[\epsilon, 1 - \epsilon]` inside the logit, so :math:`\theta` exactly
on the boundary gives a finite :math:`z`. With ``support="reject"`` the box coordinates skip
the logit (:math:`r_k(\theta) = \theta_k`) and the samples that leave the box are rejected
and drawn again: the samples follow the learned posterior restricted to the support, and a
posterior that is Gaussian-like in :math:`\theta` stays so in :math:`z` (the logit distorts
posteriors far narrower than the box). ``support="auto"`` (the default) chooses between the
two from the training data (:class:`ConditionalDenoiser`). Densities carry the log-Jacobian

.. math:: \log p(\theta \mid y) = \log p(z \mid y) - \log\Big|\det\frac{\partial \theta}
    {\partial z}\Big|, \qquad \log\Big|\frac{\partial \theta_k}{\partial z_k}\Big| =
    \log s_{r,k} + \log(h_k - l_k) + \log\sigma(r_k) + \log\sigma(-r_k) \text{ (box).}

**Layout of batched observations.** ``npe.given(y)`` with ``y`` of shape ``y_shape`` is a
denoiser of states ``(D,)``; with ``y`` of shape ``(M, *y_shape)`` it is a denoiser of states
``(M, D)`` (one independent posterior per row), so ``sample(post, n)`` draws ``(n, M, D)``:
``n`` samples for each of the ``M`` observations in one batched call.

**Several iid observations** :math:`y_{1:n}` of one :math:`\theta`
(:meth:`ConditionalDenoiser.given_iid`, :class:`IIDPosterior`):
:math:`p(\theta \mid y_{1:n}) \propto p(\theta)^{1 - n} \prod_j p(\theta \mid y_j)`, composed
from the per-observation posterior scores :math:`s_j` and the prior score :math:`s_\lambda`
at each noise level, either *factorized* (Geffner et al. 2023)

.. math:: s(z_t) = \sum_j s_j(z_t) - (n - 1)\, s_\lambda(z_t),

exact at :math:`t = 0` only, or *GAUSS* (Linhart et al. 2024), exact at every :math:`t` when
the prior and the per-observation posteriors are Gaussian:

.. math:: s(z_t) = \Lambda_t^{-1} \Big[\sum_j W_{j,t}\, s_j(z_t) + (1 - n)\, W_{\lambda,t}\,
    s_\lambda(z_t)\Big], \quad W_{j,t} = \alpha_t^2 I + \sigma_t^2 C_j^{-1}, \quad
    \Lambda_t = \alpha_t^2 I + \sigma_t^2 P,

with :math:`C_j` the per-observation posterior covariances, :math:`C_\lambda` the prior
covariance and :math:`P = \sum_j C_j^{-1} + (1 - n) C_\lambda^{-1}` the precision of the
composed Gaussian. With estimated covariances :math:`P` can lose definiteness (the NaNs of
sbi's issue #1656); its eigenvalues are therefore clamped from below at the smallest prior
precision, which leaves every exact Gaussian case unchanged (there :math:`P \succeq
C_\lambda^{-1}`), and along the eigenvectors of :math:`P` that needed the clamp the score is
the prior's (the composition is not a valid density there; combining the unclamped
numerator with the clamped :math:`\Lambda_t` made samples diverge to 1e22).

**Prior scores** in the sampling space are exact where possible
(:meth:`ConditionalDenoiser.prior_denoiser`): a Gaussian prior stays Gaussian under the
standardisation (and a log-normal prior becomes Gaussian under the log); a box-uniform prior
becomes a product of logistic densities, whose diffused denoiser is computed per dimension
by quadrature (:class:`ProductDenoiser`, to about 1e-6); otherwise an unconditional
denoiser learned jointly (``p_uncond > 0``, the condition dropped for that fraction of the
training pairs) or the Gaussian fitted to the training :math:`z`.

**Densities** (:func:`flow_log_prob`): the probability-flow ODE
:math:`\dot{x} = \frac{\dot\alpha}{\alpha} x + \frac{\dot\rho}{\rho}(x - \alpha d(x, t))`
(:math:`\rho = \sigma / \alpha`) carries :math:`x_0` to :math:`x_1`, and
:math:`\log p_0(x_0) = \log p_1(x_1) + \int_0^1 \nabla \cdot v \,dt` with the divergence
exact (one forward-mode product per dimension) or by Hutchinson's estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoints import build_model, model_config, register
from .denoisers import Denoiser, GaussianDenoiser, Preconditioned, right_broadcast
from .schedules import Schedule, schedule_from_config

__all__ = [
    "ConditionalDenoiser",
    "AmortizedPosterior",
    "IIDPosterior",
    "ProductDenoiser",
    "BoxDenoiser",
    "StackedDenoiser",
    "MLPEmbedding",
    "prior_spec",
    "flow_log_prob",
    "logistic_prior_denoiser",
    "training_steps",
    "network_width",
    "SMALL_BUDGET",
    "LOG_RHO",
]

_F64 = torch.float64
_BASELINE_MAX_FEATURES = 4096

#: Default ``(mean, std)`` of :math:`\log(\sigma_t / \alpha_t)` of the training noise levels of
#: a :class:`ConditionalDenoiser` (see :meth:`ConditionalDenoiser.draw_noise`).
LOG_RHO: tuple[float, float] = (-2.0, 1.6)


def training_steps(simulations: int) -> int:
    r"""Default upper bound on the training steps (batch 256) of a :class:`ConditionalDenoiser`
    trained on ``simulations`` pairs, for use with early stopping (``fit(..., validation=0.1,
    patience=10)``, which decides when to stop):
    :math:`2000 + 18000 \log_{10}(\max(N, 1000) / 1000)`, i.e. 2000 / 20000 / 38000 for
    :math:`10^3 / 10^4 / 10^5` simulations.

    The bound used to be :math:`2000 + 2000 \log_{10}(N / 1000)`: at :math:`10^4`
    simulations early stopping never triggered before its 4000 steps on the sbi benchmark
    tasks, and with 20000 it stopped after 7000-14000 steps, with a lower C2ST on slcp and sir
    (BENCHMARKS.md, section 6).
    """
    if not isinstance(simulations, int) or simulations < 1:
        raise ValueError(f"simulations must be a positive integer, got {simulations!r}")
    return int(2000 + 18000 * math.log10(max(simulations, 1000) / 1000))


#: Simulation budgets below this train the narrower network of :func:`network_width`.
SMALL_BUDGET = 3000


def network_width(simulations: int) -> int:
    r"""Default hidden width of :meth:`ConditionalDenoiser.mlp` for ``simulations`` pairs: 64
    below :data:`SMALL_BUDGET` (3000) simulations, 128 from there on.

    At :math:`10^3` simulations the width-64 network (92k parameters on a 2-parameter task,
    against 192k) costs half the CPU per training step, and its C2ST on the sbi benchmark tasks
    was within the seed-to-seed spread of the width-128 network's (BENCHMARKS.md, section 6);
    at :math:`10^4` and :math:`10^5` the width 128 is what was measured.
    """
    if not isinstance(simulations, int) or simulations < 1:
        raise ValueError(f"simulations must be a positive integer, got {simulations!r}")
    return 64 if simulations < SMALL_BUDGET else 128


# ---------------------------------------------------------------------------------------------
# embedding


class MLPEmbedding(nn.Module):
    r"""Default embedding of the condition: ``y`` ``(B, *y_shape)`` is flattened and mapped by
    ``Linear-SiLU-(Linear-SiLU)^(layers-1)-Linear`` to ``(B, out_features)``.

    Arguments:
        in_features: Number of entries of one ``y``.
        out_features: Size of the embedding (the backbone's ``context``).
        hidden: Hidden width.
        layers: Number of hidden layers (at least 1).
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 128,
                 layers: int = 2) -> None:
        super().__init__()
        if min(in_features, out_features, hidden, layers) < 1:
            raise ValueError("in_features, out_features, hidden and layers must be positive, "
                             f"got {in_features}, {out_features}, {hidden}, {layers}")
        self.config = {"in_features": int(in_features), "out_features": int(out_features),
                       "hidden": int(hidden), "layers": int(layers)}
        mods: list[nn.Module] = [nn.Linear(in_features, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), nn.SiLU()]
        mods.append(nn.Linear(hidden, out_features))
        self.mlp = nn.Sequential(*mods)

    def forward(self, y: Tensor) -> Tensor:
        y = y.flatten(1)
        if y.shape[1] != self.config["in_features"]:
            raise ValueError(f"MLPEmbedding expects y with {self.config['in_features']} entries "
                             f"per item, got {y.shape[1]} (shape {tuple(y.shape)})")
        return self.mlp(y)


register(MLPEmbedding)


# ---------------------------------------------------------------------------------------------
# priors


def _vec(x: Any, name: str) -> list[float]:
    t = torch.as_tensor(x, dtype=_F64).reshape(-1)
    return [float(v) for v in t]


def prior_spec(prior: Any) -> dict[str, Any] | None:
    """A JSON description of a prior, enough for the bijection and the exact prior score.

    Accepts the priors of :mod:`plausible.tasks.sbi` (``UniformPrior``, ``GaussianPrior``,
    ``LogNormalPrior`` and anything with ``bounds``), ``torch.distributions`` (``Uniform``,
    ``Normal``, ``MultivariateNormal``, ``LogNormal``, wrapped in ``Independent`` or not), a
    dict ``{"kind": "box", "low": [...], "high": [...]}`` / ``{"kind": "gaussian", "mean":
    [...], "cov": [[...]]}`` / ``{"kind": "lognormal", "loc": [...], "scale": [...]}`` /
    ``{"kind": "bounded", "low": [...], "high": [...]}``, or ``None``.

    Raises:
        TypeError: If the prior is none of these.
    """
    if prior is None:
        return None
    if isinstance(prior, dict):
        kind = prior.get("kind")
        if kind not in ("box", "gaussian", "lognormal", "bounded"):
            raise ValueError(f"prior dict kind must be box, gaussian, lognormal or bounded, "
                             f"got {kind!r}")
        return dict(prior)
    dist = torch.distributions
    base = prior.base_dist if isinstance(prior, dist.Independent) else prior
    if isinstance(base, dist.Uniform):
        return {"kind": "box", "low": _vec(base.low, "low"), "high": _vec(base.high, "high")}
    if isinstance(base, dist.LogNormal):
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        return {"kind": "lognormal", "loc": _vec(loc, "loc"), "scale": _vec(scale, "scale")}
    if isinstance(base, dist.Normal):
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        return {"kind": "gaussian", "mean": _vec(loc, "loc"),
                "cov": torch.diag(torch.as_tensor(_vec(scale, "s")) ** 2).tolist()}
    if isinstance(base, dist.MultivariateNormal):
        return {"kind": "gaussian", "mean": _vec(base.loc, "loc"),
                "cov": base.covariance_matrix.to(_F64).tolist()}
    name = type(prior).__name__
    if hasattr(prior, "low") and hasattr(prior, "high") and "niform" in name:
        return {"kind": "box", "low": _vec(prior.low, "low"), "high": _vec(prior.high, "high")}
    if "LogNormal" in name and hasattr(prior, "loc") and hasattr(prior, "scale"):
        return {"kind": "lognormal", "loc": _vec(prior.loc, "loc"),
                "scale": _vec(prior.scale, "scale")}
    if hasattr(prior, "loc") and hasattr(prior, "cov"):
        return {"kind": "gaussian", "mean": _vec(prior.loc, "loc"),
                "cov": torch.as_tensor(prior.cov, dtype=_F64).tolist()}
    bounds = getattr(prior, "bounds", "absent")
    if bounds is None:
        return None
    if bounds != "absent":
        low, high = bounds
        return {"kind": "bounded", "low": _vec(low, "low"), "high": _vec(high, "high")}
    raise TypeError(f"cannot describe a prior of type {name}: pass a prior of "
                    "plausible.tasks.sbi, a torch distribution, a dict or bounds=(low, high)")


def _spec_bounds(spec: dict[str, Any] | None, D: int) -> tuple[Tensor, Tensor]:
    inf = torch.full((D,), math.inf, dtype=_F64)
    if spec is None or spec["kind"] == "gaussian":
        return -inf, inf
    if spec["kind"] == "lognormal":
        return torch.zeros(D, dtype=_F64), inf
    low = torch.as_tensor(spec["low"], dtype=_F64).reshape(-1)
    high = torch.as_tensor(spec["high"], dtype=_F64).reshape(-1)
    if low.shape != (D,) or high.shape != (D,):
        raise ValueError(f"prior bounds must have {D} entries, got {low.numel()} and "
                         f"{high.numel()}")
    if not (high > low).all():
        raise ValueError("prior bounds need low < high in every dimension")
    return low, high


# ---------------------------------------------------------------------------------------------
# exact denoisers of products of 1-D densities (quadrature)


_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(64)


class ProductDenoiser(Denoiser):
    r"""Exact denoiser of a product of 1-D densities, by adaptive quadrature per dimension.

    The state is :math:`z_k = a_k + b_k w_k` with independent :math:`w_k \propto
    \exp\psi_k(w_k)`. With :math:`m = (z_t / \alpha_t - a) / b` and
    :math:`\varrho = \sigma_t / (\alpha_t b)`, the posterior of :math:`w` given :math:`z_t` is
    :math:`\propto e^{f(w)}`, :math:`f(w) = \psi(w) - (w - m)^2 / (2 \varrho^2)`, and

    .. math:: \mathbb{E}[w \mid z_t] = \frac{\sum_k \omega_k\, w_k\, e^{f(w_k) + u_k^2/2}}
        {\sum_k \omega_k\, e^{f(w_k) + u_k^2/2}}, \qquad w_k = w^\star + s\, u_k,

    64-node Gauss-Hermite quadrature (nodes :math:`u_k`, weights :math:`\omega_k`) centred on
    the mode :math:`w^\star` of :math:`f` (Newton's method) with :math:`s = 1.2
    (-f''(w^\star))^{-1/2}`. Exact to about 1e-6 for smooth unimodal densities at every noise
    level (tested on the logistic against brute-force quadrature).

    Arguments:
        log_density: :math:`\psi`: maps ``w`` ``(..., *S)`` to unnormalised log-densities
            ``(..., *S)`` (elementwise, twice differentiable).
        loc, scale: :math:`a, b`, ``(D,)``.
        schedule: The noise schedule.
        grid: ``(low, high, points)`` of the trapezoid grid in ``w`` of :meth:`moments` and
            of the Gaussian approximation that starts Newton's method.
        batch_shape: Leading state dimensions (e.g. ``(n,)`` for ``n`` stacked posteriors,
            with ``log_density`` acting on ``(..., n, D)``).
    """

    def __init__(
        self,
        log_density: Callable[[Tensor], Tensor],
        loc: Tensor,
        scale: Tensor,
        schedule: Schedule | None = None,
        grid: tuple[float, float, int] = (-40.0, 40.0, 4001),
        batch_shape: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        from .schedules import VPSchedule

        self.log_density = log_density
        loc = torch.as_tensor(loc, dtype=_F64).reshape(-1)
        scale = torch.as_tensor(scale, dtype=_F64).reshape(-1)
        if loc.shape != scale.shape or not (scale > 0).all():
            raise ValueError("loc and scale must be (D,) tensors with scale > 0")
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.shape = (*batch_shape, loc.numel())
        lo, hi, k = grid
        self.register_buffer("grid", torch.linspace(float(lo), float(hi), int(k), dtype=_F64))
        self.register_buffer("gh_nodes", torch.as_tensor(_GH_NODES, dtype=_F64))
        self.register_buffer("gh_logw", torch.log(torch.as_tensor(_GH_WEIGHTS, dtype=_F64)))
        mean, var = self.moments()
        self.register_buffer("w_mean", (mean - loc) / scale)
        self.register_buffer("w_var", var / scale**2)

    def _psi(self, w: Tensor) -> Tensor:
        """``log_density`` on ``w`` ``(B, F, K)`` with ``F`` the flattened state; moves the
        node axis first so the callable sees ``(..., *S)``."""
        B, _, K = w.shape
        x = w.permute(2, 0, 1).reshape(K, B, *self.shape)
        return self.log_density(x).reshape(K, B, -1).permute(1, 2, 0)

    def _mode(self, m: Tensor, rho: Tensor, iterations: int = 10) -> tuple[Tensor, Tensor]:
        r"""Mode of :math:`f` and the curvature there, by Newton's method from the Gaussian
        approximation (positive curvature of :math:`\psi` ignored, so every step ascends);
        ``m`` and ``rho`` ``(B, F)``."""
        mu, v = self.w_mean.reshape(1, -1), self.w_var.reshape(1, -1)
        w = mu + v / (v + rho**2) * (m - mu)
        with torch.enable_grad():
            for i in range(iterations + 1):
                w = w.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._psi(w[..., None]).sum(), w, create_graph=True)
                (h,) = torch.autograd.grad(g.sum(), w)
                curv = h.clamp(max=0) - 1 / rho**2
                if i == iterations:
                    break
                w = w.detach() - (g.detach() - (w.detach() - m) / rho**2) / curv
        return w.detach(), curv.detach()

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t.to(_F64))
        x = x_t.to(_F64)
        a, s = right_broadcast(alpha, x), right_broadcast(sigma, x)
        B = x.shape[0]
        m = ((x / a - self.loc) / self.scale).reshape(B, -1)
        rho = ((s / a) / self.scale).expand(x.shape).reshape(B, -1)
        w_star, curv = self._mode(m, rho)
        width = 1.2 / torch.sqrt(-curv)
        u = self.gh_nodes
        w = w_star[..., None] + width[..., None] * u  # (B, F, K)
        logq = self._psi(w) - 0.5 * ((w - m[..., None]) / rho[..., None]) ** 2 \
            + 0.5 * u**2 + self.gh_logw
        mean_w = (torch.softmax(logq, -1) * w).sum(-1).reshape(x.shape)
        return (self.loc + self.scale * mean_w).to(x_t.dtype)

    def moments(self) -> tuple[Tensor, Tensor]:
        """Exact mean and variance of each dimension, shapes ``S`` (float64), by the grid."""
        g = self.grid.reshape(-1, *([1] * len(self.shape)))
        p = torch.softmax(self.log_density(g.expand(-1, *self.shape)), 0)
        mean_w = (p * g).sum(0)
        var_w = (p * g**2).sum(0) - mean_w**2
        return self.loc + self.scale * mean_w, self.scale**2 * var_w


def _log_logistic(w: Tensor) -> Tensor:
    return -w.abs() - 2 * torch.log1p(torch.exp(-w.abs()))


def logistic_prior_denoiser(loc: Tensor, scale: Tensor,
                            schedule: Schedule | None = None) -> ProductDenoiser:
    r"""Exact denoiser of independent logistic densities :math:`z_k = a_k + b_k w_k`,
    :math:`p(w) = e^{-w} / (1 + e^{-w})^2`: a box-uniform prior seen through the logit."""
    return ProductDenoiser(_log_logistic, loc, scale, schedule)


def _mills_ratio(A: Tensor, B: Tensor) -> Tensor:
    r""":math:`(\varphi(A) - \varphi(B)) / (\Phi(B) - \Phi(A))` for :math:`A < B`
    (float64): the mean of a standard normal truncated to :math:`[A, B]`. Stable in both
    tails: the right tail is mirrored onto the left (:math:`r(A, B) = -r(-B, -A)`), and for
    :math:`A < B \le 0` it is written with the scaled complementary error function
    :math:`\operatorname{erfcx}`, :math:`r = M(B)\,(e - 1) / (1 - e q)` with
    :math:`M(B) = \varphi(B) / \Phi(B) = \sqrt{2/\pi} / \operatorname{erfcx}(-B/\sqrt2)`,
    :math:`e = \varphi(A) / \varphi(B)` and :math:`q = \operatorname{erfcx}(-A/\sqrt2) /
    \operatorname{erfcx}(-B/\sqrt2)`."""
    flip = A > 0
    a, b = torch.where(flip, -B, A), torch.where(flip, -A, B)  # now a <= 0
    h = math.sqrt(0.5)
    bn = b.clamp(max=0.0)
    ex_a, ex_b = torch.special.erfcx(-a * h), torch.special.erfcx(-bn * h)
    d = (bn**2 - a**2) / 2  # log(phi(a) / phi(b)) <= 0
    tail = (math.sqrt(2 / math.pi) / ex_b) * torch.expm1(d) \
        / -torch.expm1(d + torch.log(ex_a) - torch.log(ex_b))
    bp = b.clamp(min=0.0)
    phi = lambda u: torch.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)  # noqa: E731
    direct = (phi(a) - phi(bp)) / (torch.special.ndtr(bp) - torch.special.ndtr(a))
    r = torch.where(b <= 0, tail, direct)
    return torch.where(flip, -r, r)


class BoxDenoiser(Denoiser):
    r"""Exact denoiser of the uniform density on the box :math:`[a, b]` (``(D,)`` each):
    given :math:`x_t = \alpha_t x + \sigma_t \epsilon`, :math:`x` is a normal of mean
    :math:`m = x_t / \alpha_t` and scale :math:`\rho = \sigma_t / \alpha_t` truncated to the
    box, so per dimension

    .. math:: \mathbb{E}[x \mid x_t] = m + \rho\,
        \frac{\varphi(A) - \varphi(B)}{\Phi(B) - \Phi(A)}, \qquad A = \frac{a - m}{\rho},
        \; B = \frac{b - m}{\rho}

    (evaluated in log space, stable far outside the box). A box-uniform prior in the sampling
    space of ``ConditionalDenoiser(support="reject")``.

    Arguments:
        low, high: :math:`a < b`, ``(D,)``.
        schedule: The noise schedule (default VP).
    """

    def __init__(self, low: Tensor, high: Tensor, schedule: Schedule | None = None) -> None:
        super().__init__()
        from .schedules import VPSchedule

        low = torch.as_tensor(low, dtype=_F64).reshape(-1)
        high = torch.as_tensor(high, dtype=_F64).reshape(-1)
        if low.shape != high.shape or not (torch.isfinite(low).all() and
                                           torch.isfinite(high).all() and (high > low).all()):
            raise ValueError("low and high must be finite (D,) tensors with low < high")
        self.register_buffer("low", low)
        self.register_buffer("high", high)
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.shape = (low.numel(),)

    @property
    def covariance(self) -> Tensor:
        r"""``(D, D)``: :math:`\operatorname{diag}((b - a)^2 / 12)`."""
        return torch.diag((self.high - self.low) ** 2 / 12)

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t.to(_F64))
        x = x_t.to(_F64)
        a, s = right_broadcast(alpha, x), right_broadcast(sigma, x)
        m, rho = x / a, s / a
        out = m + rho * _mills_ratio((self.low - m) / rho, (self.high - m) / rho)
        return torch.minimum(torch.maximum(out, self.low), self.high).to(x_t.dtype)


class StackedDenoiser(Denoiser):
    """``n`` denoisers of states ``(D,)`` as one denoiser of states ``(n, D)`` (row ``j`` of
    the state is denoised by denoiser ``j``)."""

    def __init__(self, denoisers: Sequence[Denoiser]) -> None:
        super().__init__()
        if not denoisers:
            raise ValueError("StackedDenoiser needs at least one denoiser")
        shapes = {tuple(d.shape) for d in denoisers}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"all denoisers must share one state shape (D,), got {shapes}")
        self.members = nn.ModuleList(denoisers)
        self.schedule = denoisers[0].schedule
        self.shape = (len(denoisers), *denoisers[0].shape)

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = self.check(x_t, t)
        return torch.stack([d(x_t[:, j], t) for j, d in enumerate(self.members)], dim=1)


# ---------------------------------------------------------------------------------------------
# the conditional denoiser


def _const(x: Tensor) -> nn.Parameter:
    return nn.Parameter(x, requires_grad=False)


#: ``support="auto"`` rejects where the baseline's expected acceptance is at least this.
_REJECT_MIN_ACCEPTANCE = 0.9


def _ridge(z: Tensor, y: Tensor, ridge: float = 1e-3, coefficients: bool = False) -> Any:
    r"""Ridge regression :math:`z \approx W y + b` (``z`` ``(N, D)``, ``y`` ``(N, Y)``,
    penalty ``ridge * N``) and the residual standard deviations :math:`s` ``(D,)`` (floored
    at 1e-3): ``(W, b, s)`` with ``coefficients``, else the fitted means ``(N, D)`` and
    ``s``."""
    N = z.shape[0]
    ym, zm = y.mean(0), z.mean(0)
    yc, zc = y - ym, z - zm
    G = yc.T @ yc + ridge * N * torch.eye(yc.shape[1], dtype=yc.dtype, device=yc.device)
    W = torch.linalg.solve(G, yc.T @ zc).T  # (D, Y)
    b = zm - W @ ym
    fit = y @ W.T + b
    s = (z - fit).std(0).clamp_min(1e-3)
    return (W, b, s) if coefficients else (fit, s)


class ConditionalDenoiser(Preconditioned):
    r"""Amortized posterior denoiser :math:`d(z_t, t, y) \approx \mathbb{E}[z \mid z_t, y]`
    (neural posterior score estimation), trained on pairs :math:`(\theta, y)`.

    ``plausible.fit(npe, (theta, y))`` (or ``fit(npe, SimulatorStream(prior, simulator))``)
    trains it; :meth:`given` binds observations. See the module docstring for the sampling
    space (bijection of the prior's support, standardisation) and the layouts.

    Arguments:
        net: Backbone ``net(z, c_noise, context=...)`` with ``shape == (D,)`` and a context of
            size ``C`` (e.g. ``plausible.nets.ResMLP(D, context=C)``).
        schedule: Noise schedule (default VP).
        embed: Embedding of the (standardised) condition, ``(B, *y_shape) -> (B, C)``: any
            ``nn.Module`` (a CNN, a set encoder...; register it with
            :func:`plausible.checkpoints.register` to save checkpoints). Default: an
            :class:`MLPEmbedding` from ``prod(y_shape)`` entries (``y_shape`` defaults to
            ``(C,)``) to ``C``.
        prior: The prior of :math:`\theta` (see :func:`prior_spec`): its bounds define the
            bijection, and it gives the exact prior score of :meth:`given_iid`.
        bounds: ``(low, high)`` of the support (``inf`` where unbounded) when no prior is
            given.
        y_shape: Shape of one observation (default ``(C,)`` with the default embedding).
        sigma_data: EDM's data scale of the standardised :math:`z` (1 after standardisation).
        p_uncond: Fraction of training pairs whose condition is replaced by a learned null
            embedding (``> 0`` makes :meth:`prior_denoiser` ``kind="learned"`` available).
        standardize: Standardise :math:`r(\theta)` and :math:`y` from the training data.
        eps: Clamp of the box-normalised :math:`\theta` inside the logit.
        baseline: Precondition the denoiser by a linear-Gaussian posterior fitted to the
            training pairs (ridge regression of :math:`z` on the standardised, flattened
            :math:`y`): :math:`z \mid y \approx \mathcal{N}(W y + b, \operatorname{diag}
            (s)^2)` with :math:`s` the residual standard deviations; the network then
            learns the departure from it (the ``loc`` / ``scale`` of
            :class:`~plausible.denoisers.Preconditioned`). For posteriors much narrower than
            the prior that move with :math:`y` (gaussian_mixture, bernoulli_glm), the
            network's inputs and targets have unit variance at every noise level instead of
            a width-:math:`s` signal inside a unit-variance one. The sampling space is
            unchanged (so :meth:`given_iid` composes as before). ``"auto"`` (default): on
            when :math:`r` is the identity (no bounded coordinate, e.g. a Gaussian prior),
            where a linear regression of :math:`\theta` is meaningful; off otherwise. On
            gaussian_linear it lowered C2ST from 0.740 / 0.566 to 0.594 / 0.519 at
            :math:`10^3 / 10^4` simulations (random-forest C2ST; BENCHMARKS.md section 6);
            under a logit (gaussian_mixture) it was worse.
        support: How samples are kept inside a box (both bounds finite) of the prior:
            ``"reject"``: those coordinates are sampled as they are (no logit) and the samples
            that fall outside the box are drawn again (rejection sampling of the learned
            posterior restricted to the support, as sbi's NPE does), which also makes the
            baseline available for box priors; ``"bijection"``: through the logit (every
            sample is inside, no rejection); ``"auto"`` (default): decided from the training
            data by :meth:`standardize_from` (``"bijection"`` until then): ``"reject"`` where
            the linear-Gaussian posterior of the baseline (fitted without the logit) puts on
            average at least ``0.9`` of its mass inside the box (:attr:`expected_acceptance`),
            i.e. where posteriors are narrow against the box; the logit where they reach its
            faces. Half-bounded coordinates always go through the log. Measured on the sbi
            benchmark at :math:`10^4` simulations (BENCHMARKS.md section 6): ``"reject"``
            lowered C2ST on gaussian_mixture (expected acceptance 0.94) from 0.58 to
            0.54-0.57, tied on two_moons (0.85) and slcp (0.65), and was much worse on
            gaussian_linear_uniform (0.45): 0.73 against 0.60.

    The standardisation statistics are fitted by :meth:`standardize_from` or, if it was not
    called, from the first training batch that :meth:`loss` sees. They are frozen parameters
    (``requires_grad=False``) so that checkpoints and ``fit``'s weight average carry them.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule | None = None,
        embed: nn.Module | None = None,
        *,
        prior: Any = None,
        bounds: tuple[Any, Any] | None = None,
        y_shape: Sequence[int] | None = None,
        sigma_data: float = 1.0,
        p_uncond: float = 0.0,
        standardize: bool = True,
        eps: float = 1e-6,
        baseline: bool | str = "auto",
        support: str = "auto",
        shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(net, schedule, sigma_data=sigma_data, shape=shape)
        if self.shape is None or len(self.shape) != 1:
            raise ValueError(f"ConditionalDenoiser needs a backbone of vectors with shape (D,), "
                             f"got shape {self.shape}; pass shape=(D,)")
        D = self.shape[0]
        C = getattr(net, "context_features", None)
        if C is None and isinstance(getattr(net, "config", None), dict):
            C = net.config.get("context")
        if C is None:
            raise ValueError("the backbone has no context: build it with context=C, e.g. "
                             "plausible.nets.ResMLP(D, context=C)")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        if prior is not None and bounds is not None:
            raise ValueError("pass either prior= or bounds=, not both")
        spec = prior_spec(prior)
        if bounds is not None:
            low, high = bounds
            spec = {"kind": "bounded", "low": _vec(torch.as_tensor(low).expand(D), "low"),
                    "high": _vec(torch.as_tensor(high).expand(D), "high")}
        if spec is not None and spec["kind"] == "gaussian":
            if len(spec["mean"]) != D:
                raise ValueError(f"the Gaussian prior has {len(spec['mean'])} dimensions, "
                                 f"theta has {D}")
        low, high = _spec_bounds(spec, D)
        self.prior = spec
        self.context_size = int(C)
        if y_shape is None:
            y_shape = getattr(embed, "y_shape", None) if embed is not None else (int(C),)
        if y_shape is None:
            raise ValueError("with a custom embed, pass y_shape= (the shape of one observation)")
        self.y_shape = tuple(int(s) for s in y_shape)
        if embed is None:
            embed = MLPEmbedding(int(math.prod(self.y_shape)), int(C))
        if not isinstance(embed, nn.Module):
            raise TypeError(f"embed must be an nn.Module, got {type(embed).__name__}")
        self.embed = embed
        self.p_uncond = float(p_uncond)
        self.standardize = bool(standardize)
        self.eps = float(eps)
        if support not in ("auto", "reject", "bijection"):
            raise ValueError(f"support must be 'auto', 'reject' or 'bijection', got {support!r}")
        has_box = bool((torch.isfinite(low) & torch.isfinite(high)).any())
        #: ``"reject"`` or ``"bijection"`` (``"auto"`` until :meth:`standardize_from`)
        self.support = support if has_box else "bijection"
        #: Estimated mean acceptance of rejection (see ``support``), set by ``"auto"``.
        self.expected_acceptance: float | None = None
        self.register_buffer("low", low.float())
        self.register_buffer("high", high.float())
        # frozen parameters: carried by checkpoints and by fit's weight average (see above)
        self.z_loc = _const(torch.zeros(D))
        self.z_scale = _const(torch.ones(D))
        self.z_cov = _const(torch.eye(D))
        self.y_loc = _const(torch.zeros(self.y_shape))
        self.y_scale = _const(torch.ones(self.y_shape))
        self.fitted = _const(torch.zeros(()))
        self.null = nn.Parameter(torch.zeros(int(C))) if p_uncond > 0 else None
        if not (isinstance(baseline, bool) or baseline == "auto"):
            raise ValueError(f"baseline must be True, False or 'auto', got {baseline!r}")
        # "auto" with support "auto": decided with the support by standardize_from
        self._baseline_pending = baseline == "auto" and self.support == "auto" \
            and math.prod(self.y_shape) <= _BASELINE_MAX_FEATURES
        if baseline == "auto":
            baseline = self._baseline_pending or self._auto_baseline()
        self.baseline = baseline
        if self.baseline:
            Y = int(math.prod(self.y_shape))
            if Y > _BASELINE_MAX_FEATURES:
                raise ValueError(f"baseline=True regresses theta on the {Y} entries of y; "
                                 f"at most {_BASELINE_MAX_FEATURES} are supported (embed "
                                 "large observations instead)")
            self.b_weight = _const(torch.zeros(D, Y))
            self.b_bias = _const(torch.zeros(D))
            self.b_scale = _const(torch.ones(D))
        if self._baseline_pending:  # no baseline until it is decided
            self.baseline = False

    def _auto_baseline(self) -> bool:
        """``baseline="auto"``: on where :math:`r` is the identity and y is small enough."""
        lo_f, hi_f, both = self._finite(self.low, self.high)
        identity = ~(lo_f | hi_f | both)
        return bool(identity.all() and math.prod(self.y_shape) <= _BASELINE_MAX_FEATURES)

    # -- construction helpers ------------------------------------------------------------

    @classmethod
    def mlp(
        cls,
        theta_features: int,
        y_features: int,
        *,
        hidden: int = 128,
        blocks: int = 3,
        context: int = 64,
        schedule: Schedule | None = None,
        **kwargs: Any,
    ) -> ConditionalDenoiser:
        """A ``ResMLP`` backbone (``hidden`` x ``blocks``) with an MLP embedding of ``y``
        ``(y_features,)`` into ``context`` features: the defaults used for the
        sbi-benchmark tasks. ``kwargs`` go to the constructor (``prior=``, ``p_uncond=``...)."""
        from .nets import ResMLP

        net = ResMLP(theta_features, hidden=hidden, blocks=blocks, context=context)
        embed = MLPEmbedding(y_features, context, hidden=max(hidden, 2 * context))
        return cls(net, schedule, embed, y_shape=(y_features,), **kwargs)

    @property
    def dim(self) -> int:
        return int(self.shape[0])

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted > 0.5)

    # -- bijection and standardisation ---------------------------------------------------

    def _finite(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Masks ``(D,)`` of the coordinates mapped by the log of ``low`` (``lo_f``), of
        ``high`` (``hi_f``) and by the logit (``both``); with ``support="reject"`` box
        coordinates are none of these (the identity)."""
        lo_f, hi_f = torch.isfinite(low), torch.isfinite(high)
        both = lo_f & hi_f
        if self.support == "reject":
            lo_f, hi_f, both = lo_f & ~both, hi_f & ~both, torch.zeros_like(both)
        return lo_f, hi_f, both

    @torch.no_grad()
    def _resolve_support(self, theta: Tensor, y: Tensor) -> None:
        r"""``support="auto"``: ``"reject"`` if the expected acceptance
        :math:`\frac1N \sum_i \prod_{k \in \text{box}} [\Phi(\frac{h_k - m_{ik}}{s_k}) -
        \Phi(\frac{l_k - m_{ik}}{s_k})]` of the ridge posterior :math:`\theta_k \mid y_i \sim
        \mathcal{N}(m_{ik}, s_k^2)` (no logit) is at least :data:`_REJECT_MIN_ACCEPTANCE`,
        else ``"bijection"``; then the pending ``baseline="auto"``. ``theta`` ``(N, D)``,
        ``y`` ``(N, ...)`` float64."""
        if self.support == "auto":
            self.support = "reject"  # theta's own coordinates, to regress them
            acceptance = 0.0
            Y = int(math.prod(self.y_shape))
            if Y <= _BASELINE_MAX_FEATURES:
                r = self._raw(theta)
                yf = y.reshape(len(y), -1)
                yf = (yf - yf.mean(0)) / yf.std(0).clamp_min(1e-12)
                m, sd = _ridge(r, yf)
                low, high = self.low.to(r), self.high.to(r)
                box = torch.isfinite(low) & torch.isfinite(high)
                n01 = torch.distributions.Normal(torch.zeros((), dtype=r.dtype),
                                                 torch.ones((), dtype=r.dtype))
                p_in = n01.cdf((high - m) / sd) - n01.cdf((low - m) / sd)
                acceptance = float(p_in[:, box].prod(1).mean())
            self.expected_acceptance = acceptance
            if acceptance < _REJECT_MIN_ACCEPTANCE:
                self.support = "bijection"
        if self._baseline_pending:
            self._baseline_pending = False
            self.baseline = self._auto_baseline()
            if not self.baseline:
                del self.b_weight, self.b_bias, self.b_scale

    def inside(self, theta: Tensor) -> Tensor:
        r"""Whether each :math:`\theta` ``(..., D)`` lies in the prior's support
        (``low <= theta <= high``): a boolean ``(...)``."""
        low, high = self.low.to(theta), self.high.to(theta)
        return ((theta >= low) & (theta <= high)).all(-1)

    def _raw(self, theta: Tensor) -> Tensor:
        """:math:`r(\\theta)` (unstandardised unconstrained coordinates)."""
        low, high = self.low.to(theta), self.high.to(theta)
        lo_f, hi_f, both = self._finite(low, high)
        width = torch.where(both, high - low, torch.ones_like(low))
        u = ((theta - torch.where(lo_f, low, 0)) / width).clamp(self.eps, 1 - self.eps)
        logit = torch.log(u) - torch.log1p(-u)
        tiny = self.eps * torch.where(lo_f, low.abs(), high.abs()).clamp_min(1.0)
        log_lo = torch.log((theta - torch.where(lo_f, low, 0)).clamp_min(tiny))
        log_hi = -torch.log((torch.where(hi_f, high, 0) - theta).clamp_min(tiny))
        return torch.where(both, logit, torch.where(lo_f, log_lo,
                                                    torch.where(hi_f, log_hi, theta)))

    def _unraw(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`\\theta = r^{-1}(r)` and :math:`\\log|d\\theta / dr|` elementwise."""
        low, high = self.low.to(r), self.high.to(r)
        lo_f, hi_f, both = self._finite(low, high)
        width = torch.where(both, high - low, torch.ones_like(low))
        lo0, hi0 = torch.where(lo_f, low, 0), torch.where(hi_f, high, 0)
        r_exp = r.clamp(max=80.0)
        box = lo0 + width * torch.sigmoid(r)
        box = torch.minimum(torch.maximum(box, lo0), torch.where(both, high, box))
        box_lj = torch.log(width) + nn.functional.logsigmoid(r) + nn.functional.logsigmoid(-r)
        theta = torch.where(both, box, torch.where(
            lo_f, lo0 + torch.exp(r_exp), torch.where(hi_f, hi0 - torch.exp((-r).clamp(max=80)),
                                                      r)))
        lj = torch.where(both, box_lj, torch.where(lo_f, r, torch.where(hi_f, -r,
                                                                      torch.zeros_like(r))))
        return theta, lj

    def encode(self, theta: Tensor) -> Tensor:
        r""":math:`z = (r(\theta) - \mu_r) / s_r`, ``theta`` ``(..., D)`` -> ``(..., D)``."""
        theta = self._check_theta(theta)
        return (self._raw(theta) - self.z_loc.to(theta)) / self.z_scale.to(theta)

    def decode(self, z: Tensor) -> Tensor:
        r""":math:`\theta = r^{-1}(\mu_r + s_r z)` (always inside the support)."""
        return self._unraw(self.z_loc.to(z) + self.z_scale.to(z) * z)[0]

    def log_abs_det(self, z: Tensor) -> Tensor:
        r""":math:`\log|\det \partial\theta / \partial z|`, ``z`` ``(..., D)`` -> ``(...)``."""
        lj = self._unraw(self.z_loc.to(z) + self.z_scale.to(z) * z)[1]
        return (lj + torch.log(self.z_scale.to(z))).sum(-1)

    def standardize_y(self, y: Tensor) -> Tensor:
        """``(y - mean) / std`` entry by entry, ``y`` ``(B, *y_shape)``."""
        if not self.standardize:
            return y
        return (y - self.y_loc.to(y)) / self.y_scale.to(y)

    def _check_theta(self, theta: Tensor) -> Tensor:
        if not isinstance(theta, Tensor) or not theta.is_floating_point():
            raise TypeError("theta must be a floating-point tensor")
        if theta.shape[-1:] != (self.dim,):
            raise ValueError(f"theta must have shape (..., {self.dim}), got "
                             f"{tuple(theta.shape)}")
        return theta

    def _check_y(self, y: Tensor, what: str = "y") -> Tensor:
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor")
        if self.y_shape is not None and tuple(y.shape[1:]) != self.y_shape:
            raise ValueError(f"{what} must have shape (B, {', '.join(map(str, self.y_shape))}), "
                             f"got {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            raise ValueError(f"{what} contains NaN or infinity")
        return y

    @torch.no_grad()
    def standardize_from(self, theta: Tensor, y: Tensor) -> ConditionalDenoiser:
        r"""Fits the standardisation of :math:`r(\theta)` and :math:`y` (and the Gaussian of
        the training :math:`z`, used when the prior score must be approximated) to samples
        ``theta`` ``(N, D)``, ``y`` ``(N, *y_shape)``. Returns ``self``."""
        theta = self._check_theta(theta)
        if theta.dim() != 2 or theta.shape[0] < 2:
            raise ValueError(f"theta must have shape (N, {self.dim}) with N >= 2, got "
                             f"{tuple(theta.shape)}")
        if not torch.isfinite(theta).all():
            raise ValueError("theta contains NaN or infinity")
        y = self._check_y(y)
        if y.shape[0] != theta.shape[0]:
            raise ValueError(f"theta and y must have the same number of rows, got "
                             f"{theta.shape[0]} and {y.shape[0]}")
        self._resolve_support(theta.to(_F64).to(self.low.device), y.to(_F64))
        r = self._raw(theta.to(_F64).to(self.low.device)).to(_F64)
        yy = y.to(_F64)
        if self.standardize:
            loc, scale = r.mean(0), r.std(0)
            scale = torch.where(scale > 1e-8 * (1 + loc.abs()), scale, torch.ones_like(scale))
            yl, ysc = yy.mean(0), yy.std(0)
            ysc = torch.where(ysc > 1e-8 * (1 + yl.abs()), ysc, torch.ones_like(ysc))
        else:
            loc, scale = torch.zeros_like(r[0]), torch.ones_like(r[0])
            yl, ysc = torch.zeros_like(yy[0]), torch.ones_like(yy[0])
        z = (r - loc) / scale
        if self.baseline:
            self._fit_baseline(z, ((yy - yl) / ysc).reshape(len(z), -1))
        self.z_loc.data = loc.to(self.z_loc)
        self.z_scale.data = scale.to(self.z_scale)
        self.z_cov.data = torch.cov(z.T).reshape(self.dim, self.dim).to(self.z_cov)
        self.y_loc.data = yl.to(self.y_loc.device, self.y_loc.dtype)
        self.y_scale.data = ysc.to(self.y_scale.device, self.y_scale.dtype)
        self.fitted.data.fill_(1.0)
        return self

    @torch.no_grad()
    def prepare(self, data: Any, batch_size: int = 256,
                generator: torch.Generator | None = None) -> None:
        """Called by :func:`plausible.fit` before training: if the model is not fitted yet,
        :meth:`standardize_from` on the training pairs of ``data`` (a dataset of
        :mod:`plausible.data`): all of them up to 16384, else 16384 drawn with replacement
        (``batch_size`` from a simulator stream, which has no length)."""
        if self.is_fitted or not (self.standardize or self.baseline or self._baseline_pending
                                  or self.support == "auto"):
            return
        try:
            N = len(data)
        except TypeError:  # a SimulatorStream
            N = None
        if N is not None and N <= 16384:
            index = torch.arange(N)
        else:
            index = data.draw_indices(16384 if N is not None else batch_size,
                                      generator or torch.Generator().manual_seed(0))
        batch = data.batch(index, device=self.z_loc.device, dtype=self.z_loc.dtype)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("a ConditionalDenoiser trains on pairs (theta, y)")
        self.standardize_from(batch[0], batch[1])

    @torch.no_grad()
    def _fit_baseline(self, z: Tensor, y: Tensor, ridge: float = 1e-3) -> None:
        r"""Ridge regression :math:`z \approx W y + b` (``z`` ``(N, D)``, ``y`` ``(N, Y)``,
        float64, penalty ``ridge * N`` on the standardised :math:`y`) and the residual
        standard deviations :math:`s` (floored at 1e-3)."""
        W, b, s = _ridge(z, y, ridge, coefficients=True)
        self.b_weight.data = W.to(self.b_weight)
        self.b_bias.data = b.to(self.b_bias)
        self.b_scale.data = s.to(self.b_scale)

    def condition(self, y: Tensor | None, keep: Tensor | None = None) -> dict[str, Tensor]:
        """The keyword arguments of the backbone call for the (unstandardised) ``y``
        ``(B, *y_shape)``: ``context`` ``(B, C)`` (see :meth:`context`) and, with
        ``baseline=True``, the Gaussian baseline ``loc`` ``(B, D)`` and ``scale`` ``(B, D)``
        (the prior's ``0`` and ``1`` on rows with ``keep == False``). ``y`` ``None``: the
        learned unconditional denoiser (null context, no baseline)."""
        if y is None:
            if self.null is None:
                raise ValueError("ConditionalDenoiser needs y=... (or context=...); bind "
                                 "observations with .given(y)")
            return {"context": self.null[None]}
        ys = self.standardize_y(y)
        cond = {"context": self.context(y, keep)}
        if self.baseline:
            w = self.b_weight.to(ys)
            loc = ys.flatten(1) @ w.T + self.b_bias.to(ys)
            scale = self.b_scale.to(ys).expand_as(loc)
            if keep is not None and self.null is not None:
                loc = torch.where(keep[:, None], loc, torch.zeros_like(loc))
                scale = torch.where(keep[:, None], scale, torch.ones_like(scale))
            cond["loc"], cond["scale"] = loc, scale
        return cond

    # -- denoising -----------------------------------------------------------------------

    def context(self, y: Tensor | None, keep: Tensor | None = None) -> Tensor | None:
        """Embedding of the standardised ``y`` ``(B, *y_shape)`` -> ``(B, C)``; rows with
        ``keep == False`` (or all rows when ``y`` is ``None``) get the null embedding."""
        if y is None:
            if self.null is None:
                raise ValueError("an unconditional evaluation needs a model trained with "
                                 "p_uncond > 0")
            return None
        c = self.embed(self.standardize_y(y))
        if keep is not None and self.null is not None:
            c = torch.where(keep[:, None], c, self.null.to(c))
        return c

    def forward(self, x_t: Tensor, t: Tensor | float, y: Tensor | None = None,
                context: Tensor | None = None, **cond: Any) -> Tensor:
        r""":math:`d(z_t, t, y)` for ``x_t`` ``(B, D)`` in the sampling space and ``y``
        ``(B, *y_shape)`` (or precomputed keyword arguments of :meth:`condition`:
        ``context`` ``(B, C)`` and, with ``baseline=True``, ``loc`` and ``scale``; none of
        them: the learned unconditional denoiser)."""
        if context is None:
            if y is not None:
                cond = {**cond, **self.condition(self._check_y(y))}
            else:
                cond = {**cond, **self.condition(None)}
            context = cond.pop("context").expand(x_t.shape[0], -1)
        elif self.baseline and y is None and "loc" not in cond:
            raise ValueError("a model with baseline=True needs loc= and scale= with context= "
                             "(pass **model.condition(y) instead of context=)")
        return super().forward(x_t, t, context=context, **cond)

    def draw_noise(self, x: Tensor, generator: torch.Generator | None = None,
                   t_distribution: str = "lognormal", log_rho: tuple[float, float] = LOG_RHO,
                   **options: Any) -> dict[str, Tensor]:
        r"""As :meth:`~plausible.denoisers.Preconditioned.draw_noise`, with log-normal noise
        levels by default: :math:`\log\rho \sim \mathcal{N}(-2, 1.6^2)` (:data:`LOG_RHO`).
        Log-normal levels (EDM's ``(-1.2, 1.2)``) lowered C2ST on two_moons at 10^4
        simulations from 0.63 to 0.53 against uniform times; the lower, wider ``(-2, 1.6)``
        puts more training where posteriors much narrower than the prior are resolved
        (BENCHMARKS.md section 6, C2ST at 10^4 simulations: lotka_volterra 0.942 -> 0.888,
        slcp 0.799 -> 0.760, sir 0.637 -> 0.628, gaussian_mixture 0.586 -> 0.580, and 0.756 ->
        0.741 over 3 seeds at 10^3; two_moons and gaussian_linear unchanged)."""
        return super().draw_noise(x, generator, t_distribution, log_rho=log_rho, **options)

    def loss(self, theta: Tensor, y: Tensor, t: Tensor | None = None, eps: Tensor | None = None,
             **options: Any) -> Tensor:
        r"""Denoising loss on pairs ``theta`` ``(B, D)``, ``y`` ``(B, *y_shape)`` in the
        sampling space: :math:`\mathbb{E}\, w(t) \|d(z_t, t, y) - z\|^2` with
        :math:`z = ` :meth:`encode` ``(theta)``. Options as
        :meth:`~plausible.denoisers.Preconditioned.loss`."""
        if (self.standardize or self.baseline or self._baseline_pending
                or self.support == "auto") and not self.is_fitted:
            self.standardize_from(theta.detach(), y.detach())
        z = self.encode(theta)
        keep = None
        if self.null is not None and self.training:
            keep = torch.rand(z.shape[0], device=z.device) >= self.p_uncond
        cond = self.condition(self._check_y(y), keep)
        options.setdefault("t_distribution", "lognormal")
        options.setdefault("log_rho", LOG_RHO)
        return super().loss(z, t, eps, **cond, **options)

    # -- posteriors ----------------------------------------------------------------------

    def given(self, y: Tensor) -> AmortizedPosterior:
        """The posterior denoiser for observation(s) ``y``: ``(*y_shape)`` -> states ``(D,)``;
        ``(M, *y_shape)`` -> states ``(M, D)`` (``M`` independent posteriors)."""
        return AmortizedPosterior(self, y)

    def prior_denoiser(self, kind: str = "auto") -> Denoiser:
        r"""The prior's denoiser in the sampling space (states ``(D,)``).

        Arguments:
            kind: ``"exact"`` (a Gaussian or log-normal prior: a
                :class:`~plausible.denoisers.GaussianDenoiser`; a box-uniform prior: the
                logistic :class:`ProductDenoiser` through the logit, the uniform
                :class:`BoxDenoiser` with ``support="reject"``), ``"learned"`` (the
                unconditional denoiser, needs ``p_uncond > 0``), ``"gaussian"`` (the
                Gaussian fitted to the training :math:`z`) or ``"auto"`` (the first available
                of these).
        """
        spec = self.prior
        exact = spec is not None and spec["kind"] in ("gaussian", "lognormal", "box")
        if kind == "auto":
            kind = "exact" if exact else ("learned" if self.null is not None else "gaussian")
        loc, scale = self.z_loc.detach().to(_F64), self.z_scale.detach().to(_F64)
        if kind == "exact":
            if not exact:
                raise ValueError("no exact prior score: the prior is not Gaussian, log-normal "
                                 "or box-uniform (pass prior= at construction)")
            if spec["kind"] == "box" and self.support == "reject":
                low, high = self.low.to(_F64), self.high.to(_F64)
                return BoxDenoiser((low - loc) / scale, (high - loc) / scale, self.schedule)
            if spec["kind"] == "box":
                return logistic_prior_denoiser(-loc / scale, 1 / scale, self.schedule)
            if spec["kind"] == "gaussian":
                mean = torch.as_tensor(spec["mean"], dtype=_F64)
                cov = torch.as_tensor(spec["cov"], dtype=_F64)
            else:
                mean = torch.as_tensor(spec["loc"], dtype=_F64)
                cov = torch.diag(torch.as_tensor(spec["scale"], dtype=_F64) ** 2)
            mz = (mean - loc) / scale
            cz = cov / scale[:, None] / scale[None, :]
            return GaussianDenoiser(mz, cz, self.schedule)
        if kind == "learned":
            if self.null is None:
                raise ValueError("kind='learned' needs a model trained with p_uncond > 0")
            return _Unconditional(self)
        if kind == "gaussian":
            return GaussianDenoiser(torch.zeros(self.dim, dtype=_F64),
                                    self.z_cov.detach().to(_F64), self.schedule)
        raise ValueError(f"kind must be 'auto', 'exact', 'learned' or 'gaussian', got {kind!r}")

    def prior_covariance(self, denoiser: Denoiser | None = None) -> Tensor:
        """Covariance ``(D, D)`` of the prior in the sampling space (exact for Gaussian,
        log-normal and box priors; otherwise that of the training :math:`z`)."""
        spec = self.prior
        scale = self.z_scale.detach().to(_F64)
        if spec is not None and spec["kind"] == "box" and self.support == "reject":
            width = (self.high - self.low).to(_F64)
            return torch.diag(width**2 / 12 / scale**2)
        if spec is not None and spec["kind"] == "box":
            return torch.diag((math.pi**2 / 3) / scale**2)
        if isinstance(denoiser, GaussianDenoiser):
            return denoiser.covariance
        if spec is not None and spec["kind"] in ("gaussian", "lognormal"):
            d = self.prior_denoiser("exact")
            return d.covariance  # type: ignore[union-attr]
        return self.z_cov.detach().to(_F64)

    def given_iid(
        self,
        y: Tensor,
        method: str = "gauss",
        prior: str | Denoiser = "auto",
        covariances: Tensor | None = None,
        cov_samples: int = 512,
        cov_steps: int = 32,
        seed: int | None = 0,
    ) -> IIDPosterior:
        r"""The posterior of one :math:`\theta` given ``n`` iid observations ``y``
        ``(n, *y_shape)``, composed from the per-observation posteriors (module docstring).

        Arguments:
            method: ``"gauss"`` (Linhart et al. 2024) or ``"factorized"`` (Geffner et al.
                2023).
            prior: The prior denoiser in the sampling space, or a ``kind`` of
                :meth:`prior_denoiser`.
            covariances: Per-observation posterior covariances ``(n, D, D)`` in the sampling
                space for ``"gauss"``; default: estimated from ``cov_samples`` samples of each
                per-observation posterior (``cov_steps`` DPM++ steps on a log-SNR grid; on an
                exact Gaussian, 32 steps over-disperse the variances by 2.5 %, where DDPM
                under-disperses them by 20 %).

        With ``support="reject"`` and a box prior, the composition happens in :math:`\\theta`'s
        own coordinates with the exact uniform prior (:class:`BoxDenoiser`) and the samples
        are then restricted to the box. That is accurate where the per-observation posteriors
        stay clear of the box's faces (the regime where ``support="auto"`` rejects;
        tested to the Monte-Carlo error at n = 100), not where they are cut by a face
        (measured 0.8 posterior std off at n = 10): compose those through the logit
        (``support="bijection"``).
        """
        y = self._check_y(y if y.dim() > len(self.y_shape or ()) else y[None], "y")
        post = self.given(y)
        prior_d = self.prior_denoiser(prior) if isinstance(prior, str) else prior
        prior_cov = self.prior_covariance(prior_d)
        if method == "gauss" and covariances is None:
            from .sampling import sample

            # of z, the sampling space (plausible.sample(post) would decode them to theta);
            # DPM++ on a log-SNR grid: DDPM's under-dispersion biases covariances low (-20 %
            # at 32 steps on a Gaussian, against +2.5 % for DPM++)
            opts = {"steps": cov_steps, "sampler": "dpm++", "grid": "logsnr", "seed": seed}
            z = sample(_Bare(post), cov_samples, progress=False, **opts)
            if post.rejects:  # the per-observation posteriors are restricted to the box
                z = self.encode(post.sample(cov_samples, **opts))
            z = z.to(_F64).transpose(0, 1)  # (n, S, D)
            zc = z - z.mean(1, keepdim=True)
            covariances = zc.transpose(1, 2) @ zc / (cov_samples - 1)
        return IIDPosterior(post, prior_d, method=method, covariances=covariances,
                            prior_covariance=prior_cov, model=self)


class _Unconditional(Denoiser):
    """The learned unconditional denoiser of a :class:`ConditionalDenoiser` (null context)."""

    def __init__(self, model: ConditionalDenoiser) -> None:
        super().__init__()
        self.model = model
        self.schedule = model.schedule
        self.shape = model.shape

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self.model(x_t, t)


def _to_config(model: ConditionalDenoiser) -> dict[str, Any]:
    return {
        "backbone": model_config(model.backbone),
        "embed": model_config(model.embed),
        "schedule": model.schedule.config,
        "sigma_data": model.sigma_data,
        "prior": model.prior,
        "y_shape": list(model.y_shape) if model.y_shape is not None else None,
        "p_uncond": model.p_uncond,
        "standardize": model.standardize,
        "eps": model.eps,
        "baseline": "auto" if model._baseline_pending else model.baseline,
        "support": model.support,
    }


def _from_config(config: dict[str, Any], tensors: dict[str, Tensor]) -> ConditionalDenoiser:
    def sub(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    spec = config["prior"]
    model = ConditionalDenoiser(
        build_model(config["backbone"], sub("backbone.")),
        schedule_from_config(config["schedule"]),
        build_model(config["embed"], sub("embed.")),
        prior=spec if spec is None or spec["kind"] != "bounded" else None,
        bounds=(spec["low"], spec["high"]) if spec is not None and spec["kind"] == "bounded"
        else None,
        y_shape=config["y_shape"],
        sigma_data=config["sigma_data"],
        p_uncond=config["p_uncond"],
        standardize=config["standardize"],
        eps=config["eps"],
        baseline=config.get("baseline", False),
        support=config.get("support", "bijection"),  # checkpoints before it: the logit
    )
    return model


register(ConditionalDenoiser, _to_config, _from_config)


# ---------------------------------------------------------------------------------------------
# posteriors over the sampling space


class _SpaceMixin:
    """Maps between the sampling space and theta, and densities, for posterior denoisers."""

    model: ConditionalDenoiser
    #: Default sampler: DDPM on a log-SNR time grid. Against the uniform grid (128 steps,
    #: C2ST at 10^4 simulations, BENCHMARKS.md section 6): two_moons 0.549 -> 0.519, sir
    #: 0.628 -> 0.576, gaussian_mixture 0.570 -> 0.539, slcp 0.760 -> 0.756.
    sampling: ClassVar[dict[str, Any]] = {"sampler": "ddpm", "grid": "logsnr"}

    def decode(self, z: Tensor) -> Tensor:
        """Samples of the sampling space ``(..., D)`` -> :math:`\\theta` ``(..., D)``."""
        return self.model.decode(z)

    def encode(self, theta: Tensor) -> Tensor:
        """:math:`\\theta` ``(..., D)`` -> the sampling space ``(..., D)``."""
        return self.model.encode(theta)

    @property
    def rejects(self) -> bool:
        """Whether samples are restricted to the prior's box by rejection (a model with
        ``support="reject"`` and a box-bounded coordinate)."""
        model = getattr(self, "model", None)
        return bool(model is not None and model.support == "reject"
                    and (torch.isfinite(model.low) & torch.isfinite(model.high)).any())

    def sample(self, n: int, steps: int = 128, sampler: str | None = "ddpm",
               min_acceptance: float = 1e-3, refine: int = 0, refine_step: float = 0.02,
               **kwargs: Any) -> Tensor:
        """``n`` posterior samples of :math:`\\theta`: ``(n, *shape)`` (``plausible.sample``
        on the sampling space, then :meth:`decode`). ``kwargs`` go to
        :func:`plausible.sample` (``seed``, ``progress``, ``grid``...); the default is DDPM
        with 128 steps on a log-SNR grid (:attr:`sampling`).

        ``refine > 0`` then runs that many preconditioned Langevin steps of size
        ``refine_step`` at a small noise level (:func:`plausible.langevin`, one evaluation
        each) on the sampling space's samples before they are decoded. For an
        :class:`IIDPosterior` this removes the composition's error, since the composed score
        is exact only as the noise vanishes (measured with exact per-observation posteriors on
        a box prior at n = 100 observations: 1.7 posterior std off without it, within the
        Monte-Carlo error with 300 steps). It trusts the scores at small noise: with a network
        trained on a small budget it made the composition worse (docs/sbi.md), so it is off by
        default.

        With a model of ``support="reject"`` and a box prior, samples outside the box are
        drawn again (in rounds of about the missing number over the acceptance rate so far,
        seeds ``seed, seed + 1, ...``) until every observation has ``n`` inside; the
        acceptance rates ``(M,)`` (or ``()``) are left in :attr:`acceptance`.

        Raises:
            ValueError: If, after at least ``n`` draws, an observation's acceptance rate is
                below ``min_acceptance`` (the learned posterior lies mostly outside the prior's
                support: a misspecified observation, or a model to train with
                ``support="bijection"``).
        """
        from .sampling import sample

        kwargs.setdefault("progress", False)
        if kwargs.get("grid") is None:
            kwargs["grid"] = self.sampling["grid"]
        model = getattr(self, "model", None)
        if not self.rejects:
            # sampled through a wrapper without `decode`, so that z is decoded exactly once
            # even if plausible.sample learns to decode denoisers that define it
            z = sample(_Bare(self), n, steps=steps, sampler=sampler, **kwargs)  # type: ignore
            return self.decode(self._refine(z, refine, refine_step, kwargs, 0))
        if not 0.0 < min_acceptance <= 1.0:
            raise ValueError(f"min_acceptance must be in (0, 1], got {min_acceptance}")
        seed = kwargs.pop("seed", None)
        if kwargs.get("generator") is not None and seed is not None:
            raise ValueError("pass either generator= or seed=, not both")
        shape = tuple(self.shape)  # type: ignore[attr-defined]
        batched = len(shape) == 2
        M = shape[0] if batched else 1
        out: Tensor | None = None
        filled = [0] * M
        accepted = torch.zeros(M, dtype=_F64)
        drawn, k, batch = 0, 0, n
        while True:
            z = sample(_Bare(self), batch, steps=steps, sampler=sampler,  # type: ignore
                       seed=None if seed is None else seed + k, **kwargs)
            z = self._refine(z, refine, refine_step, {**kwargs, "seed": seed}, k)
            theta = self.decode(z)
            th = theta if batched else theta[:, None]  # (batch, M, D)
            ok = model.inside(th)  # (batch, M)
            if out is None:
                out = th.new_empty(n, M, th.shape[-1])
            for m in range(M):
                good = th[ok[:, m], m]
                take = min(n - filled[m], good.shape[0])
                out[filled[m]:filled[m] + take, m] = good[:take]
                filled[m] += take
            accepted += ok.sum(0).to(_F64).cpu()
            drawn += batch
            k += 1
            rate = accepted / drawn
            self.acceptance = rate if batched else rate[0]
            missing = torch.tensor([n - f for f in filled], dtype=_F64)
            if (missing <= 0).all():
                return out if batched else out[:, 0]
            if drawn >= n and bool((rate[missing > 0] < min_acceptance).any()):
                worst = float(rate[missing > 0].min())
                raise ValueError(
                    f"only {worst:.2e} of the posterior samples fell inside the prior's support "
                    f"(min_acceptance={min_acceptance:g}): the learned posterior lies mostly "
                    "outside it; check the observation, or train with support='bijection'")
            need = float((missing / rate.clamp_min(min_acceptance)).max())
            batch = int(min(max(1.1 * need + 16, 64), 4 * n + 64))

    def _refine(self, z: Tensor, steps: int, step: float, kwargs: dict[str, Any],
                k: int) -> Tensor:
        """:func:`plausible.langevin` on samples ``z`` of the sampling space (``(n, D)`` or
        ``(n, M, D)``), seeded from ``kwargs``' seed (offset by ``k``) or generator."""
        if not steps:
            return z
        from .langevin import langevin

        seed = kwargs.get("seed")
        return langevin(_Bare(self), z, steps, step, generator=kwargs.get("generator"),  # type: ignore
                        seed=None if seed is None else seed + 7919 * (k + 1),
                        progress=bool(kwargs.get("progress", False)))

    def log_prob(self, theta: Tensor, steps: int = 128, exact: bool | None = None,
                 probes: int = 1, seed: int | None = 0) -> Tensor:
        r""":math:`\log p(\theta \mid y)` by the probability-flow ODE (:func:`flow_log_prob`)
        in the sampling space minus the bijection's log-Jacobian. ``theta`` ``(B, *shape)``;
        returns ``(B,)`` or ``(B, M)`` for ``M`` batched observations (float64).

        With ``support="reject"`` it is :math:`-\\infty` outside the prior's box and, inside,
        the learned density before the restriction to the box: the normalised density of the
        samples is :math:`\\log p - \\log a` with :math:`a` the acceptance rate
        (:attr:`acceptance` after :meth:`sample`), a constant per observation that rankings
        (highest-density coverage, MAP) do not need."""
        z = self.encode(theta)
        logp = flow_log_prob(self, z, steps=steps, exact=exact, probes=probes,  # type: ignore
                             event_dims=1, seed=seed)
        model = getattr(self, "model", None)
        if model is None:  # an IIDPosterior without a model: the sampling space is theta's
            return logp
        logp = logp - model.log_abs_det(z.to(_F64)).to(_F64)
        if model.support == "reject":
            inside = model.inside(theta).to(logp.device)
            inside = inside.reshape(inside.shape + (1,) * (logp.dim() - inside.dim()))
            logp = torch.where(inside, logp, torch.full_like(logp, -math.inf))
        return logp


class _Bare(Denoiser):
    """The same denoiser seen as a plain :class:`Denoiser` of the sampling space."""

    def __init__(self, inner: Denoiser) -> None:
        super().__init__()
        self.inner = inner
        self.schedule = inner.schedule
        self.shape = inner.shape

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self.inner(x_t, t, **cond)


class AmortizedPosterior(_SpaceMixin, Denoiser):
    r"""The posterior denoiser :math:`d(z_t, t) = d_\phi(z_t, t, y)` of a
    :class:`ConditionalDenoiser` with observations bound (built by
    :meth:`ConditionalDenoiser.given`).

    ``plausible.sample(post, n)`` draws in the sampling space (``(n, *post.shape)``);
    :meth:`sample` draws :math:`\theta` directly; :meth:`decode` maps samples to
    :math:`\theta`; :meth:`log_prob` evaluates densities of :math:`\theta`.
    """

    def __init__(self, model: ConditionalDenoiser, y: Tensor) -> None:
        super().__init__()
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError("y must be a floating-point tensor")
        ys = model.y_shape
        if ys is None:
            raise ValueError("the model's y_shape is unknown: train it or call "
                             "standardize_from first")
        if tuple(y.shape) == ys:
            self.batched = False
            yb = y[None]
        elif tuple(y.shape[1:]) == ys:
            self.batched = True
            yb = y
        else:
            raise ValueError(f"y must have shape {ys} (one observation) or (M, "
                             f"{', '.join(map(str, ys))}) (M observations), got "
                             f"{tuple(y.shape)}")
        if not torch.isfinite(yb).all():
            raise ValueError("y contains NaN or infinity")
        self.model = model
        self.schedule = model.schedule
        dev = model.z_loc.device
        self.register_buffer("y", yb.to(dev, model.z_loc.dtype))
        self.M = yb.shape[0]
        self.shape = (self.M, model.dim) if self.batched else (model.dim,)

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = self.check(x_t, t)
        B, D = x_t.shape[0], self.model.dim
        # (M, ...) -> (B * M, ...), row b * M + m
        cond = {k: v.repeat(B, 1) for k, v in self.model.condition(self.y).items()}
        z = x_t.reshape(B * self.M, D)
        tt = t.repeat_interleave(self.M)
        out = self.model(z, tt, **cond)
        return out.reshape(x_t.shape)


class IIDPosterior(_SpaceMixin, Denoiser):
    r"""Posterior of one parameter given ``n`` iid observations, composed from a denoiser of
    the ``n`` per-observation posteriors (states ``(n, D)``) and a prior denoiser (states
    ``(D,)``), by the factorized or the GAUSS score (module docstring). Any denoisers work
    (e.g. :class:`StackedDenoiser` of exact ones); :meth:`ConditionalDenoiser.given_iid`
    builds it from a trained model.

    Arguments:
        posteriors: Denoiser of states ``(n, D)``: row ``j`` is :math:`p(z \mid y_j)`.
        prior: Denoiser of the prior, states ``(D,)``, same schedule.
        method: ``"gauss"`` or ``"factorized"``.
        covariances: ``(n, D, D)`` covariances :math:`C_j` of the per-observation posteriors
            (``"gauss"``).
        prior_covariance: ``(D, D)`` prior covariance :math:`C_\lambda` (``"gauss"``; default
            ``prior.covariance`` of a Gaussian prior denoiser).
        model: The :class:`ConditionalDenoiser` whose sampling space this is (for
            :meth:`decode` / :meth:`sample` / :meth:`log_prob`), or ``None``.
    """

    def __init__(
        self,
        posteriors: Denoiser,
        prior: Denoiser,
        method: str = "gauss",
        covariances: Tensor | None = None,
        prior_covariance: Tensor | None = None,
        model: ConditionalDenoiser | None = None,
    ) -> None:
        super().__init__()
        if method not in ("gauss", "factorized"):
            raise ValueError(f"method must be 'gauss' or 'factorized', got {method!r}")
        if posteriors.shape is None or len(posteriors.shape) != 2:
            raise ValueError(f"posteriors must be a denoiser of states (n, D), got shape "
                             f"{posteriors.shape}")
        n, D = posteriors.shape
        if tuple(prior.shape or ()) != (D,):
            raise ValueError(f"the prior denoiser must have states ({D},), got {prior.shape}")
        if posteriors.schedule != prior.schedule:
            raise ValueError("the posteriors and the prior must share one schedule")
        self.posteriors, self.prior_d = posteriors, prior
        self.method, self.n = method, n
        self.schedule = posteriors.schedule
        self.shape = (D,)
        if model is not None:
            self.model = model
        if method == "gauss":
            if covariances is None:
                raise ValueError("method='gauss' needs the per-observation covariances (n, D, D)")
            if prior_covariance is None:
                if not isinstance(prior, GaussianDenoiser):
                    raise ValueError("method='gauss' needs prior_covariance (D, D)")
                prior_covariance = prior.covariance
            C = torch.as_tensor(covariances, dtype=_F64)
            Cl = torch.as_tensor(prior_covariance, dtype=_F64)
            if C.shape != (n, D, D) or Cl.shape != (D, D):
                raise ValueError(f"covariances must be ({n}, {D}, {D}) and prior_covariance "
                                 f"({D}, {D}), got {tuple(C.shape)} and {tuple(Cl.shape)}")
            if not (torch.isfinite(C).all() and torch.isfinite(Cl).all()):
                raise ValueError("the covariances must be finite")
            prec = _spd_inverse(C)  # (n, D, D)
            prec_l = _spd_inverse(Cl[None])[0]
            P = prec.sum(0) + (1 - n) * prec_l
            P = (P + P.T) / 2
            lam, V = torch.linalg.eigh(P)
            floor = float(torch.linalg.eigvalsh(prec_l).min())
            clamped = lam < floor
            self.clamped = int(clamped.sum())
            lam = lam.clamp_min(floor)
            self.register_buffer("P_clamped", clamped)
            self.register_buffer("prec", prec)
            self.register_buffer("prec_l", prec_l)
            self.register_buffer("P_lam", lam)
            self.register_buffer("P_V", V)

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = self.check(x_t, t)
        B, D = x_t.shape
        n = self.n
        xs = x_t[:, None, :].expand(B, n, D).contiguous()
        d_j = self.posteriors(xs, t).to(_F64)  # (B, n, D)
        d_l = self.prior_d(x_t, t).to(_F64)  # (B, D)
        if self.method == "factorized":
            return (d_j.sum(1) - (n - 1) * d_l).to(x_t.dtype)
        alpha, sigma = self.schedule(t.to(_F64))
        a2, s2 = (alpha**2)[:, None], (sigma**2)[:, None]
        x = x_t.to(_F64)
        # sigma^2 s_j = alpha d_j - x; weights W = alpha^2 I + sigma^2 C^{-1}
        r_j = alpha[:, None, None] * d_j - x[:, None, :]
        r_l = alpha[:, None] * d_l - x
        acc = a2 * r_j.sum(1) + s2 * torch.einsum("jde,bje->bd", self.prec, r_j)
        acc = acc + (1 - n) * (a2 * r_l + s2 * r_l @ self.prec_l.T)
        # sigma^2 s = Lambda^{-1} acc, Lambda = alpha^2 I + sigma^2 P
        inv = (acc @ self.P_V) / (a2 + s2 * self.P_lam)
        if self.clamped:  # where P was not positive, the composition carries no valid
            # information: those eigen-directions follow the prior's score alone
            inv = torch.where(self.P_clamped, r_l @ self.P_V, inv)
        s2_score = inv @ self.P_V.T
        return ((x + s2_score) / alpha[:, None]).to(x_t.dtype)

    def decode(self, z: Tensor) -> Tensor:
        if not hasattr(self, "model"):
            return z
        return super().decode(z)

    def encode(self, theta: Tensor) -> Tensor:
        if not hasattr(self, "model"):
            return theta
        return super().encode(theta)


def _spd_inverse(C: Tensor) -> Tensor:
    """Inverses of symmetric positive (semi-)definite ``(n, D, D)`` matrices, eigenvalues
    floored at ``1e-10`` times the largest (float64)."""
    C = (C + C.transpose(-1, -2)) / 2
    lam, V = torch.linalg.eigh(C)
    lam = lam.clamp_min(1e-10 * lam.amax(-1, keepdim=True).clamp_min(1e-300))
    return (V / lam[..., None, :]) @ V.transpose(-1, -2)


# ---------------------------------------------------------------------------------------------
# densities by the probability-flow ODE


def _rates(schedule: Schedule, t: float) -> tuple[float, float, float]:
    r""":math:`\alpha_t`, :math:`\dot\alpha_t / \alpha_t` and :math:`\dot\rho_t / \rho_t`."""
    tt = torch.tensor(t, dtype=_F64, requires_grad=True)
    with torch.enable_grad():
        alpha, sigma = schedule(tt)
        log_a = torch.log(alpha)
        log_rho = torch.log(sigma) - log_a
        (g_a,) = torch.autograd.grad(log_a, tt, retain_graph=True)
        (g_r,) = torch.autograd.grad(log_rho, tt)
    return float(alpha.detach()), float(g_a), float(g_r)


def flow_log_prob(
    denoiser: Denoiser,
    x: Tensor,
    steps: int = 128,
    exact: bool | None = None,
    probes: int = 1,
    event_dims: int | None = None,
    seed: int | None = 0,
) -> Tensor:
    r"""Log-density of states under a denoiser's diffusion, by the probability-flow ODE.

    .. math:: \frac{dx}{dt} = v(x, t) = \frac{\dot\alpha}{\alpha} x + \frac{\dot\rho}{\rho}
        \big(x - \alpha\, d(x, t)\big), \qquad
        \log p_0(x_0) = \log \mathcal{N}(x_1; 0, (\alpha_1^2 + \sigma_1^2) I) +
        \int_0^1 \nabla \cdot v(x_t, t)\, dt,

    integrated by Heun's method on a grid log-uniform in :math:`\rho = \sigma / \alpha`. The
    terminal density assumes unit-variance data (the standardised sampling space; the
    error is of order :math:`\alpha_1^2`). The divergence
    :math:`\nabla \cdot v = E (\dot\alpha / \alpha + \dot\rho / \rho) - (\dot\rho / \rho)\,
    \alpha \operatorname{tr} \partial d / \partial x` uses the trace of the denoiser's
    Jacobian, exact (one ``torch.func.jvp`` per event dimension) or by Hutchinson's estimator
    :math:`\mathbb{E}[\epsilon^\top J \epsilon]` with ``probes`` Rademacher vectors (fixed
    along the trajectory).

    Arguments:
        denoiser: Any denoiser of states ``S``.
        x: States ``(B, *S)``.
        steps: Heun steps.
        exact: Exact trace (default when the event has at most 32 entries).
        probes: Hutchinson probes when not exact.
        event_dims: Number of trailing dimensions of ``S`` that form one event (default all);
            the others index independent events (e.g. ``(M, D)`` states of ``M`` batched
            posteriors with ``event_dims=1`` give ``(B, M)`` log-densities).
        seed: Seed of the Hutchinson probes.

    Returns:
        Log-densities ``(B, *S[:-event_dims])``, float64.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    S = tuple(denoiser.shape) if denoiser.shape is not None else tuple(x.shape[1:])
    if tuple(x.shape[1:]) != S:
        raise ValueError(f"x must have shape (B, {', '.join(map(str, S))}), got "
                         f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinity")
    if steps < 1 or probes < 1:
        raise ValueError("steps and probes must be positive")
    k = len(S) if event_dims is None else int(event_dims)
    if not 1 <= k <= len(S):
        raise ValueError(f"event_dims must be in 1..{len(S)}, got {event_dims}")
    ev = S[len(S) - k:]
    E = math.prod(ev)
    exact = E <= 32 if exact is None else bool(exact)
    sched = denoiser.schedule
    r0, r1 = float(sched.ratio(torch.tensor(0.0, dtype=_F64))), \
        float(sched.ratio(torch.tensor(1.0, dtype=_F64)))
    ts = sched.t_of_ratio(torch.logspace(math.log10(r0), math.log10(r1), steps + 1,
                                         dtype=_F64))
    ts[0], ts[-1] = 0.0, 1.0
    dtype = x.dtype
    B = x.shape[0]
    gen = torch.Generator(device=x.device)
    if seed is not None:
        gen.manual_seed(seed)
    noise = [(torch.randint(0, 2, x.shape, generator=gen, device=x.device) * 2 - 1).to(dtype)
             for _ in range(0 if exact else probes)]

    def reduce_event(v: Tensor) -> Tensor:
        return v.flatten(v.dim() - k).sum(-1) if k else v

    def field(x_t: Tensor, t: float) -> tuple[Tensor, Tensor]:
        alpha, g_a, g_r = _rates(sched, t)
        tt = torch.full((B,), t, dtype=dtype, device=x.device)

        def f(z: Tensor) -> Tensor:
            return denoiser(z, tt)

        if exact:
            trace = torch.zeros(x_t.shape[: x_t.dim() - k], dtype=_F64, device=x.device)
            d = None
            for i in range(E):
                e = torch.zeros(E, dtype=dtype, device=x.device)
                e[i] = 1
                tangent = e.reshape(ev).expand_as(x_t)
                d, jv = torch.func.jvp(f, (x_t,), (tangent,))
                trace = trace + reduce_event((jv * tangent).to(_F64))
        else:
            trace = 0.0
            d = None
            for eps in noise:
                d, jv = torch.func.jvp(f, (x_t,), (eps,))
                trace = trace + reduce_event((jv * eps).to(_F64)) / len(noise)
        assert d is not None
        v = g_a * x_t + g_r * (x_t - alpha * d)
        div = E * (g_a + g_r) - g_r * alpha * trace
        return v.detach(), div.detach()

    z = x.detach()
    logdet = torch.zeros(x.shape[: x.dim() - k], dtype=_F64, device=x.device)
    for i in range(steps):
        t0, t1 = float(ts[i]), float(ts[i + 1])
        h = t1 - t0
        v0, div0 = field(z, t0)
        z_pred = z + h * v0
        v1, div1 = field(z_pred, t1)
        z = z + h * (v0 + v1) / 2
        logdet = logdet + h * (div0 + div1) / 2
    a1, s1 = sched(torch.tensor(1.0, dtype=_F64))
    var1 = float(a1**2 + s1**2)
    log_p1 = -0.5 * reduce_event(z.to(_F64) ** 2) / var1 - 0.5 * E * math.log(2 * math.pi * var1)
    return log_p1 + logdet

