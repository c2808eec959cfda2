r"""Tests of the noise schedules and time grids of `plausible.schedules`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from plausible.schedules import (
    RectifiedSchedule,
    Schedule,
    VESchedule,
    VPSchedule,
    schedule_from_config,
    time_grid,
)

F64 = torch.float64

SCHEDULES = {
    "vp": VPSchedule(),
    "vp-eta0.05": VPSchedule(eta=0.05),
    "ve": VESchedule(),
    "ve-custom": VESchedule(sigma_min=0.01, sigma_max=80.0),
    "rectified": RectifiedSchedule(),
    "rectified-eta0.1": RectifiedSchedule(eta=0.1),
}


def _ts() -> torch.Tensor:
    """Times covering [0, 1], dense near both ends."""
    ends = torch.tensor([1e-9, 1e-7, 1e-5, 1e-4, 1e-3, 1e-2], dtype=F64)
    return torch.cat([torch.linspace(0, 1, 201, dtype=F64), ends, 1 - ends]).sort().values


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize("eta", [1e-3, 1e-2, 0.2])
def test_vp_endpoints_and_invariant(eta):
    s = VPSchedule(eta=eta)
    a0, s0 = s(torch.tensor(0.0, dtype=F64))
    a1, s1 = s(torch.tensor(1.0, dtype=F64))
    assert math.isclose(float(a0), 1.0, rel_tol=0, abs_tol=1e-15)
    assert math.isclose(float(s0), eta, rel_tol=1e-12)
    assert math.isclose(float(a1), eta, rel_tol=1e-12)
    assert math.isclose(float(s1), 1.0, rel_tol=1e-14)
    t = _ts()
    alpha, sigma = s(t)
    assert alpha.shape == sigma.shape == t.shape and alpha.dtype == F64
    torch.testing.assert_close(alpha**2 + sigma**2, torch.full_like(t, 1 + eta**2),
                               rtol=1e-14, atol=0)
    # the SDA form: alpha = cos(acos(sqrt(eta)) t)^2
    torch.testing.assert_close(alpha, torch.cos(math.acos(math.sqrt(eta)) * t) ** 2,
                               rtol=1e-14, atol=0)
    assert (alpha > 0).all() and (sigma > 0).all()


@pytest.mark.parametrize("eta", [1e-3, 1e-2])
def test_vp_sigma_is_accurate_near_zero(eta):
    """sigma_t = sqrt(1 - alpha_t^2 + eta^2) evaluated without catastrophic cancellation:
    compared with an 80-bit (numpy longdouble) reference to 1e-13 relative."""
    s = VPSchedule(eta=eta)
    t = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5], dtype=F64)
    _, sigma = s(t)
    tl = t.numpy().astype(np.longdouble)
    theta = np.arccos(np.sqrt(np.longdouble(eta)))
    # 1 - cos^4 = sin^2 (1 + cos^2): no cancellation
    c, sn = np.cos(theta * tl), np.sin(theta * tl)
    ref = np.sqrt(sn**2 * (1 + c**2) + np.longdouble(eta) ** 2)
    rel = np.abs(sigma.numpy().astype(np.longdouble) - ref) / ref
    assert float(rel.max()) <= 1e-13, rel


def test_ve_endpoints():
    s = VESchedule(sigma_min=0.01, sigma_max=80.0)
    t = _ts()
    alpha, sigma = s(t)
    assert torch.equal(alpha, torch.ones_like(t))
    assert math.isclose(float(sigma[0]), 0.01, rel_tol=1e-14)
    assert math.isclose(float(sigma[-1]), 80.0, rel_tol=1e-14)
    # log-linear in t
    torch.testing.assert_close(torch.log(sigma), (1 - t) * math.log(0.01) + t * math.log(80.0),
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("eta", [1e-3, 0.1])
def test_rectified_endpoints(eta):
    s = RectifiedSchedule(eta=eta)
    t = _ts()
    alpha, sigma = s(t)
    torch.testing.assert_close(alpha + sigma, torch.ones_like(t), rtol=0, atol=1e-15)
    assert math.isclose(float(alpha[0]), 1 - eta, abs_tol=1e-15)
    assert math.isclose(float(sigma[0]), eta, rel_tol=1e-14)
    assert math.isclose(float(alpha[-1]), eta, rel_tol=1e-12)
    assert math.isclose(float(sigma[-1]), 1 - eta, abs_tol=1e-15)
    # linear in t
    torch.testing.assert_close(sigma, eta + (1 - 2 * eta) * t, rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_shapes_and_scalar_inputs(name):
    s = SCHEDULES[name]
    for t in (0.3, torch.tensor(0.3), torch.full((4,), 0.3), torch.full((2, 3), 0.3)):
        alpha, sigma = s(t)
        shape = torch.as_tensor(t).shape
        assert alpha.shape == sigma.shape == shape
    a32, _ = s(torch.tensor([0.3], dtype=torch.float32))
    a64, _ = s(torch.tensor([0.3], dtype=F64))
    assert a32.dtype == torch.float32 and a64.dtype == F64


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ratio_strictly_increasing(name):
    s = SCHEDULES[name]
    t = torch.linspace(0, 1, 1001, dtype=F64)
    r = s.ratio(t)
    assert (r > 0).all()
    assert (r[1:] > r[:-1]).all()
    alpha, sigma = s(t)
    torch.testing.assert_close(r, sigma / alpha, rtol=1e-15, atol=0)
    torch.testing.assert_close(s.log_snr(t), torch.log(alpha / sigma), rtol=1e-12, atol=1e-12)
    ls = s.log_snr(t)
    assert (ls[1:] < ls[:-1]).all()


# --------------------------------------------------------------------------- t_of_ratio


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_t_of_ratio_inverts_ratio_in_t(name):
    """t -> ratio -> t to 1e-10 where the inverse is well conditioned (the VP ratio is flat at
    t = 0: d ratio / dt = 0 there, so t itself is only determined to ~sqrt(eps) at t ~ 0)."""
    s = SCHEDULES[name]
    t = _ts()
    t = t[t >= 1e-3]
    back = s.t_of_ratio(s.ratio(t))
    assert back.dtype == F64 and back.shape == t.shape
    err = (back - t).abs()
    assert float(err.max()) <= 1e-10, (float(err.max()), float(t[err.argmax()]))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_t_of_ratio_inverts_ratio_in_ratio(name):
    """ratio -> t -> ratio to 1e-10 relative over the whole range [ratio(0), ratio(1)]."""
    s = SCHEDULES[name]
    r0 = float(s.ratio(torch.tensor(0.0, dtype=F64)))
    r1 = float(s.ratio(torch.tensor(1.0, dtype=F64)))
    r = torch.exp(torch.linspace(math.log(r0), math.log(r1), 201, dtype=F64))
    r = torch.cat([r, r0 * (1 + torch.logspace(-9, -1, 9, dtype=F64))])
    t = s.t_of_ratio(r)
    assert ((t >= 0) & (t <= 1)).all()
    again = s.ratio(t)
    rel = (again - r).abs() / r
    assert float(rel.max()) <= 1e-10, (float(rel.max()), float(r[rel.argmax()]))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_t_of_ratio_clips_outside_range(name):
    s = SCHEDULES[name]
    r0 = float(s.ratio(torch.tensor(0.0, dtype=F64)))
    r1 = float(s.ratio(torch.tensor(1.0, dtype=F64)))
    t = s.t_of_ratio(torch.tensor([r0 / 10, r1 * 10], dtype=F64))
    torch.testing.assert_close(t, torch.tensor([0.0, 1.0], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_closed_form_t_of_ratio_equals_the_bisection(name):
    """Each schedule's closed-form inverse agrees with the base class's float64 bisection
    (which the closed forms replace for speed) to 1e-12, inside and outside the range (except
    near the VP's t = 0, where t is determined only to ~sqrt(eps); see above)."""
    s = SCHEDULES[name]
    assert type(s).t_of_ratio is not Schedule.t_of_ratio
    r0 = float(s.ratio(torch.tensor(0.0, dtype=F64)))
    r1 = float(s.ratio(torch.tensor(1.0, dtype=F64)))
    r = torch.exp(torch.linspace(math.log(r0 / 3), math.log(r1 * 3), 301, dtype=F64))
    closed, bisected = s.t_of_ratio(r), Schedule.t_of_ratio(s, r)
    assert closed.dtype == F64 and closed.shape == r.shape
    keep = bisected >= 1e-3
    assert float((closed - bisected)[keep].abs().max()) <= 1e-12
    assert float((closed - bisected).abs().max()) <= 1e-7


# --------------------------------------------------------------------------- time grids


@pytest.mark.parametrize("kind", ["uniform", "logsnr", "karras"])
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 7, 64])
def test_time_grid_decreasing_from_1_to_0(kind, name, steps):
    grid = time_grid(steps, kind, SCHEDULES[name])
    assert grid.shape == (steps + 1,)
    assert grid.dtype == F64
    assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
    assert (grid[1:] < grid[:-1]).all()
    assert ((grid >= 0) & (grid <= 1)).all()


def test_uniform_grid_is_linspace():
    torch.testing.assert_close(time_grid(10), torch.linspace(1, 0, 11, dtype=F64),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [4, 32])
def test_logsnr_grid_equally_spaced(name, steps):
    s = SCHEDULES[name]
    grid = time_grid(steps, "logsnr", s)
    lam = s.log_snr(grid)
    d = lam[1:] - lam[:-1]
    span = float(s.log_snr(torch.tensor(0.0, dtype=F64)) - s.log_snr(torch.tensor(1.0, dtype=F64)))
    torch.testing.assert_close(d, torch.full_like(d, span / steps), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_warped_logsnr_grid_follows_its_power_law(name):
    """lambda_i = lambda_1 + (lambda_0 - lambda_1) (1 - (1 - i/N)^p): finer at low noise."""
    s, steps, p = SCHEDULES[name], 8, 1.2
    lam = s.log_snr(time_grid(steps, "logsnr", s, power=p))
    lo = float(s.log_snr(torch.tensor(1.0, dtype=F64)))
    hi = float(s.log_snr(torch.tensor(0.0, dtype=F64)))
    u = torch.arange(steps + 1, dtype=F64) / steps
    torch.testing.assert_close(lam, lo + (hi - lo) * (1 - (1 - u) ** p), rtol=1e-8, atol=1e-8)
    d = lam[1:] - lam[:-1]
    assert (d[1:] < d[:-1]).all()  # steps shrink toward t = 0
    with pytest.raises(ValueError, match="power must be positive"):
        time_grid(steps, "logsnr", s, power=0.0)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("rho", [7.0, 3.0])
@pytest.mark.parametrize("steps", [4, 32])
def test_karras_grid_equally_spaced_in_ratio_power(name, rho, steps):
    s = SCHEDULES[name]
    grid = time_grid(steps, "karras", s, rho=rho)
    u = s.ratio(grid) ** (1 / rho)
    d = u[1:] - u[:-1]
    assert (d < 0).all()
    torch.testing.assert_close(d, torch.full_like(d, float(d.mean())), rtol=1e-8, atol=1e-12)
    # the endpoints are the schedule's extreme ratios
    torch.testing.assert_close(u[0], s.ratio(torch.tensor(1.0, dtype=F64)) ** (1 / rho))
    torch.testing.assert_close(u[-1], s.ratio(torch.tensor(0.0, dtype=F64)) ** (1 / rho))


def test_karras_grid_matches_edm_formula_for_ve():
    """For VE (alpha = 1, ratio = sigma) the grid reproduces EDM's sigma_i directly."""
    s = VESchedule(sigma_min=0.002, sigma_max=80.0)
    steps, rho = 18, 7.0
    grid = time_grid(steps, "karras", s, rho=rho)
    i = torch.arange(steps + 1, dtype=F64)
    edm = (80.0 ** (1 / rho) + i / steps * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    _, sigma = s(grid)
    torch.testing.assert_close(sigma, edm, rtol=1e-10, atol=0)


def test_time_grid_dtype_and_device():
    g = time_grid(5, "karras", VPSchedule(), dtype=torch.float32, device="cpu")
    assert g.dtype == torch.float32 and g.device.type == "cpu"


def test_time_grid_errors():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        time_grid(0)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        time_grid(2.0)
    with pytest.raises(ValueError, match="needs the schedule"):
        time_grid(4, "logsnr")
    with pytest.raises(ValueError, match="needs the schedule"):
        time_grid(4, "karras")
    with pytest.raises(ValueError, match=r"unknown time grid 'cosine'.*'uniform', 'logsnr'"):
        time_grid(4, "cosine", VPSchedule())


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_config_round_trip(name):
    s = SCHEDULES[name]
    config = json.loads(json.dumps(s.config))  # JSON-serialisable
    rebuilt = schedule_from_config(config)
    assert type(rebuilt) is type(s)
    assert rebuilt == s and hash(rebuilt) == hash(s)
    assert rebuilt.config == s.config
    t = _ts()
    for a, b in zip(rebuilt(t), s(t)):
        assert torch.equal(a, b)
    assert repr(rebuilt) == repr(s)


def test_schedules_differ():
    assert VPSchedule(1e-3) != VPSchedule(1e-2)
    assert VPSchedule(1e-2) != RectifiedSchedule(1e-2)
    assert VESchedule() != VESchedule(sigma_max=10.0)
    assert VPSchedule() != "vp"


def test_schedule_from_config_errors():
    with pytest.raises(ValueError, match="'kind' key"):
        schedule_from_config({"eta": 0.1})
    with pytest.raises(ValueError, match="'kind' key"):
        schedule_from_config("vp")
    with pytest.raises(ValueError, match=r"unknown schedule kind 'cosine'.*\['rectified', 've', "
                                         r"'vp'\]"):
        schedule_from_config({"kind": "cosine"})
    with pytest.raises(ValueError, match="invalid arguments for schedule 'vp'"):
        schedule_from_config({"kind": "vp", "sigma_max": 3.0})
    with pytest.raises(ValueError, match="0 < eta < 1"):
        schedule_from_config({"kind": "vp", "eta": 1.5})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VPSchedule(eta=0.0), "0 < eta < 1"),
        (lambda: VPSchedule(eta=1.0), "0 < eta < 1"),
        (lambda: VPSchedule(eta=float("nan")), "0 < eta < 1"),
        (lambda: VESchedule(sigma_min=0.0), "0 < sigma_min < sigma_max"),
        (lambda: VESchedule(sigma_min=2.0, sigma_max=1.0), "0 < sigma_min < sigma_max"),
        (lambda: RectifiedSchedule(eta=0.5), "0 < eta < 0.5"),
        (lambda: RectifiedSchedule(eta=-0.1), "0 < eta < 0.5"),
    ],
)
def test_schedule_argument_checks(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_base_schedule_is_abstract():
    with pytest.raises(NotImplementedError):
        Schedule()(0.5)
