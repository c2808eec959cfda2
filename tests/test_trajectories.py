"""TrajectoryDenoiser: exact window bookkeeping, Jacobians of the composition, and the
composition of exact window denoisers of linear-Gaussian chains against the exact
trajectory denoiser and the Kalman smoother."""

from __future__ import annotations

import math

import pytest
import torch

from plausible import MMPS, Denoiser, Observation, TrajectoryDenoiser, VPSchedule, ops, sample
from plausible.nets import ResMLP
from plausible.tasks import ARChain

f64 = torch.float64
TAG = 1000.0  # a window's output at position p is TAG * (value of its first state) + p


class Probe(Denoiser):
    """A window denoiser that reports where its outputs come from: with trajectories whose
    state i holds the number i (+ an offset per batch element), the output at position p of a
    window starting at state s is ``TAG * s + p`` in every entry of the state. It records the
    batch size, t and conditioning of every call."""

    def __init__(self, W: int, S: tuple[int, ...], flatten: bool, shape: bool = True):
        super().__init__()
        self.W, self.S = W, S
        self.schedule = VPSchedule()
        self.shape = ((W * S[0], *S[1:]) if flatten and S else (W, *S)) if shape else None
        self.calls: list[tuple[int, torch.Tensor, dict]] = []

    def forward(self, x_t, t, **cond):
        self.calls.append((x_t.shape[0], t.clone(), dict(cond)))
        n = x_t.shape[0]
        xw = x_t.reshape(n, self.W, -1)  # time-major, flattened or not
        code = TAG * xw[:, :1, :1] + torch.arange(self.W, dtype=x_t.dtype)[None, :, None]
        return code.expand(xw.shape).reshape(x_t.shape)


@pytest.fixture(autouse=True)
def one_thread():
    """Small float64 products: one thread (two threads on a shared 2-core machine spin and
    cost 15x the CPU time); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ramp(B: int, L: int, S: tuple[int, ...]) -> torch.Tensor:
    """x[b, i, ...] = i + 10^4 b (exact in float64)."""
    values = torch.arange(L, dtype=f64)[None, :] + 1e4 * torch.arange(B, dtype=f64)[:, None]
    return values.reshape(B, L, *(1,) * len(S)).expand(B, L, *S).clone()


def brute_force(L: int, k: int, stride: int, stitching: str) -> list[list[tuple[int, int]]]:
    """(start, position) pairs each state is read from (a list of one, or all for average)."""
    W = 2 * k + 1
    starts = list(range(0, L - W + 1, stride))
    if starts[-1] != L - W:
        starts.append(L - W)
    out = []
    for i in range(L):
        cands = [(w, s, i - s) for w, s in enumerate(starts) if s <= i < s + W]
        if stitching == "average":
            out.append([(s, p) for _, s, p in cands])
        elif stitching == "symmetric":
            _, s, p = min(cands, key=lambda c: (abs(c[2] - k), c[0]))
            out.append([(s, p)])
        else:  # causal: the most past context
            _, s, p = max(cands, key=lambda c: (c[2], -c[0]))
            out.append([(s, p)])
    return out


def expected_codes(B: int, L: int, S: tuple[int, ...], k: int, stride: int, stitching: str):
    plan = brute_force(L, k, stride, stitching)
    codes = torch.tensor([sum(TAG * s + p for s, p in c) / len(c) for c in plan], dtype=f64)
    out = codes[None, :] + TAG * 1e4 * torch.arange(B, dtype=f64)[:, None]
    return out.reshape(B, L, *(1,) * len(S)).expand(B, L, *S)


@pytest.mark.parametrize("S,flatten", [((), False), ((2,), False), ((2,), True),
                                       ((3, 4), False), ((2, 3, 4), True)])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_stride_one_is_sdas_rule_exactly(S, flatten, k):
    W = 2 * k + 1
    for L in (W, W + 1, 2 * W + 3, 40):
        probe = Probe(W, S, flatten)
        traj = TrajectoryDenoiser(probe, order=k, state_shape=S if flatten else None)
        assert traj.flatten == (flatten and bool(S)) and traj.state_shape == S
        out = traj(ramp(2, L, S), 0.5)
        assert out.shape == (2, L, *S)
        start, pos = (out[0].reshape(L, -1)[:, 0] // TAG), out[0].reshape(L, -1)[:, 0] % TAG
        for i in range(L):  # SDA: first k from the first window, centres, last k from the last
            if i < k:
                assert (start[i], pos[i]) == (0, i)
            elif i >= L - k:
                assert (start[i], pos[i]) == (L - W, i - (L - W))
            else:
                assert (start[i], pos[i]) == (i - k, k)
        assert torch.equal(out, expected_codes(2, L, S, k, 1, "symmetric"))
        assert sum(c[0] for c in probe.calls) == 2 * (L - W + 1) == 2 * traj.evaluations(L)


@pytest.mark.parametrize("stitching", ["symmetric", "causal", "average"])
@pytest.mark.parametrize("k,stride", [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 4), (3, 7)])
@pytest.mark.parametrize("S,flatten", [((2,), False), ((2, 3), True)])
def test_blanket_stitching_exactly(stitching, k, stride, S, flatten):
    W = 2 * k + 1
    for L in (W, W + 1, W + stride, 3 * W + 2, 37):
        traj = TrajectoryDenoiser(Probe(W, S, flatten), order=k, stride=stride,
                                  stitching=stitching, state_shape=S)
        out = traj(ramp(3, L, S), torch.tensor(0.3))
        assert torch.equal(out, expected_codes(3, L, S, k, stride, stitching)), (L, stitching)
        starts = traj.window_starts(L)
        assert starts[-1] == L - W and bool((starts.diff() <= stride).all())
        assert traj.evaluations(L) == math.ceil((L - W) / stride) + 1
        if stitching != "average":
            window, position = traj.source(L)
            assert torch.equal(starts[window] + position, torch.arange(L))


def test_causal_reads_the_last_state_of_the_window_ending_there():
    k, W, L = 2, 5, 30
    traj = TrajectoryDenoiser(Probe(W, (1,), False), order=k, stitching="causal")
    window, position = traj.source(L)
    starts = traj.window_starts(L)
    for i in range(L):
        if i >= W - 1:
            assert (starts[window[i]], position[i]) == (i - W + 1, W - 1)
        else:
            assert (starts[window[i]], position[i]) == (0, i)


def test_t_cond_and_chunking_are_batched_per_window():
    k, W, L, B = 1, 3, 11, 3
    probe = Probe(W, (2,), False)
    traj = TrajectoryDenoiser(probe, order=k, length=L, max_batch=7)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=f64)
    context = torch.arange(B, dtype=f64)[:, None].expand(B, 4)
    shared = torch.ones(5)
    out = traj(ramp(B, L, (2,)), t, context=context, shared=shared)
    n = L - W + 1
    sizes = [c[0] for c in probe.calls]
    assert sizes == [7, 7, 7, 6] and sum(sizes) == B * n
    t_seen = torch.cat([c[1] for c in probe.calls])
    ctx_seen = torch.cat([c[2]["context"] for c in probe.calls])
    assert torch.equal(t_seen, t.repeat_interleave(n))
    assert torch.equal(ctx_seen, context.repeat_interleave(n, dim=0))
    assert all(c[2]["shared"] is shared for c in probe.calls)
    probe.calls.clear()
    whole = TrajectoryDenoiser(probe, order=k, length=L)(ramp(B, L, (2,)), t)
    assert len(probe.calls) == 1 and torch.equal(out, whole)


def window_net(W: int, D: int, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = ResMLP(W * D, hidden=32, blocks=2).to(f64)
    return Denoiser(net, VPSchedule(), shape=(W * D,))


@pytest.mark.parametrize("stitching,stride", [("symmetric", 1), ("causal", 2),
                                              ("average", 2)])
def test_jacobian_is_the_composed_window_jacobian(stitching, stride):
    k, D, L = 1, 2, 9
    W = 2 * k + 1
    window = window_net(W, D)
    traj = TrajectoryDenoiser(window, order=k, length=L, stride=stride, stitching=stitching,
                              max_batch=3)
    assert traj.flatten and traj.state_shape == (D,) and traj.shape == (L, D)
    t = torch.tensor(0.4, dtype=f64)
    x = torch.randn(L, D, dtype=f64)
    J = torch.autograd.functional.jacobian(lambda z: traj(z[None], t)[0], x)  # (L, D, L, D)
    expected = torch.zeros(L, D, L, D, dtype=f64)
    for i, cands in enumerate(brute_force(L, k, stride, stitching)):
        for s, p in cands:
            Jw = torch.autograd.functional.jacobian(
                lambda z: window(z.reshape(1, W * D), t).reshape(W, D), x[s:s + W])
            expected[i, :, s:s + W] += Jw[p] / len(cands)
    torch.testing.assert_close(J, expected, rtol=1e-10, atol=1e-12)
    v = torch.randn(2, L, D, dtype=f64)
    xs = torch.randn(2, L, D, dtype=f64)
    _, vjp = torch.func.vjp(lambda z: traj(z, t), xs)
    (jv,) = vjp(v)
    for b in range(2):
        Jb = torch.autograd.functional.jacobian(lambda z: traj(z[None], t)[0], xs[b])
        torch.testing.assert_close(jv[b], torch.einsum("id,idje->je", v[b], Jb),
                                   rtol=1e-10, atol=1e-12)


def test_with_length_and_shapes():
    window = window_net(5, 3)
    traj = TrajectoryDenoiser(window, order=2)
    assert traj.shape is None and traj.state_shape == (3,)
    long = traj.with_length(100)
    assert long.shape == (100, 3) and long.window_denoiser is window
    assert long.schedule is window.schedule
    x = torch.randn(2, 100, 3, dtype=f64)
    torch.testing.assert_close(long(x, 0.5), traj(x, 0.5))
    assert long(x[:, :17], 0.5).shape == (2, 17, 3)  # the forward reads L from x_t
    unknown = TrajectoryDenoiser(Probe(3, (2,), False, shape=False), order=1)
    assert unknown.state_shape is None and unknown(ramp(1, 6, (2,)), 0.1).shape == (1, 6, 2)


def test_bad_input():
    window = window_net(5, 3)
    traj = TrajectoryDenoiser(window, order=2, length=10)
    with pytest.raises(ValueError, match="at least 2k \\+ 1 = 5 states"):
        traj(torch.randn(1, 4, 3, dtype=f64), 0.5)
    with pytest.raises(ValueError, match="states of shape \\(3,\\)"):
        traj(torch.randn(1, 10, 2, dtype=f64), 0.5)
    with pytest.raises(ValueError, match="t must have shape"):
        traj(torch.randn(2, 10, 3, dtype=f64), torch.rand(3))
    with pytest.raises(TypeError, match="floating-point"):
        traj(torch.ones(1, 10, 3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="stride must be in"):
        TrajectoryDenoiser(window, order=2, stride=6)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        TrajectoryDenoiser(window, order=2, stride=0)
    with pytest.raises(ValueError, match="stitching must be one of"):
        TrajectoryDenoiser(window, order=2, stitching="median")
    with pytest.raises(ValueError, match="length must be an integer >= 5"):
        TrajectoryDenoiser(window, order=2, length=3)
    with pytest.raises(ValueError, match="not a window of 2k \\+ 1 = 7 states"):
        TrajectoryDenoiser(window, order=3)  # 15 entries are not 7 states
    with pytest.raises(ValueError, match="not a window of 2k \\+ 1 = 5 states of shape"):
        TrajectoryDenoiser(window, order=2, state_shape=(4,))
    with pytest.raises(ValueError, match="pass flatten=True"):
        TrajectoryDenoiser(window, order=2, flatten=False)
    with pytest.raises(TypeError, match="window_denoiser must be a plausible Denoiser"):
        TrajectoryDenoiser(torch.nn.Linear(3, 3), order=1)
    with pytest.raises(ValueError, match="order must be an integer >= 0"):
        TrajectoryDenoiser(window, order=-1)
    with pytest.raises(ValueError, match="stitching='average'"):
        TrajectoryDenoiser(window, order=2, stitching="average").source(10)


# --- the composition of exact window denoisers of linear-Gaussian chains -------------------

def chain_ar1() -> ARChain:
    return ARChain(torch.tensor([0.9], dtype=f64), 0.19)


def chain_ar2() -> ARChain:
    A = torch.tensor([[[0.5, 0.2], [-0.1, 0.4]], [[0.2, 0.0], [0.1, -0.3]]], dtype=f64)
    return ARChain(A, torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=f64))


def affine(denoiser: Denoiser, L: int, D: int, t: torch.Tensor):
    """(Jacobian (L D, L D), offset (L D,)) of a denoiser that is affine in x_t."""
    E = torch.eye(L * D, dtype=f64).reshape(L * D, L, D)
    zero = denoiser(torch.zeros(1, L, D, dtype=f64), t).reshape(-1)
    return (denoiser(E, t).reshape(L * D, L * D) - zero).T, zero


def composition_rms(chain: ARChain, k: int, L: int, t: torch.Tensor, stitching="symmetric"):
    r"""Exact :math:`\sqrt{E\|d_k(x_t) - E[x | x_t]\|^2 / (L D)}` over :math:`x_t \sim
    p(x_t)`, and the same in units of the mean posterior standard deviation."""
    D = chain.dim
    schedule = VPSchedule()
    exact = chain.trajectory_denoiser(L, schedule)
    comp = TrajectoryDenoiser(chain.window_denoiser(schedule, order=k), order=k, length=L,
                              stitching=stitching)
    Jc, bc = affine(comp, L, D, t)
    Je, be = affine(exact, L, D, t)
    alpha, sigma = schedule(t)
    m, C = chain.trajectory_gaussian(L)
    cov_t = alpha**2 * C + sigma**2 * torch.eye(L * D, dtype=f64)
    dJ = Jc - Je
    bias = (bc - be) + dJ @ (alpha * m.reshape(-1))
    mse = (torch.trace(dJ @ cov_t @ dJ.T) + bias.square().sum()) / (L * D)
    post_var = torch.trace(sigma**2 / alpha * Je) / (L * D)
    return float(mse.sqrt()), float((mse / post_var).sqrt())


def test_composition_is_exact_for_one_window_and_for_independent_states():
    schedule = VPSchedule()
    chain = chain_ar2()
    x = torch.randn(3, 5, 2, dtype=f64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=f64)
    one = TrajectoryDenoiser(chain.window_denoiser(schedule, order=2), order=2, length=5)
    torch.testing.assert_close(one(x, t), chain.trajectory_denoiser(5, schedule)(x, t),
                               rtol=0, atol=1e-13)
    iid = ARChain(torch.zeros(1, 2, 2, dtype=f64), torch.tensor([[0.3, 0.1], [0.1, 0.2]]))
    x = torch.randn(3, 33, 2, dtype=f64)
    for k in (0, 2):
        for stitching in ("symmetric", "causal", "average"):
            comp = TrajectoryDenoiser(iid.window_denoiser(schedule, order=k), order=k,
                                      stride=2 if k else 1, stitching=stitching)
            torch.testing.assert_close(comp(x, t), iid.trajectory_denoiser(33, schedule)(x, t),
                                       rtol=0, atol=1e-13)


@pytest.mark.parametrize("name,chain,orders", [("ar1", chain_ar1(), (0, 1, 2, 3)),
                                               ("ar2", chain_ar2(), (2, 3))])
def test_composition_error_vanishes_as_noise_power(name, chain, orders):
    # E[x|x_t] = m + C (C + rho^2 I)^{-1} (...) = m + (I - rho^2 P + rho^4 P^2 - ...)(...) with
    # the precision P banded of width p (the chain's order): the window of half-width k misses
    # terms of order rho^(2 ceil((k + 1) / p)) and nothing below.
    schedule = VPSchedule()
    L, D = 30, chain.dim
    exact = chain.trajectory_denoiser(L, schedule)
    t0 = torch.tensor(0.0, dtype=f64)
    for k in orders:
        comp = TrajectoryDenoiser(chain.window_denoiser(schedule, order=k), order=k, length=L)
        Jc, _ = affine(comp, L, D, t0)
        Je, _ = affine(exact, L, D, t0)
        power = 2 * math.ceil((k + 1) / chain.order)
        rho0 = float(schedule.ratio(t0)) if hasattr(schedule, "ratio") else 1e-3
        assert float((Jc - Je).abs().max()) < 50 * rho0**power + 1e-12  # t = 0
        errors = []
        for rho in (0.025, 0.05):
            t = schedule.t_of_ratio(torch.tensor(rho, dtype=f64))
            errors.append(float((affine(comp, L, D, t)[0] - affine(exact, L, D, t)[0])
                                .abs().max()))
        slope = math.log(errors[1] / errors[0]) / math.log(2)
        assert power - 0.3 < slope < power + 0.3, (k, slope, power)


def test_composition_error_is_bounded_and_decreases_with_the_order():
    # measured (L = 48, 25 times in [0, 1]), in units of the data scale; see
    # docs/assimilation.md for the table
    chain = chain_ar2()
    ts = torch.linspace(0, 1, 25, dtype=f64)
    worst = {}
    for k in (2, 4, 6):
        errors = [composition_rms(chain, k, 48, t) for t in ts]
        worst[k] = max(e[0] for e in errors)
        assert max(e[1] for e in errors) < 0.25  # always below a quarter posterior std
        assert errors[0][0] < 1e-10 and errors[-1][0] < 1e-3  # t = 0 and t = 1
    assert worst[2] > 1.4 * worst[4] > 1.4**2 * worst[6], worst


@pytest.fixture(scope="module")
def assimilation():
    return assimilation_problem()


def assimilation_problem():
    """An AR(2) chain in 2-D over L = 24 steps; observation 1: variable 0 every 4th step,
    sigma 0.1 (a mask); observation 2: the mean of both variables every 3rd step, sigma 0.3
    (a matrix). Kalman smoother marginals as the reference."""
    chain = chain_ar2()
    L, D = 24, 2
    g = torch.Generator().manual_seed(0)
    x = chain.sample(1, L, g)[0]
    mask = torch.zeros(L, D, dtype=torch.bool)
    mask[::4, 0] = True
    s1, s2 = 0.1, 0.3
    y1 = torch.where(mask, x + s1 * torch.randn(L, D, generator=g, dtype=f64), torch.nan)
    steps2 = torch.arange(2, L, 3)
    M2 = torch.zeros(len(steps2), L * D, dtype=f64)
    for r, i in enumerate(steps2):
        M2[r, i * D:(i + 1) * D] = 0.5
    y2 = M2 @ x.reshape(-1) + s2 * torch.randn(len(steps2), generator=g, dtype=f64)
    obs = [Observation(y1, ops.Mask(mask), s1), Observation(y2, ops.Matrix(M2), s2)]
    Y = torch.full((L, 2), torch.nan, dtype=f64)
    Y[:, 0] = y1[:, 0]
    Y[steps2, 1] = y2
    H = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=f64)
    means, covs, _ = chain.smooth(Y, H, torch.tensor([s1**2, s2**2], dtype=f64))
    std = torch.diagonal(covs, dim1=1, dim2=2).sqrt()
    return chain, obs, means, std


# measured on this problem: the largest shift of a posterior marginal mean caused by the
# composition, in posterior stds (see test below); bounds with some margin
# (measured 0.20 at k = 2 and 0.05 at k = 6; rms 0.060 and 0.014)
SHIFT_BOUND = {2: 0.3, 6: 0.1}


def posterior_samples(prior, obs, n=1024):
    post = MMPS(prior, obs, tol=1e-8)
    return sample(post, n, steps=32, sampler="dpm++", order=2, grid="logsnr", dtype=f64,
                  seed=1, progress=False)


def test_mmps_over_composed_windows_vs_kalman_smoother(assimilation):
    chain, obs, means, std = assimilation
    L, n = 24, 1024
    schedule = VPSchedule()
    mc = 1 / math.sqrt(n)  # standard error of a mean, in posterior stds
    x_exact = posterior_samples(chain.trajectory_denoiser(L, schedule), obs, n)
    x = {k: posterior_samples(TrajectoryDenoiser(chain.window_denoiser(schedule, order=k),
                                                 order=k, length=L), obs, n) for k in (2, 6)}
    # the exact trajectory prior: MMPS is exact, only Monte-Carlo error remains
    z = (x_exact.mean(0) - means) / std
    assert float(z.square().mean().sqrt()) < 1.5 * mc and float(z.abs().max()) < 4.5 * mc
    ratio = x_exact.var(0) / std**2 - 1  # standard error sqrt(2 / n) = 0.044
    assert float(ratio.abs().max()) < 4.5 * math.sqrt(2 / n) and float(ratio.mean()) < 0.05
    # the same ODE from the same noise: the mean shift is the composition's effect
    shifts = {}
    for k, xk in x.items():
        shift = (xk - x_exact).mean(0) / std
        shifts[k] = (float(shift.abs().max()), float(shift.square().mean().sqrt()))
        z = (xk.mean(0) - means) / std
        assert float(z.abs().max()) < 4.5 * mc + SHIFT_BOUND[k], (k, shifts[k])
        ratio = xk.var(0) / std**2 - 1
        assert float(ratio.abs().max()) < 0.05 + 4.5 * math.sqrt(2 / n)
    print("composition shifts (max, rms) in posterior stds:", shifts)
    assert shifts[2][0] < SHIFT_BOUND[2] and shifts[6][0] < SHIFT_BOUND[6]
    assert shifts[2][1] > 3 * shifts[6][1]
