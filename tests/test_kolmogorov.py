"""Kolmogorov-flow simulator (plausible.tasks.kolmogorov) against closed-form answers: exact
decay of single-wavenumber fields, the laminar state and its approach from rest, the exact
energy budget of the forced flow, the inviscid invariants of the Galerkin-truncated
advection, zero-mean vorticity and incompressibility, and the fourth order of the time
stepper. All in float64 on 32 x 32 grids (well under a second each)."""

from __future__ import annotations

import math

import pytest
import torch

from plausible.tasks.kolmogorov import (
    KolmogorovFlow,
    velocity_to_vorticity,
    vorticity_to_velocity,
)

N = 32


def grid(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates ``(y, x)`` of an ``n x n`` grid on [0, 2 pi)^2, indexed ``(y, x)``."""
    s = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return torch.meshgrid(s, s, indexing="ij")


def flow(**kwargs) -> KolmogorovFlow:
    kwargs.setdefault("dtype", torch.float64)
    return KolmogorovFlow(N, 1, **kwargs)


def random_field(sim: KolmogorovFlow, n: int = 2, seed: int = 0) -> torch.Tensor:
    return sim.initial(n, torch.Generator().manual_seed(seed))


def test_single_wavenumber_decays_exactly():
    # cos(3x + 4y) and sin(5x) share |k|^2 = 25: the advection of their sum vanishes, and the
    # integrating factor makes the decay exp(-(nu |k|^2 + mu) t) exact (round-off only).
    sim = flow(forcing=0.0)
    y, x = grid()
    omega = torch.cos(3 * x + 4 * y) + 0.7 * torch.sin(5 * x)
    assert sim.advection(sim.to_spectral(omega)).abs().max() < 1e-12
    t = 1.3
    expected = omega * math.exp(-(sim.nu * 25 + sim.drag) * t)
    for steps in (1, 7):
        out = sim.advance(omega, t, steps=steps)
        assert (out - expected).abs().max() < 1e-13


def test_laminar_state_is_steady_and_reached_from_rest():
    # omega_L = -a k_f cos(k_f y) / (nu k_f^2 + mu) solves F + nu lap(omega) - mu omega = 0
    sim = flow()
    y, x = grid()
    kf, rate = sim.wavenumber, sim.nu * sim.wavenumber**2 + sim.drag
    laminar = -sim.forcing * kf * torch.cos(kf * y) / rate
    assert laminar.abs().max() == pytest.approx(4 / 0.116, rel=1e-12)
    assert (sim.advance(laminar, 5.0, steps=13) - laminar).abs().max() < 1e-11
    # from rest: omega(t) = omega_L (1 - exp(-rate t)), exactly
    t = 2.5
    out = sim.advance(torch.zeros(N, N, dtype=torch.float64), t, steps=5)
    assert (out - laminar * (1 - math.exp(-rate * t))).abs().max() < 1e-11
    # the laminar velocity is the body force's response: u = a sin(k_f y) / rate, v = 0
    uv = vorticity_to_velocity(laminar)
    assert (uv[0] - sim.forcing * torch.sin(kf * y) / rate).abs().max() < 1e-11
    assert uv[1].abs().max() < 1e-11


def test_energy_budget_of_the_forced_flow():
    # dE/dt = <u f_x> - 2 mu E - nu Z with E = <|u|^2> / 2, Z = <omega^2>, f_x = a sin(k_f y):
    # exact for the Galerkin truncation (the advection conserves E). This checks the sign and
    # the scale of the forcing against the x-momentum body force, in a nonlinear regime.
    sim = flow(reynolds=100.0)
    y, _ = grid()
    omega = random_field(sim, n=1)[0]
    h, samples = 0.025, 41  # Simpson's rule over t in [0, 1]
    energies, rates = [], []
    for i in range(samples):
        if i:
            omega = sim.advance(omega, h, steps=2)
        uv = vorticity_to_velocity(omega)
        E = 0.5 * uv.square().sum(0).mean()
        Z = omega.square().mean()
        work = (uv[0] * sim.forcing * torch.sin(sim.wavenumber * y)).mean()
        energies.append(E)
        rates.append(work - 2 * sim.drag * E - sim.nu * Z)
    r = torch.stack(rates)
    integral = h / 3 * (r[0] + r[-1] + 4 * r[1:-1:2].sum() + 2 * r[2:-1:2].sum())
    change = energies[-1] - energies[0]
    assert abs(change) > 0.1 * energies[0]  # the energy does change
    assert abs(change - integral) < 1e-5 * abs(change)


def test_inviscid_advection_conserves_energy_and_enstrophy():
    sim = flow(reynolds=math.inf, drag=0.0, forcing=0.0)
    assert sim.nu == 0.0 and sim.laminar_hat.abs().max() == 0
    omega = random_field(sim)
    w = sim.to_spectral(omega)
    # semi-discrete identities: <psi, N(omega)> = <omega, N(omega)> = 0 (Galerkin truncation)
    n_hat = sim.advection(w)
    psi = w * sim.inverse_k2
    weights = torch.full(w.shape[-2:], 2.0, dtype=torch.float64)
    weights[:, 0] = 1
    for field in (psi, w):
        inner = (weights * (field.conj() * n_hat).real).sum((-2, -1))
        scale = (weights * field.abs() ** 2).sum((-2, -1)).sqrt() * (
            weights * n_hat.abs() ** 2).sum((-2, -1)).sqrt()
        assert (inner.abs() / scale).max() < 1e-13
    # fully discrete: RK4's error, relative change over t = 0.5 with h = 1/400
    out = sim.advance(omega, 0.5, steps=200)
    assert (out - omega).norm() > 0.1 * omega.norm()  # the field moved
    for invariant in (sim.energy, lambda w: w.square().mean((-2, -1))):
        before, after = invariant(omega), invariant(out)
        assert ((after - before).abs() / before).max() < 1e-9


def test_zero_mean_and_incompressibility_are_preserved():
    sim = flow()
    omega = sim.advance(random_field(sim), 1.0)
    assert omega.mean((-2, -1)).abs().max() < 1e-12 * omega.std()
    uv = vorticity_to_velocity(omega)
    ky, kx = torch.fft.fftfreq(N, 1 / N, dtype=torch.float64), torch.fft.fftfreq(
        N, 1 / N, dtype=torch.float64)
    div = torch.fft.ifft2(1j * kx * torch.fft.fft2(uv[:, 0]) + 1j * ky[:, None] * torch.fft.fft2(
        uv[:, 1])).real
    assert div.abs().max() < 1e-12 * uv.abs().max()
    # the curl of the velocity gives the vorticity back (zero-mean, dealiased fields)
    assert (velocity_to_vorticity(uv) - omega).abs().max() < 1e-12 * omega.abs().max()
    # and a hand-made field: psi = sin(x) cos(2y) -> u = -2 sin x sin 2y, v = -cos x cos 2y
    y, x = grid()
    uv = vorticity_to_velocity(5 * torch.sin(x) * torch.cos(2 * y))
    assert (uv[0] + 2 * torch.sin(x) * torch.sin(2 * y)).abs().max() < 1e-12
    assert (uv[1] + torch.cos(x) * torch.cos(2 * y)).abs().max() < 1e-12


def test_time_stepper_is_fourth_order():
    sim = flow()
    omega = random_field(sim, seed=1)
    T = 0.5
    reference = sim.advance(omega, T, steps=512)
    errors = [(sim.advance(omega, T, steps=s) - reference).norm() / reference.norm()
              for s in (16, 32, 64)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[0] < 1e-4
    assert all(3.6 < p < 4.4 for p in orders), (errors, orders)


def test_trajectories_shape_seed_and_first_state():
    sim = KolmogorovFlow(N, 2, dtype=torch.float64)
    assert sim.state_shape == (1, 16, 16) and sim.dt == 0.2
    a = sim.trajectories(3, 2, burn_in=1, generator=torch.Generator().manual_seed(0),
                         progress=False, batch_size=2)
    b = sim.trajectories(3, 2, burn_in=1, generator=torch.Generator().manual_seed(0),
                         progress=False)
    assert a.shape == (3, 2, 1, 16, 16) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.std() > 0.1
    assert torch.equal(a, b)
    # the first state is the pooled solution one dt after the (seeded) initial field
    first = sim.trajectories(2, 1, burn_in=0, generator=torch.Generator().manual_seed(3),
                             progress=False)
    initial = sim.initial(2, torch.Generator().manual_seed(3))
    expected = sim.pool(sim.advance(initial, sim.dt))
    assert torch.allclose(first[:, 0, 0], expected.float(), atol=1e-6)
    # pooling is the average over coarsen x coarsen blocks
    assert torch.allclose(sim.pool(initial)[:, 3, 5], initial[:, 6:8, 10:12].mean((-2, -1)))
    v = sim.velocity(first[:, 0])
    assert v.shape == (2, 2, 16, 16)


def test_initial_fields_are_zero_mean_with_the_requested_velocity():
    sim = flow(initial_velocity=2.5)
    omega = random_field(sim, n=4)
    assert omega.mean((-2, -1)).abs().max() < 1e-12
    assert torch.allclose(vorticity_to_velocity(omega).abs().amax((-3, -2, -1)),
                          torch.full((4,), 2.5, dtype=torch.float64))


def test_bad_input():
    with pytest.raises(ValueError, match="even integer"):
        KolmogorovFlow(63)
    with pytest.raises(ValueError, match="coarsen"):
        KolmogorovFlow(64, 3)
    with pytest.raises(ValueError, match="reynolds"):
        KolmogorovFlow(64, reynolds=-1.0)
    with pytest.raises(ValueError, match="drag"):
        KolmogorovFlow(64, drag=-0.1)
    with pytest.raises(ValueError, match="wavenumber"):
        KolmogorovFlow(12, wavenumber=4)
    with pytest.raises(TypeError, match="dtype"):
        KolmogorovFlow(64, dtype=torch.float16)
    sim = flow()
    with pytest.raises(ValueError, match="32 x 32"):
        sim.advance(torch.zeros(16, 16), 0.1)
    with pytest.raises(ValueError, match=r"\(\.\.\., N, N\)"):
        sim.advance(torch.zeros(32, 16), 0.1)
    with pytest.raises(TypeError, match="floating"):
        vorticity_to_velocity(torch.zeros(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="length"):
        sim.trajectories(2, 0)
    with pytest.raises(ValueError, match="duration"):
        sim.advance(torch.zeros(32, 32), -1.0)
