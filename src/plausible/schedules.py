r"""Noise schedules and time grids.

A schedule defines the perturbation kernel of the diffusion

.. math:: x_t = \alpha_t x + \sigma_t \epsilon, \qquad \epsilon \sim \mathcal{N}(0, I),
    \qquad t \in [0, 1],

with :math:`\alpha_t / \sigma_t` decreasing in :math:`t` (:math:`t = 0` is (almost) data,
:math:`t = 1` is (almost) pure noise). Every schedule returns ``(alpha_t, sigma_t)`` with the
shape of ``t``, and can be inverted in terms of the noise-to-signal ratio
:math:`\rho_t = \sigma_t / \alpha_t` (used by the EDM/Karras time grid).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "VPSchedule",
    "VESchedule",
    "RectifiedSchedule",
    "time_grid",
    "schedule_from_config",
]


class Schedule:
    r"""Base class of noise schedules :math:`t \mapsto (\alpha_t, \sigma_t)`.

    Subclasses implement :meth:`alpha_sigma` and :attr:`config`.
    """

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`(\alpha_t, \sigma_t)`, each with the shape of ``t``."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        return self.alpha_sigma(t)

    def ratio(self, t: Tensor | float) -> Tensor:
        r"""Noise-to-signal ratio :math:`\rho_t = \sigma_t / \alpha_t` (increasing in t)."""
        alpha, sigma = self(t)
        return sigma / alpha

    def log_snr(self, t: Tensor | float) -> Tensor:
        r"""Half log signal-to-noise ratio :math:`\lambda_t = \log(\alpha_t / \sigma_t)`."""
        alpha, sigma = self(t)
        return torch.log(alpha) - torch.log(sigma)

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        r"""Inverse of :meth:`ratio`: the time :math:`t` with :math:`\sigma_t / \alpha_t = \rho`.

        Solved by bisection in float64 (60 halvings, exact to machine precision); ratios
        outside :math:`[\rho_0, \rho_1]` are clipped to ``[0, 1]``. The schedules of this
        module override it by their closed forms (the bisection cost 18 % of a training step
        with log-normal noise levels).
        """
        ratio = torch.as_tensor(ratio, dtype=torch.float64)
        lo = torch.zeros_like(ratio)
        hi = torch.ones_like(ratio)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = self.ratio(mid) > ratio
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        return (lo + hi) / 2

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description; ``schedule_from_config(s.config)`` rebuilds ``s``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "kind")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.config == other.config

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config.items())))


class VPSchedule(Schedule):
    r"""Variance-preserving cosine schedule in the form of SDA (Rozet & Louppe, 2023).

    .. math:: \alpha_t = \cos\big(\arccos(\sqrt{\eta})\, t\big)^2, \qquad
        \sigma_t = \sqrt{1 - \alpha_t^2 + \eta^2}

    so that :math:`\alpha_0 = 1, \sigma_0 = \eta` and :math:`\alpha_1 = \eta, \sigma_1 = 1`.

    Arguments:
        eta: The smallest noise level and smallest signal level, :math:`0 < \eta < 1`.
    """

    def __init__(self, eta: float = 1e-3) -> None:
        if not 0.0 < eta < 1.0:
            raise ValueError(f"VPSchedule expects 0 < eta < 1, got eta={eta}")
        self.eta = float(eta)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        c, s = torch.cos(math.acos(math.sqrt(self.eta)) * t), torch.sin(
            math.acos(math.sqrt(self.eta)) * t
        )
        alpha = c**2
        # 1 - cos^4 = sin^2 (1 + cos^2): no cancellation near t = 0
        sigma = torch.sqrt(s**2 * (1 + c**2) + self.eta**2)
        return alpha, sigma

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        r"""Closed-form inverse of :meth:`ratio`: with :math:`u = \cos^2(a t)`,
        :math:`\rho^2 = (1 - u^2 + \eta^2) / u^2`, so :math:`u = \sqrt{q}`,
        :math:`q = (1 + \eta^2) / (1 + \rho^2)`, and :math:`t = \operatorname{atan2}(
        \sqrt{1 - u}, \sqrt{u}) / a` with :math:`1 - u = (\rho^2 - \eta^2) / ((1 + \rho^2)
        (1 + \sqrt{q}))` (no cancellation at either end). Float64; clipped to ``[0, 1]``."""
        rho = torch.as_tensor(ratio, dtype=torch.float64)
        eta, a = self.eta, math.acos(math.sqrt(self.eta))
        rho = rho.clamp(eta, 1 / eta)
        q = (1 + eta**2) / (1 + rho**2)
        one_minus_u = (rho**2 - eta**2).clamp_min(0) / ((1 + rho**2) * (1 + q.sqrt()))
        return (torch.atan2(one_minus_u.sqrt(), q.pow(0.25)) / a).clamp(0, 1)

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": "vp", "eta": self.eta}


class VESchedule(Schedule):
    r"""Variance-exploding schedule, log-linear in :math:`\sigma`.

    .. math:: \alpha_t = 1, \qquad
        \sigma_t = \exp\big((1 - t) \log \sigma_{\min} + t \log \sigma_{\max}\big)

    Arguments:
        sigma_min: Noise level at :math:`t = 0`.
        sigma_max: Noise level at :math:`t = 1` (should exceed the data's scale).
    """

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 1e2) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"VESchedule expects 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_sigma = (1 - t) * math.log(self.sigma_min) + t * math.log(self.sigma_max)
        sigma = torch.exp(log_sigma)
        return torch.ones_like(sigma), sigma

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        r"""Closed-form inverse of :meth:`ratio`: :math:`t = (\log\rho - \log\sigma_{\min})
        / (\log\sigma_{\max} - \log\sigma_{\min})`, float64, clipped to ``[0, 1]``."""
        rho = torch.as_tensor(ratio, dtype=torch.float64)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return ((torch.log(rho) - lo) / (hi - lo)).clamp(0, 1)

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class RectifiedSchedule(Schedule):
    r"""Rectified-flow (linear interpolation) schedule.

    .. math:: \alpha_t = 1 - s_t, \qquad \sigma_t = s_t, \qquad
        s_t = \eta + (1 - 2\eta)\, t

    Arguments:
        eta: Margin that keeps both :math:`\alpha_t` and :math:`\sigma_t` positive.
    """

    def __init__(self, eta: float = 1e-3) -> None:
        if not 0.0 < eta < 0.5:
            raise ValueError(f"RectifiedSchedule expects 0 < eta < 0.5, got eta={eta}")
        self.eta = float(eta)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self.eta + (1 - 2 * self.eta) * t
        return 1 - s, s

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        r"""Closed-form inverse of :meth:`ratio`: :math:`s = \rho / (1 + \rho)`,
        :math:`t = (s - \eta) / (1 - 2\eta)`, float64, clipped to ``[0, 1]``."""
        rho = torch.as_tensor(ratio, dtype=torch.float64)
        return ((rho / (1 + rho) - self.eta) / (1 - 2 * self.eta)).clamp(0, 1)

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": "rectified", "eta": self.eta}


_KINDS: dict[str, type[Schedule]] = {
    "vp": VPSchedule,
    "ve": VESchedule,
    "rectified": RectifiedSchedule,
}


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    """Rebuilds a schedule from its :attr:`Schedule.config`.

    Raises:
        ValueError: If the kind is unknown or an argument is not accepted.
    """
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(f"expected a schedule config with a 'kind' key, got {config!r}")
    kind = config["kind"]
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {sorted(_KINDS)}")
    args = {k: v for k, v in config.items() if k != "kind"}
    try:
        return _KINDS[kind](**args)
    except TypeError as error:
        raise ValueError(f"invalid arguments for schedule {kind!r}: {error}") from None


def time_grid(
    steps: int,
    kind: str = "uniform",
    schedule: Schedule | None = None,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    power: float = 1.0,
) -> Tensor:
    r"""Decreasing grid of ``steps + 1`` times from 1 to 0.

    Arguments:
        steps: Number of intervals (sampler steps), at least 1.
        kind: ``"uniform"`` (equal spacing in t), ``"logsnr"`` (equal spacing in
            :math:`\lambda_t = \log(\alpha_t / \sigma_t)`, needs ``schedule``) or
            ``"karras"`` (EDM: equal spacing in :math:`\rho^{1/r}` where
            :math:`\rho = \sigma_t / \alpha_t`; needs ``schedule``).
        schedule: The schedule, for ``kind="logsnr"`` and ``kind="karras"``.
        rho: The exponent :math:`r` of the Karras grid (7 in EDM).
        power: Warp of the ``"logsnr"`` grid: :math:`\lambda_i = \lambda_1 + (\lambda_0 -
            \lambda_1)(1 - (1 - i / N)^p)`, equal spacing for ``p = 1``, finer steps at low
            noise for ``p > 1``. With 8 steps, ``p = 1.2`` and ``sampler="unipc"`` removes the
            variance bias of few-step sampling on the Gaussian benchmark problems (see
            ``BENCHMARKS.md`` section 1).

    Returns:
        Times :math:`1 = t_0 > t_1 > \dots > t_{\text{steps}} = 0`, shape ``(steps + 1,)``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if kind == "uniform":
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    elif kind == "logsnr":
        if schedule is None:
            raise ValueError("time_grid(kind='logsnr') needs the schedule")
        l_max = float(schedule.log_snr(torch.tensor(0.0, dtype=torch.float64)))
        l_min = float(schedule.log_snr(torch.tensor(1.0, dtype=torch.float64)))
        if not power > 0:
            raise ValueError(f"power must be positive, got {power}")
        lams = torch.linspace(l_min, l_max, steps + 1, dtype=torch.float64)
        if power != 1.0:
            u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
            lams = l_min + (l_max - l_min) * (1 - (1 - u) ** power)
        grid = schedule.t_of_ratio(torch.exp(-lams))
        grid[0], grid[-1] = 1.0, 0.0
    elif kind == "karras":
        if schedule is None:
            raise ValueError("time_grid(kind='karras') needs the schedule")
        r_max = float(schedule.ratio(torch.tensor(1.0, dtype=torch.float64)))
        r_min = float(schedule.ratio(torch.tensor(0.0, dtype=torch.float64)))
        u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        ratios = (r_max ** (1 / rho) + u * (r_min ** (1 / rho) - r_max ** (1 / rho))) ** rho
        grid = schedule.t_of_ratio(ratios)
        grid[0], grid[-1] = 1.0, 0.0
    else:
        raise ValueError(f"unknown time grid {kind!r}; expected 'uniform', 'logsnr' or 'karras'")
    return grid.to(dtype=dtype, device=device)
