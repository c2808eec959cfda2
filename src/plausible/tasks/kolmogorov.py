r"""Kolmogorov flow: 2-D incompressible Navier-Stokes on the torus, in vorticity form.

On :math:`[0, 2\pi]^2` with periodic boundaries, the vorticity :math:`\omega = \partial_x v -
\partial_y u` of the velocity :math:`\mathbf{u} = (u, v) = (\partial_y \psi, -\partial_x \psi)`,
:math:`-\nabla^2 \psi = \omega`, obeys

.. math:: \partial_t \omega + \mathbf{u} \cdot \nabla \omega = \nu \nabla^2 \omega - \mu \omega
    + F, \qquad F = -k_f \cos(k_f y),

with viscosity :math:`\nu = 1 / \mathrm{Re}`, linear drag :math:`\mu` and the Kolmogorov
forcing of wavenumber :math:`k_f`. :math:`F` is the curl of the body force :math:`f = (\sin(k_f
y), 0)` in the x-momentum equation, as jax-cfd's ``kolmogorov_forcing`` (``scale=1``) and its
spectral solver's ``kolmogorov_forcing_fn`` (vorticity forcing ``-4 cos(4 y)``); jax-cfd's
``linear_coefficient=-0.1`` is the drag :math:`\mu = 0.1` here. SDA (Rozet & Louppe 2023) uses
Re = 1000, :math:`k_f = 4`, :math:`\mu = 0.1`, states every 0.2 time units, 256 x 256 coarsened
to 64 x 64 by average pooling; its states are velocities ``(2, 64, 64)``, ours vorticities
``(1, 64, 64)``.

Numerics. Pseudo-spectral (``torch.fft.rfft2``) with Orszag's 2/3 rule (the retained wavenumbers
are :math:`|k_x|, |k_y| \le K = \lfloor (N - 1) / 3 \rfloor`, so that the quadratic term is an
exact Galerkin truncation, which conserves energy and enstrophy exactly in space). The linear
part and the forcing are integrated exactly: with :math:`\lambda_k = \nu |k|^2 + \mu` and the
laminar state :math:`\hat{\omega}_L = \hat{F} / \lambda` (a single wavenumber, on which the
advection vanishes), :math:`z = \hat{\omega} - \hat{\omega}_L` obeys :math:`\dot{z} = -\lambda z
+ N(\hat\omega_L + z)` and is stepped by the integrating-factor (Lawson) fourth-order
Runge-Kutta method, explicit in the advection :math:`N(\omega) = -P(\mathbf{u} \cdot \nabla
\omega)`. Hence a single Fourier mode decays exactly as :math:`e^{-\lambda_k t}`, the laminar
state is steady to round-off, and the scheme is fourth order in time for the rest. The internal
step of each interval between states is set by a CFL condition :math:`\Delta t \le c\, \Delta x
/ \max |\mathbf{u}|` (per field, :math:`c = 0.5`).

Arrays are indexed ``(..., y, x)``: axis -2 is :math:`y` (rows, where the forcing varies), axis
-1 is :math:`x`, grid points :math:`2 \pi j / N`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["KolmogorovFlow", "vorticity_to_velocity", "velocity_to_vorticity"]


def _wavenumbers(n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Integer wavenumbers ``(k_y, k_x)`` of an ``rfft2`` of an ``n x n`` field, shaped
    ``(n, 1)`` and ``(1, n // 2 + 1)``."""
    ky = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype).reshape(n, 1)
    kx = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype).reshape(1, n // 2 + 1)
    return ky, kx


def _check_field(omega: Tensor, name: str = "omega") -> None:
    if not isinstance(omega, Tensor) or not omega.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{type(omega).__name__ if not isinstance(omega, Tensor) else omega.dtype}")
    if omega.dim() < 2 or omega.shape[-1] != omega.shape[-2] or omega.shape[-1] < 4:
        raise ValueError(f"{name} must have shape (..., N, N) with N >= 4 (a square periodic "
                         f"grid), got {tuple(omega.shape)}")
    if omega.shape[-1] % 2:
        raise ValueError(f"the grid size N must be even, got {tuple(omega.shape)}")


def vorticity_to_velocity(omega: Tensor) -> Tensor:
    r"""The velocity :math:`(u, v) = (\partial_y \psi, -\partial_x \psi)` of a vorticity field
    on :math:`[0, 2\pi]^2`, with :math:`-\nabla^2 \psi = \omega` solved spectrally (the mean
    velocity, which the vorticity does not determine, is set to zero).

    Arguments:
        omega: Vorticity ``(..., N, N)`` indexed ``(y, x)`` (for states ``(..., 1, N, N)``
            use :meth:`KolmogorovFlow.velocity`, which drops the channel axis first).

    Returns:
        The velocity ``(..., 2, N, N)``: ``[..., 0, :, :]`` is :math:`u` (along x),
        ``[..., 1, :, :]`` is :math:`v` (along y).
    """
    _check_field(omega)
    n = omega.shape[-1]
    work = omega.double() if omega.dtype == torch.float64 else omega.float()
    ky, kx = _wavenumbers(n, work.dtype)
    ky, kx = ky.to(omega.device), kx.to(omega.device)
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    w = torch.fft.rfft2(work)
    psi = w / k2
    psi[..., 0, 0] = 0
    u = torch.fft.irfft2(1j * ky * psi, s=(n, n))
    v = torch.fft.irfft2(-1j * kx * psi, s=(n, n))
    return torch.stack((u, v), dim=-3).to(omega.dtype)


def velocity_to_vorticity(velocity: Tensor) -> Tensor:
    r"""The spectral curl :math:`\omega = \partial_x v - \partial_y u` of a velocity
    ``(..., 2, N, N)`` (channels ``(u, v)``); returns ``(..., N, N)``."""
    if not isinstance(velocity, Tensor) or velocity.dim() < 3 or velocity.shape[-3] != 2:
        raise ValueError(f"velocity must have shape (..., 2, N, N), got "
                         f"{tuple(velocity.shape) if isinstance(velocity, Tensor) else velocity}")
    _check_field(velocity, "velocity")
    n = velocity.shape[-1]
    work = velocity.double() if velocity.dtype == torch.float64 else velocity.float()
    ky, kx = _wavenumbers(n, work.dtype)
    ky, kx = ky.to(velocity.device), kx.to(velocity.device)
    uv = torch.fft.rfft2(work)
    w = 1j * kx * uv[..., 1, :, :] - 1j * ky * uv[..., 0, :, :]
    return torch.fft.irfft2(w, s=(n, n)).to(velocity.dtype)


class KolmogorovFlow:
    r"""Kolmogorov-flow simulator: trajectories of vorticity fields ``(1, H, W)``.

    The flow is simulated at ``resolution x resolution`` and the states are average-pooled by
    ``coarsen`` (SDA: 256 coarsened by 4 to 64 x 64). See the module for the equations and the
    numerics.

    Arguments:
        resolution: The simulation grid size :math:`N` (even).
        coarsen: The pooling factor of the returned states (divides ``resolution``).
        reynolds: The Reynolds number, :math:`\nu = 1 / \mathrm{Re}` (``math.inf``: inviscid).
        drag: The linear drag :math:`\mu`.
        wavenumber: The forcing wavenumber :math:`k_f`.
        forcing: The amplitude :math:`a` of the body force :math:`a \sin(k_f y)` (vorticity
            forcing :math:`-a k_f \cos(k_f y)`).
        dt: The time between two states.
        cfl: The Courant number :math:`c` of the internal steps.
        max_step: An upper bound on the internal step.
        initial_velocity: The maximum velocity of the random initial field.
        initial_wavenumber: The peak wavenumber of the random initial field.
        dtype: The simulation dtype (``torch.float32`` or ``torch.float64``).
        device: The simulation device.

    Attributes:
        state_shape: ``(1, resolution // coarsen, resolution // coarsen)``.
        dt: The time between two states.
        nu: The viscosity.
    """

    def __init__(
        self,
        resolution: int = 128,
        coarsen: int = 2,
        *,
        reynolds: float = 1000.0,
        drag: float = 0.1,
        wavenumber: int = 4,
        forcing: float = 1.0,
        dt: float = 0.2,
        cfl: float = 0.5,
        max_step: float = 0.05,
        initial_velocity: float = 3.0,
        initial_wavenumber: float = 4.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(resolution, bool) or int(resolution) != resolution or resolution < 8 \
                or resolution % 2:
            raise ValueError(f"resolution must be an even integer >= 8, got {resolution!r}")
        if isinstance(coarsen, bool) or int(coarsen) != coarsen or coarsen < 1 \
                or resolution % coarsen:
            raise ValueError(f"coarsen must be a positive integer dividing resolution="
                             f"{resolution}, got {coarsen!r}")
        if not (isinstance(reynolds, int | float) and reynolds > 0):
            raise ValueError(f"reynolds must be positive (math.inf: inviscid), got {reynolds!r}")
        for name, value in (("dt", dt), ("cfl", cfl),
                            ("max_step", max_step), ("initial_velocity", initial_velocity),
                            ("initial_wavenumber", initial_wavenumber)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (isinstance(drag, int | float) and math.isfinite(drag) and drag >= 0):
            raise ValueError(f"drag must be a non-negative finite number, got {drag!r}")
        if not (isinstance(forcing, int | float) and math.isfinite(forcing)):
            raise ValueError(f"forcing must be a finite number, got {forcing!r}")
        if isinstance(wavenumber, bool) or int(wavenumber) != wavenumber or wavenumber < 0 \
                or 3 * wavenumber >= resolution:
            raise ValueError(f"wavenumber must be an integer in [0, resolution / 3), got "
                             f"{wavenumber!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

        self.resolution, self.coarsen = int(resolution), int(coarsen)
        self.reynolds, self.nu, self.drag = float(reynolds), 1.0 / float(reynolds), float(drag)
        self.wavenumber, self.forcing = int(wavenumber), float(forcing)
        self.dt, self.cfl, self.max_step = float(dt), float(cfl), float(max_step)
        self.initial_velocity = float(initial_velocity)
        self.initial_wavenumber = float(initial_wavenumber)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        size = self.resolution // self.coarsen
        self.state_shape: tuple[int, int, int] = (1, size, size)

        n = self.resolution
        ky, kx = _wavenumbers(n, dtype)
        self.ky, self.kx = ky.to(self.device), kx.to(self.device)
        self.k2 = self.kx**2 + self.ky**2
        k2 = self.k2.clone()
        k2[0, 0] = 1.0
        self.inverse_k2 = 1.0 / k2
        self.inverse_k2[0, 0] = 0.0
        cutoff = (n - 1) // 3
        self.cutoff = cutoff
        self.dealias = ((self.kx.abs() <= cutoff) & (self.ky.abs() <= cutoff)).to(dtype)
        # the linear rate lambda_k = nu |k|^2 + mu
        self.rate = self.nu * self.k2 + self.drag
        # the forcing and the laminar state, in Fourier space (rfft2 of -a k_f cos(k_f y))
        y = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
        f = -self.forcing * self.wavenumber * torch.cos(self.wavenumber * y)
        field = f.reshape(n, 1).expand(n, n).to(dtype)
        self.forcing_hat = torch.fft.rfft2(field).to(self.device) * self.dealias
        rate = self.rate.clone()
        rate[0, 0] = 1.0
        self.laminar_hat = torch.where(self.rate > 0, self.forcing_hat / rate,
                                       torch.zeros_like(self.forcing_hat))
        self.dx = 2 * math.pi / n

    # ------------------------------------------------------------------------------------
    # Fourier-space primitives (fields of shape (..., N, N // 2 + 1), complex)

    def to_spectral(self, omega: Tensor) -> Tensor:
        """``rfft2`` of a vorticity ``(..., N, N)``, dealiased (2/3 rule)."""
        _check_field(omega)
        if omega.shape[-1] != self.resolution:
            raise ValueError(f"expected fields of size {self.resolution} x {self.resolution}, "
                             f"got {tuple(omega.shape)}")
        return torch.fft.rfft2(omega.to(self.dtype)) * self.dealias

    def to_physical(self, omega_hat: Tensor) -> Tensor:
        """Inverse of :meth:`to_spectral`: ``(..., N, N // 2 + 1)`` to ``(..., N, N)``."""
        return torch.fft.irfft2(omega_hat, s=(self.resolution, self.resolution))

    def advection(self, omega_hat: Tensor) -> Tensor:
        r"""The dealiased advection :math:`N(\omega) = -P(\mathbf{u} \cdot \nabla \omega)` in
        Fourier space, ``(..., N, N // 2 + 1)``."""
        psi = omega_hat * self.inverse_k2
        ik_x, ik_y = 1j * self.kx, 1j * self.ky
        fields = torch.stack((ik_y * psi, -ik_x * psi, ik_x * omega_hat, ik_y * omega_hat))
        u, v, w_x, w_y = torch.fft.irfft2(fields, s=(self.resolution, self.resolution))
        return -torch.fft.rfft2(u * w_x + v * w_y) * self.dealias

    def max_velocity(self, omega_hat: Tensor) -> Tensor:
        r"""The largest :math:`|u|` or :math:`|v|` of each field of a batch ``(B, N, N // 2 +
        1)``, ``(B,)`` (for the CFL condition)."""
        psi = omega_hat * self.inverse_k2
        uv = torch.fft.irfft2(torch.stack((1j * self.ky * psi, -1j * self.kx * psi), dim=-3),
                              s=(self.resolution, self.resolution))
        return uv.abs().flatten(-3).amax(-1)

    def step(self, omega_hat: Tensor, h: float | Tensor) -> Tensor:
        r"""One integrating-factor RK4 step of size ``h`` in Fourier space.

        With :math:`z = \hat\omega - \hat\omega_L`, :math:`E = e^{-\lambda h}`,
        :math:`E_2 = e^{-\lambda h / 2}` and :math:`N(z)` the advection of
        :math:`\hat\omega_L + z`:
        :math:`k_1 = N(z)`, :math:`k_2 = N(E_2 (z + \frac{h}{2} k_1))`,
        :math:`k_3 = N(E_2 z + \frac{h}{2} k_2)`, :math:`k_4 = N(E z + h E_2 k_3)`,
        :math:`z' = E z + \frac{h}{6}(E k_1 + 2 E_2 (k_2 + k_3) + k_4)`.

        Arguments:
            omega_hat: Fields ``(..., N, N // 2 + 1)`` (from :meth:`to_spectral`).
            h: The step, a number or a tensor ``(B,)`` (one step per field of a batch
                ``(B, N, N // 2 + 1)``).
        """
        if isinstance(h, Tensor) and h.dim() > 0:
            h = h.to(self.rate.dtype).reshape(-1, 1, 1)
        E = torch.exp(-self.rate * h)
        E2 = torch.exp(-self.rate * (h / 2))
        laminar = self.laminar_hat
        z = omega_hat - laminar
        k1 = self.advection(omega_hat)
        k2 = self.advection(laminar + E2 * (z + (h / 2) * k1))
        k3 = self.advection(laminar + E2 * z + (h / 2) * k2)
        k4 = self.advection(laminar + E * z + h * E2 * k3)
        z = E * z + (h / 6) * (E * k1 + 2 * E2 * (k2 + k3) + k4)
        return laminar + z

    def substeps(self, omega_hat: Tensor, duration: float) -> Tensor:
        r"""The number of equal internal steps over ``duration`` of each field of a batch
        ``(B, N, N // 2 + 1)``: the smallest with :math:`h \le \min(c\,\Delta x /
        \max|\mathbf{u}|, \text{max\_step})`, an int64 tensor ``(B,)``. Each field has its
        own steps, so that a trajectory does not depend on the batch it is simulated in."""
        u = self.max_velocity(omega_hat.reshape(-1, *omega_hat.shape[-2:]))
        h = torch.clamp(self.cfl * self.dx / u.clamp(min=1e-12), max=self.max_step)
        return torch.ceil(duration / h - 1e-9).clamp(min=1).long()

    def evolve(self, omega_hat: Tensor, duration: float) -> Tensor:
        """Advances a batch ``(B, N, N // 2 + 1)`` in Fourier space by ``duration``, each field
        with its own :meth:`substeps` (fields that are done wait for the others)."""
        steps = self.substeps(omega_hat, duration).to(omega_hat.device)
        h = duration / steps.to(self.rate.dtype)
        for i in range(int(steps.max())):
            active = (i < steps).reshape(-1, 1, 1)
            new = self.step(omega_hat, h)
            omega_hat = new if bool(active.all()) else torch.where(active, new, omega_hat)
        return omega_hat

    def advance(self, omega: Tensor, duration: float, steps: int | None = None) -> Tensor:
        r"""Integrates vorticity fields ``(..., N, N)`` at the simulation resolution over
        ``duration`` with ``steps`` equal internal steps (default: :meth:`substeps` of each
        field, as :meth:`evolve`); returns ``(..., N, N)``."""
        if not (math.isfinite(duration) and duration >= 0):
            raise ValueError(f"duration must be a non-negative finite number, got {duration!r}")
        if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
            raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
        dtype, shape = omega.dtype, omega.shape
        w = self.to_spectral(omega.to(self.device)).reshape(-1, *self.rate.shape)
        if duration > 0:
            if steps is None:
                w = self.evolve(w, duration)
            else:
                for _ in range(int(steps)):
                    w = self.step(w, duration / int(steps))
        return self.to_physical(w).reshape(shape).to(dtype)

    # ------------------------------------------------------------------------------------
    # Random states and trajectories

    def initial(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r"""Random initial vorticities ``(n, N, N)`` at the simulation resolution.

        A filtered Gaussian random field (as jax-cfd's ``filtered_velocity_field``): white
        noise in Fourier space shaped so that the velocity amplitude per wavenumber is
        :math:`\propto (k / k_0)^2 e^{-(k / k_0)^2}` (peak near :math:`k_0` =
        ``initial_wavenumber``), dealiased, with zero mean, scaled so that the largest
        velocity component of each field is ``initial_velocity``.
        """
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        N = self.resolution
        noise = torch.randn((n, N, N), generator=generator, dtype=torch.float64)
        w = torch.fft.rfft2(noise.to(self.device, self.dtype))
        k = self.k2.sqrt()
        ratio = k / self.initial_wavenumber
        # velocity amplitude envelope; |omega_k| = k |u_k|
        w = w * (k * ratio**2 * torch.exp(-(ratio**2))) * self.dealias
        w[..., 0, 0] = 0
        psi = w * self.inverse_k2
        uv = torch.fft.irfft2(torch.stack((1j * self.ky * psi, -1j * self.kx * psi), dim=1),
                              s=(N, N))
        scale = self.initial_velocity / uv.abs().amax(dim=(1, 2, 3)).clamp(min=1e-12)
        return self.to_physical(w * scale.reshape(n, 1, 1))

    def pool(self, omega: Tensor) -> Tensor:
        """Average pooling of fields ``(..., N, N)`` by :attr:`coarsen` to ``(..., n, n)``."""
        if self.coarsen == 1:
            return omega
        lead = omega.shape[:-2]
        out = F.avg_pool2d(omega.reshape(-1, 1, *omega.shape[-2:]), self.coarsen)
        return out.reshape(*lead, *out.shape[-2:])

    def trajectories(
        self,
        n: int,
        length: int,
        burn_in: int = 64,
        generator: torch.Generator | None = None,
        progress: bool = True,
        *,
        batch_size: int | None = None,
    ) -> Tensor:
        r"""Simulates ``n`` trajectories of ``length`` states, ``dt`` apart, after ``burn_in``
        discarded states (SDA: 64, i.e. 12.8 time units) from random initial fields.

        Arguments:
            n: The number of trajectories.
            length: The number of states kept per trajectory.
            burn_in: The number of states discarded first (to reach the attractor).
            generator: The random source of the initial fields.
            progress: Show a tqdm progress bar.
            batch_size: Trajectories simulated together (default: all ``n``).

        Calls ``torch.set_flush_denormal(True)`` (left on: denormal numbers in the spectral
        tails slow CPUs down 6-9x).

        Returns:
            Vorticity trajectories of shape ``(n, length, 1, H, W)`` (``state_shape`` per
            state), float32.
        """
        for name, value, low in (("n", n, 1), ("length", length, 1), ("burn_in", burn_in, 0)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        batch_size = n if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        torch.set_flush_denormal(True)  # spectral tails: denormals slow the CPU 6-9x
        out = torch.empty((n, length, *self.state_shape), dtype=torch.float32)
        bar = tqdm(total=n * (burn_in + length), desc="kolmogorov", unit="state",
                   disable=not progress, leave=False)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                w = self.to_spectral(self.initial(stop - start, generator))
                for i in range(burn_in + length):
                    w = self.evolve(w, self.dt)
                    if not bool(torch.isfinite(w).all()):
                        raise FloatingPointError(
                            f"the simulation diverged at state {i}; lower cfl or max_step")
                    if i >= burn_in:
                        state = self.pool(self.to_physical(w))
                        out[start:stop, i - burn_in, 0] = state.float().cpu()
                    bar.update(stop - start)
        bar.close()
        return out

    def velocity(self, omega: Tensor) -> Tensor:
        """The velocity of vorticity states: see :func:`vorticity_to_velocity`
        (``(..., 1, H, W)`` gives ``(..., 2, H, W)``)."""
        if omega.dim() >= 3 and omega.shape[-3] == 1:
            omega = omega.squeeze(-3)
        return vorticity_to_velocity(omega)

    def energy(self, omega: Tensor) -> Tensor:
        r"""Kinetic energy :math:`\frac{1}{2} \langle |\mathbf{u}|^2 \rangle` (spatial mean)
        of fields ``(..., N, N)``, ``(...)``."""
        return 0.5 * vorticity_to_velocity(omega).square().sum(-3).mean((-2, -1))

    def __repr__(self) -> str:
        return (f"KolmogorovFlow(resolution={self.resolution}, coarsen={self.coarsen}, "
                f"reynolds={self.reynolds:g}, drag={self.drag:g}, wavenumber={self.wavenumber},"
                f" dt={self.dt:g})")

    def config(self) -> dict[str, Any]:
        """The settings, for records (JSON-serialisable)."""
        return {
            "resolution": self.resolution, "coarsen": self.coarsen, "reynolds": self.reynolds,
            "drag": self.drag, "wavenumber": self.wavenumber, "forcing": self.forcing,
            "dt": self.dt, "cfl": self.cfl, "max_step": self.max_step,
            "initial_velocity": self.initial_velocity,
            "initial_wavenumber": self.initial_wavenumber, "dtype": str(self.dtype),
        }
