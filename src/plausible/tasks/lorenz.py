r"""Lorenz-63 and Lorenz-96 simulators: stochastic discretisations of chaotic ODEs, batched
in torch, as Markov chains :math:`x_{i+1} = \Phi_{\Delta t}(x_i) + \epsilon_i`.

:math:`\Phi_{\Delta t}` is one classical fourth-order Runge-Kutta (RK4) step of the ODE
:math:`\dot{x} = f(x)`,

.. math:: k_1 = f(x), \; k_2 = f(x + \tfrac{\Delta t}{2} k_1), \; k_3 = f(x + \tfrac{\Delta
    t}{2} k_2), \; k_4 = f(x + \Delta t\, k_3), \qquad \Phi_{\Delta t}(x) = x + \tfrac{\Delta
    t}{6} (k_1 + 2 k_2 + 2 k_3 + k_4),

and :math:`\epsilon_i \sim \mathcal{N}(0, q^2 I)` is the transition noise.

- :class:`Lorenz63`: exactly the ``NoisyLorenz63`` of score-based data assimilation (SDA,
  Rozet & Louppe 2023): :math:`\sigma = 10`, :math:`\rho = 28`, :math:`\beta = 8/3`,
  :math:`\Delta t = 0.025` and :math:`q = \sqrt{\Delta t}` (noise added after each RK4
  step, in physical units), states standardised by mean ``(0, 0, 25)`` and std
  ``(8, 9, 8.6)``.
- :class:`Lorenz96`: :math:`\dot{x}_j = (x_{j+1} - x_{j-2}) x_{j-1} - x_j + F` on a ring of
  ``n = 40`` variables with ``F = 8``, :math:`\Delta t = 0.05` (the usual "6 hours" of
  Lorenz & Emanuel 1998) and optional transition noise (none by default).

Both share the interface of trajectory simulators used by ``plausible data`` and the
benchmarks: ``state_shape``, ``dt``, ``initial(n, generator)``, ``step(x)`` (deterministic
part), ``transition(x, generator)``, ``log_transition(x_next, x)`` and
``trajectories(n, length, burn_in, generator, progress)`` returning ``(n, length,
*state_shape)``. Simulations run in float64 by default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["TrajectorySimulator", "Lorenz63", "Lorenz96", "rk4"]


def rk4(f: Any, x: Tensor, dt: float) -> Tensor:
    r"""One classical Runge-Kutta step :math:`x + \frac{\Delta t}{6}(k_1 + 2k_2 + 2k_3 +
    k_4)` of :math:`\dot{x} = f(x)` for a batch ``x`` ``(..., D)``; local error
    :math:`O(\Delta t^5)`, global error :math:`O(\Delta t^4)`."""
    k1 = f(x)
    k2 = f(x + dt / 2 * k1)
    k3 = f(x + dt / 2 * k2)
    k4 = f(x + dt * k3)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class TrajectorySimulator:
    r"""Base of discrete-time stochastic simulators :math:`x_{i+1} = \Phi(x_i) +
    \mathcal{N}(0, q^2 I)` on states of shape :attr:`state_shape`.

    Subclasses define :meth:`f` (the vector field), :meth:`initial` and set ``dt``,
    ``noise`` (the transition noise std :math:`q`, ``0`` for a deterministic map),
    ``substeps`` (RK4 steps per transition) and ``dtype``.
    """

    state_shape: tuple[int, ...] = ()
    dt: float = 1.0
    noise: float = 0.0
    substeps: int = 1
    dtype: torch.dtype = torch.float64

    def f(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The vector field :math:`\\dot{x} = f(x)` on ``(..., *state_shape)``."""
        raise NotImplementedError

    def initial(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` initial states ``(n, *state_shape)`` from which chains are burnt in."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _check_states(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating-point, got {x.dtype}")
        S = self.state_shape
        if x.dim() < len(S) or tuple(x.shape[x.dim() - len(S):]) != S:
            raise ValueError(f"{name} must have shape (..., {', '.join(map(str, S))}), got "
                             f"{tuple(x.shape)}")

    def step(self, x: Tensor) -> Tensor:
        r"""The deterministic part :math:`\Phi_{\Delta t}(x)` (``substeps`` RK4 steps of size
        ``dt / substeps``), shape of ``x`` ``(..., *state_shape)``."""
        self._check_states(x)
        h = self.dt / self.substeps
        for _ in range(self.substeps):
            x = rk4(self.f, x, h)
        return x

    def transition(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""One draw :math:`x' = \Phi_{\Delta t}(x) + q\, \epsilon`,
        :math:`\epsilon \sim \mathcal{N}(0, I)`; shape of ``x``."""
        mean = self.step(x)
        if self.noise == 0:
            return mean
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                          device=mean.device)
        return mean + self.noise * eps

    def log_transition(self, x_next: Tensor, x: Tensor) -> Tensor:
        r"""Log-density :math:`\log \mathcal{N}(x'; \Phi_{\Delta t}(x), q^2 I)` summed over the
        state, shape ``x.shape[:-len(state_shape)]``. Summed over time on ``x[:, 1:]`` and
        ``x[:, :-1]``, it is SDA's :math:`\log p(x_{2:L} \mid x_1)`.

        Raises:
            ValueError: For a deterministic simulator (``noise == 0``: no density), or
                shapes that differ.
        """
        if self.noise == 0:
            raise ValueError("the transition is deterministic (noise = 0): it has no density")
        self._check_states(x_next, "x_next")
        if x_next.shape != x.shape:
            raise ValueError(f"x_next and x must have the same shape, got "
                             f"{tuple(x_next.shape)} and {tuple(x.shape)}")
        r = (x_next - self.step(x)) / self.noise
        D = math.prod(self.state_shape)
        dims = tuple(range(-len(self.state_shape), 0))
        return -0.5 * r.square().sum(dims) - D * (math.log(self.noise)
                                                  + 0.5 * math.log(2 * math.pi))

    def log_prob_trajectory(self, x: Tensor) -> Tensor:
        r""":math:`\log p(x_{2:L} \mid x_1) = \sum_{i=1}^{L-1} \log p(x_{i+1} \mid x_i)` of
        trajectories ``(..., L, *state_shape)`` (physical units); shape ``(...)``."""
        k = len(self.state_shape)
        if x.dim() < k + 1 or x.shape[-k - 1] < 2:
            raise ValueError(f"trajectories must have shape (..., L, "
                             f"{', '.join(map(str, self.state_shape))}) with L >= 2, got "
                             f"{tuple(x.shape)}")
        L = x.shape[-k - 1]
        return self.log_transition(x.narrow(-k - 1, 1, L - 1),
                                   x.narrow(-k - 1, 0, L - 1)).sum(-1)

    def trajectories(
        self,
        n: int,
        length: int,
        burn_in: int = 1024,
        generator: torch.Generator | None = None,
        progress: bool = True,
        *,
        x0: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        r"""Simulates ``n`` independent chains: ``burn_in`` transitions from
        :meth:`initial` (or from ``x0`` ``(n, *state_shape)``), then ``length`` states.

        Arguments:
            n: Number of trajectories.
            length: States kept per trajectory ``L``.
            burn_in: Transitions discarded first (so that the chains reach the attractor).
            generator: Random source (default: torch's global one).
            progress: Show a tqdm progress bar over the time steps.
            x0: Initial states instead of :meth:`initial` (the first kept state is ``x0``
                itself when ``burn_in == 0``).
            dtype: Dtype of the output (default: the simulator's, float64); the
                simulation itself always runs in the simulator's dtype.

        Returns:
            ``(n, length, *state_shape)``, physical units.
        """
        n = _check_positive_int(n, "n")
        length = _check_positive_int(length, "length")
        burn_in = _check_positive_int(burn_in, "burn_in", minimum=0)
        if x0 is None:
            x = self.initial(n, generator)
        else:
            self._check_states(x0, "x0")
            if tuple(x0.shape) != (n, *self.state_shape):
                raise ValueError(f"x0 must have shape {(n, *self.state_shape)}, got "
                                 f"{tuple(x0.shape)}")
            if not torch.isfinite(x0).all():
                raise ValueError("x0 contains NaN or infinity")
            x = x0.to(self.dtype)
        out = torch.empty(n, length, *self.state_shape, dtype=dtype or self.dtype,
                          device=x.device)
        bar = tqdm(total=burn_in + length - 1, desc=f"simulating {type(self).__name__}",
                   disable=not progress, leave=False)
        with torch.no_grad(), bar:
            for _ in range(burn_in):
                x = self.transition(x, generator)
                bar.update()
            out[:, 0] = x
            for i in range(1, length):
                x = self.transition(x, generator)
                out[:, i] = x
                bar.update()
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"{type(self).__name__} diverged (NaN or infinity); "
                                     "reduce dt or increase substeps")
        return out

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings (recorded in data files)."""
        raise NotImplementedError  # pragma: no cover - abstract


class Lorenz63(TrajectorySimulator):
    r"""The noisy Lorenz-63 system of SDA (Rozet & Louppe 2023, ``NoisyLorenz63``).

    .. math:: \dot{x} = \sigma (y - x), \quad \dot{y} = x (\rho - z) - y, \quad
        \dot{z} = x y - \beta z,

    :math:`x_{i+1} = \mathrm{RK4}_{\Delta t}(x_i) + \sqrt{\Delta t}\, \epsilon_i` in
    physical units. Long-run statistics (the attractor, slightly smoothed by the noise):
    mean :math:`\approx (0, 0, 23.5)`, std :math:`\approx (7.9, 9.0, 8.6)`; SDA
    standardises by mean ``(0, 0, 25)`` and std ``(8, 9, 8.6)`` (:meth:`standardize`).

    Arguments:
        dt: Time step :math:`\Delta t` (SDA: 0.025).
        sigma, rho, beta: The Lorenz parameters (10, 28, 8/3).
        noise: Transition noise std :math:`q` (default :math:`\sqrt{\Delta t}` as SDA;
            ``0`` for the deterministic RK4 map).
        substeps: RK4 steps per transition (SDA: 1).
        dtype: Simulation dtype (float64).
    """

    state_shape = (3,)
    MEAN = (0.0, 0.0, 25.0)
    STD = (8.0, 9.0, 8.6)

    def __init__(
        self,
        dt: float = 0.025,
        sigma: float = 10.0,
        rho: float = 28.0,
        beta: float = 8.0 / 3.0,
        noise: float | None = None,
        substeps: int = 1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if not dt > 0 or not math.isfinite(dt):
            raise ValueError(f"dt must be positive, got {dt}")
        noise = math.sqrt(dt) if noise is None else float(noise)
        if not noise >= 0 or not math.isfinite(noise):
            raise ValueError(f"noise must be a non-negative std, got {noise}")
        self.dt, self.noise = float(dt), noise
        self.sigma, self.rho, self.beta = float(sigma), float(rho), float(beta)
        self.substeps = _check_positive_int(substeps, "substeps")
        self.dtype = dtype

    def f(self, x: Tensor) -> Tensor:
        a, b, c = x[..., 0], x[..., 1], x[..., 2]
        return torch.stack((self.sigma * (b - a), a * (self.rho - c) - b,
                            a * b - self.beta * c), dim=-1)

    def initial(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r"""SDA's initial distribution :math:`\mathcal{N}((0, 0, 25), \Sigma)`,
        :math:`\Sigma = [[64, 50, 0], [50, 81, 0], [0, 0, 75]]`; ``(n, 3)``."""
        mean = torch.tensor(self.MEAN, dtype=self.dtype)
        cov = torch.tensor([[64.0, 50.0, 0.0], [50.0, 81.0, 0.0], [0.0, 0.0, 75.0]],
                           dtype=self.dtype)
        L = torch.linalg.cholesky(cov)
        z = torch.randn(n, 3, generator=generator, dtype=self.dtype)
        return mean + z @ L.T

    @classmethod
    def standardize(cls, x: Tensor) -> Tensor:
        """``(x - (0, 0, 25)) / (8, 9, 8.6)`` on ``(..., 3)`` (SDA's ``preprocess``)."""
        return (x - x.new_tensor(cls.MEAN)) / x.new_tensor(cls.STD)

    @classmethod
    def unstandardize(cls, x: Tensor) -> Tensor:
        """``(0, 0, 25) + (8, 9, 8.6) * x`` on ``(..., 3)`` (SDA's ``postprocess``)."""
        return x.new_tensor(cls.MEAN) + x.new_tensor(cls.STD) * x

    @property
    def config(self) -> dict[str, Any]:
        return {"simulator": "Lorenz63", "dt": self.dt, "sigma": self.sigma, "rho": self.rho,
                "beta": self.beta, "noise": self.noise, "substeps": self.substeps,
                "integrator": "rk4", "standardize_mean": list(self.MEAN),
                "standardize_std": list(self.STD)}


class Lorenz96(TrajectorySimulator):
    r"""The Lorenz-96 system on a ring of ``n`` variables (indices modulo ``n``),

    .. math:: \dot{x}_j = (x_{j+1} - x_{j-2})\, x_{j-1} - x_j + F,

    integrated by RK4 with :math:`\Delta t = 0.05` per transition (``substeps`` RK4 steps
    of ``dt / substeps``), plus optional transition noise :math:`\mathcal{N}(0, q^2 I)`.
    For ``n = 40``, ``F = 8`` the attractor is chaotic (leading Lyapunov exponent about
    1.7 per time unit) with long-run mean about 2.3 and std about 3.6 per variable.

    Arguments:
        n: Number of variables (at least 4).
        F: Forcing.
        dt: Time between states (0.05: "6 hours").
        noise: Transition noise std :math:`q` (default 0: deterministic).
        substeps: RK4 steps per transition.
        dtype: Simulation dtype (float64).
    """

    def __init__(
        self,
        n: int = 40,
        F: float = 8.0,
        dt: float = 0.05,
        noise: float = 0.0,
        substeps: int = 1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.n = _check_positive_int(n, "n", minimum=4)
        if not dt > 0 or not math.isfinite(dt):
            raise ValueError(f"dt must be positive, got {dt}")
        if not noise >= 0 or not math.isfinite(noise):
            raise ValueError(f"noise must be a non-negative std, got {noise}")
        self.state_shape = (self.n,)
        self.F, self.dt, self.noise = float(F), float(dt), float(noise)
        self.substeps = _check_positive_int(substeps, "substeps")
        self.dtype = dtype

    def f(self, x: Tensor) -> Tensor:
        plus1 = torch.roll(x, -1, dims=-1)  # x_{j+1}
        minus2 = torch.roll(x, 2, dims=-1)  # x_{j-2}
        minus1 = torch.roll(x, 1, dims=-1)  # x_{j-1}
        return (plus1 - minus2) * minus1 - x + self.F

    def initial(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``F`` everywhere plus a small perturbation ``N(0, 0.01^2)`` (the standard start
        off the unstable fixed point); ``(n, self.n)``."""
        return self.F + 0.01 * torch.randn(n, self.n, generator=generator, dtype=self.dtype)

    @property
    def config(self) -> dict[str, Any]:
        return {"simulator": "Lorenz96", "n": self.n, "F": self.F, "dt": self.dt,
                "noise": self.noise, "substeps": self.substeps, "integrator": "rk4"}
