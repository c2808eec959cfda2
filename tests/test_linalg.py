r"""Tests of the batched Krylov solvers `plausible.linalg.cg` and `plausible.linalg.gmres`.

Every system is float64 and batched: ``K`` has shape ``(B, N, N)``, one independent system per
batch element, applied by ``einsum``. The true relative residual is always recomputed from the
returned solution rather than trusted from the solver.
"""

from __future__ import annotations

import math

import pytest
import torch

from plausible.linalg import cg, gmres

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- helpers


def spd(N: int, cond: float, g: torch.Generator) -> torch.Tensor:
    """A random SPD matrix with eigenvalues log-spaced in [1, cond]."""
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))
    lam = torch.logspace(0.0, math.log10(cond), N, dtype=F64)
    K = (Q * lam) @ Q.T
    return (K + K.T) / 2


def spd_eigs(eigs: list[float], N: int, g: torch.Generator) -> torch.Tensor:
    """An SPD matrix whose N eigenvalues take only the given distinct values."""
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))
    lam = torch.tensor([eigs[i % len(eigs)] for i in range(N)], dtype=F64)
    K = (Q * lam) @ Q.T
    return (K + K.T) / 2


def nonsym(N: int, g: torch.Generator, scale: float = 0.5) -> torch.Tensor:
    """A non-symmetric, well-conditioned matrix I + scale * G / sqrt(N) (spectrum in a disc
    of radius ~scale around 1)."""
    return torch.eye(N, dtype=F64) + scale * torch.randn(N, N, generator=g, dtype=F64) / N**0.5


def batched(K: torch.Tensor):
    """matvec of a batch of matrices ``K`` (B, N, N) that counts its calls."""
    calls = {"n": 0}

    def matvec(v: torch.Tensor) -> torch.Tensor:
        assert v.shape == K.shape[:2]
        assert torch.isfinite(v).all(), "the solver passed a non-finite vector to matvec"
        calls["n"] += 1
        return torch.einsum("bij,bj->bi", K, v)

    return matvec, calls


def true_residual(K: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||b - K x|| / ||b|| (0 where b = 0 and x solves it)."""
    r = (b - torch.einsum("bij,bj->bi", K, x)).norm(dim=1)
    bn = b.norm(dim=1)
    return torch.where(bn > 0, r / torch.where(bn > 0, bn, 1.0), r)


SOLVERS = {
    "cg": lambda mv, b, **kw: cg(mv, b, **kw),
    "gmres": lambda mv, b, **kw: gmres(mv, b, **kw),
    "gmres-restart3": lambda mv, b, **kw: gmres(mv, b, restart=3, **kw),
}


# --------------------------------------------------------------------------- CG


@pytest.mark.parametrize("tol", [1e-8, 1e-12])
def test_cg_spd_condition_1e3_matches_solve(tol):
    g = torch.Generator().manual_seed(1)
    B, N = 4, 40
    K = torch.stack([spd(N, 1e3, g) for _ in range(B)])
    b = torch.randn(B, N, generator=g, dtype=F64)
    matvec, calls = batched(K)

    sol = cg(matvec, b, tol=tol, maxiter=1000)

    exact = torch.linalg.solve(K, b)
    res = true_residual(K, sol.x, b)
    assert sol.converged.all()
    assert (sol.residual <= tol).all()
    # the recurrence residual drifts from the true one by O(cond * eps)
    assert (res <= tol + 1e-11).all(), res
    # forward error bounded by cond(K) * relative residual
    err = (sol.x - exact).norm(dim=1) / exact.norm(dim=1)
    assert (err <= 1e3 * (tol + 1e-11)).all(), err
    assert sol.x.dtype == F64 and sol.x.shape == (B, N)
    assert sol.iterations == calls["n"]
    assert 1 <= sol.iterations <= 1000


def test_cg_exact_in_as_many_steps_as_distinct_eigenvalues():
    g = torch.Generator().manual_seed(2)
    B, N = 3, 30
    # 1, 2 and 3 distinct eigenvalues: CG terminates after 1, 2, 3 iterations respectively
    K = torch.stack([
        3.0 * torch.eye(N, dtype=F64),
        spd_eigs([1.0, 4.0], N, g),
        spd_eigs([1.0, 2.0, 5.0], N, g),
    ])
    b = torch.randn(B, N, generator=g, dtype=F64)
    matvec, calls = batched(K)

    sol = cg(matvec, b, tol=1e-10, maxiter=100)

    assert sol.converged.all()
    assert sol.iterations == 3 == calls["n"]
    assert (true_residual(K, sol.x, b) <= 1e-10).all()
    torch.testing.assert_close(sol.x, torch.linalg.solve(K, b), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- GMRES


@pytest.mark.parametrize("restart", [None, 5, 12])
def test_gmres_nonsymmetric_matches_solve(restart):
    g = torch.Generator().manual_seed(3)
    B, N, tol = 4, 40, 1e-8
    K = torch.stack([nonsym(N, g) for _ in range(B)])
    assert (K - K.transpose(1, 2)).abs().amax() > 0.1  # really non-symmetric
    assert torch.linalg.cond(K).max() < 20
    b = torch.randn(B, N, generator=g, dtype=F64)
    matvec, calls = batched(K)

    sol = gmres(matvec, b, tol=tol, maxiter=1000, restart=restart)

    res = true_residual(K, sol.x, b)
    assert sol.converged.all()
    assert (sol.residual <= tol).all()
    assert (res <= tol * (1 + 1e-3) + 1e-13).all(), res
    exact = torch.linalg.solve(K, b)
    err = (sol.x - exact).norm(dim=1) / exact.norm(dim=1)
    assert (err <= 20 * tol).all(), err
    assert sol.iterations == calls["n"]
    if restart is None:
        # full GMRES: exact after at most N steps
        assert sol.iterations <= N
    else:
        # restarted: needs more than one cycle for this tolerance, each costing restart + 1
        assert sol.iterations > restart


def test_gmres_exact_in_as_many_steps_as_distinct_eigenvalues():
    g = torch.Generator().manual_seed(4)
    B, N = 3, 30
    # diagonalisable non-symmetric matrices with 1, 2, 3 distinct eigenvalues
    P = torch.stack([nonsym(N, g, 0.3) for _ in range(B)])
    lam = torch.stack([
        torch.full((N,), 2.0, dtype=F64),
        torch.tensor([1.0, 3.0] * (N // 2), dtype=F64),
        torch.tensor([1.0, 2.0, 4.0] * (N // 3), dtype=F64),
    ])
    K = P @ torch.diag_embed(lam) @ torch.linalg.inv(P)
    b = torch.randn(B, N, generator=g, dtype=F64)
    matvec, calls = batched(K)

    sol = gmres(matvec, b, tol=1e-9, maxiter=100)

    assert sol.converged.all()
    assert sol.iterations == 3 == calls["n"]
    assert (true_residual(K, sol.x, b) <= 1e-9).all()


def test_gmres_on_spd_system_agrees_with_cg():
    g = torch.Generator().manual_seed(5)
    B, N = 3, 25
    K = torch.stack([spd(N, 1e2, g) for _ in range(B)])
    b = torch.randn(B, N, generator=g, dtype=F64)
    s_cg = cg(batched(K)[0], b, tol=1e-12, maxiter=500)
    s_gm = gmres(batched(K)[0], b, tol=1e-12, maxiter=500)
    torch.testing.assert_close(s_cg.x, s_gm.x, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- auxiliary output


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("aux_shape", [(7,), (2, 3)])
def test_aux_equals_G_of_solution(solver, aux_shape):
    g = torch.Generator().manual_seed(6)
    B, N = 3, 20
    if solver == "cg":
        K = torch.stack([spd(N, 1e2, g) for _ in range(B)])
    else:
        K = torch.stack([nonsym(N, g) for _ in range(B)])
    P = math.prod(aux_shape)
    G = torch.randn(P, N, generator=g, dtype=F64)
    b = torch.randn(B, N, generator=g, dtype=F64)
    b[1] = 0.0  # a zero right-hand side has G x = 0

    def matvec(v):
        return torch.einsum("bij,bj->bi", K, v), (v @ G.T).reshape(B, *aux_shape)

    for maxiter in (1, 4, 1000):  # unconverged and converged solutions alike
        sol = SOLVERS[solver](matvec, b, tol=1e-10, maxiter=maxiter)
        assert sol.aux is not None
        assert sol.aux.shape == (B, *aux_shape)
        expected = (sol.x @ G.T).reshape(B, *aux_shape)
        scale = expected.flatten(1).norm(dim=1).amax()
        assert float((sol.aux - expected).abs().amax()) <= 1e-10 * float(scale)
        assert torch.equal(sol.aux[1], torch.zeros(aux_shape, dtype=sol.aux.dtype))


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_no_aux_for_plain_matvec(solver):
    K = torch.eye(5, dtype=F64).expand(2, 5, 5)
    sol = SOLVERS[solver](batched(K)[0], torch.ones(2, 5, dtype=F64), tol=1e-8)
    assert sol.aux is None


# --------------------------------------------------------------------------- robustness


def _stress_batch(N: int, g: torch.Generator, symmetric: bool):
    """[generic system, zero rhs, K = I (exact in 1 step), 2 eigenvalues (exact in 2 steps),
    K = 2 I with b an eigenvector]."""
    generic = spd(N, 1e3, g) if symmetric else nonsym(N, g)
    K = torch.stack([
        generic,
        spd(N, 10.0, g),
        torch.eye(N, dtype=F64),
        spd_eigs([1.0, 7.0], N, g),
        2.0 * torch.eye(N, dtype=F64),
    ])
    b = torch.randn(K.shape[0], N, generator=g, dtype=F64)
    b[1] = 0.0
    b[4] = torch.nn.functional.one_hot(torch.tensor(0), N).to(F64)
    return K, b


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("tol", [1e-8, 0.0])
@pytest.mark.parametrize("maxiter", [0, 1, 5, "N", 1000])
def test_finite_for_any_maxiter(solver, tol, maxiter):
    g = torch.Generator().manual_seed(7)
    N = 12
    maxiter = N if maxiter == "N" else maxiter
    K, b = _stress_batch(N, g, symmetric=(solver == "cg"))
    matvec, calls = batched(K)

    sol = SOLVERS[solver](matvec, b, tol=tol, maxiter=maxiter)

    assert torch.isfinite(sol.x).all()
    assert torch.isfinite(sol.residual).all()
    assert sol.iterations == calls["n"] <= maxiter
    # zero rhs: the solution is exactly zero and counted as converged
    assert torch.equal(sol.x[1], torch.zeros(N, dtype=F64))
    assert float(sol.residual[1]) == 0.0 and bool(sol.converged[1])
    res = true_residual(K, sol.x, b)
    if maxiter == 0:
        assert torch.equal(sol.x, torch.zeros_like(b))
        assert torch.equal(sol.residual, torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=F64))
        assert not sol.converged[[0, 2, 3, 4]].any()
    else:
        # one step solves K = I and the eigenvector system exactly
        assert float(res[2]) <= 1e-14 and float(res[4]) <= 1e-14
        torch.testing.assert_close(sol.x[4], b[4] / 2, rtol=0, atol=1e-15)
    if maxiter >= 2 and solver != "gmres-restart3":
        assert float(res[3]) <= 1e-12  # two distinct eigenvalues: exact in two steps
    # the reported residual is the true one (to a stated tolerance)
    assert ((sol.residual - res).abs() <= 1e-10 + 1e-6 * res).all(), (sol.residual, res)
    # converged flags are consistent with the tolerance
    assert torch.equal(sol.converged, sol.residual <= tol)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_all_zero_rhs(solver):
    K = torch.eye(6, dtype=F64).expand(3, 6, 6).clone()
    matvec, calls = batched(K)
    sol = SOLVERS[solver](matvec, torch.zeros(3, 6, dtype=F64), tol=1e-8, maxiter=10)
    assert torch.equal(sol.x, torch.zeros(3, 6, dtype=F64))
    assert torch.equal(sol.residual, torch.zeros(3, dtype=F64))
    assert sol.converged.all()
    assert sol.iterations == calls["n"] == 0


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("maxiter", [1, 3, 7])
def test_reported_residual_matches_true_residual_unconverged(solver, maxiter):
    g = torch.Generator().manual_seed(8)
    B, N = 4, 30
    if solver == "cg":
        K = torch.stack([spd(N, 1e3, g) for _ in range(B)])
    else:
        K = torch.stack([nonsym(N, g, 0.9) for _ in range(B)])
    b = torch.randn(B, N, generator=g, dtype=F64)
    sol = SOLVERS[solver](batched(K)[0], b, tol=1e-12, maxiter=maxiter)
    res = true_residual(K, sol.x, b)
    assert not sol.converged.any()
    assert sol.iterations == maxiter
    torch.testing.assert_close(sol.residual, res, rtol=1e-8, atol=1e-12)
    if solver != "cg":  # GMRES minimises the residual (CG's may grow: it minimises the K-norm)
        assert (res < 1).all()


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_residual_decreases_with_maxiter(solver):
    g = torch.Generator().manual_seed(9)
    B, N = 2, 30
    if solver == "cg":
        K = torch.stack([spd(N, 1e2, g) for _ in range(B)])
    else:
        K = torch.stack([nonsym(N, g, 0.8) for _ in range(B)])
    b = torch.randn(B, N, generator=g, dtype=F64)
    last = torch.full((B,), math.inf, dtype=F64)
    for maxiter in range(0, 16, 3):
        sol = SOLVERS[solver](batched(K)[0], b, tol=1e-14, maxiter=maxiter)
        res = true_residual(K, sol.x, b)
        if solver != "cg":  # GMRES minimises the residual: monotone
            assert (res <= last * (1 + 1e-10)).all()
        last = res
    assert (last < 0.1).all()


def _first_converged(solve, matvec, b, element: int, limit: int) -> int:
    for k in range(1, limit + 1):
        if bool(solve(matvec, b, maxiter=k).converged[element]):
            return k
    raise AssertionError("element never converged")


@pytest.mark.parametrize("solver", ["cg", "gmres"])
def test_converged_elements_are_frozen(solver):
    g = torch.Generator().manual_seed(10)
    N, tol = 40, 1e-10
    if solver == "cg":
        K = torch.stack([spd(N, 3.0, g), spd(N, 1e3, g), spd(N, 30.0, g)])
    else:
        K = torch.stack([nonsym(N, g, 0.2), nonsym(N, g, 0.95), nonsym(N, g, 0.6)])
    b = torch.randn(3, N, generator=g, dtype=F64)
    matvec, _ = batched(K)

    def solve(mv, rhs, maxiter):
        return SOLVERS[solver](mv, rhs, tol=tol, maxiter=maxiter)

    k0 = _first_converged(solve, matvec, b, 0, N)
    ref = solve(matvec, b, k0)
    assert bool(ref.converged[0]) and not bool(ref.converged[1])
    for extra in (1, 5, 200):
        sol = solve(matvec, b, k0 + extra)
        if solver == "cg":
            # frozen exactly: the converged element receives zero-length steps
            assert torch.equal(sol.x[0], ref.x[0])
            assert torch.equal(sol.residual[0], ref.residual[0])
        else:
            torch.testing.assert_close(sol.x[0], ref.x[0], rtol=1e-13, atol=1e-15)
            # a restart (every 32 iterations) recomputes it from the true residual
            torch.testing.assert_close(sol.residual[0], ref.residual[0], rtol=1e-12, atol=1e-15)
        assert bool(sol.converged[0])
        # the slow element kept improving meanwhile
        assert float(sol.residual[1]) < float(ref.residual[1])
    assert bool(sol.converged.all())


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_batch_elements_are_independent(solver):
    """Solving a batch gives each element the solution it gets alone."""
    g = torch.Generator().manual_seed(11)
    N = 20
    if solver == "cg":
        K = torch.stack([spd(N, 1e2, g) for _ in range(3)])
    else:
        K = torch.stack([nonsym(N, g) for _ in range(3)])
    b = torch.randn(3, N, generator=g, dtype=F64)
    together = SOLVERS[solver](batched(K)[0], b, tol=1e-11, maxiter=500)
    for i in range(3):
        alone = SOLVERS[solver](batched(K[i : i + 1])[0], b[i : i + 1], tol=1e-11, maxiter=500)
        torch.testing.assert_close(together.x[i], alone.x[0], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("solve", [cg, gmres])
def test_bad_inputs(solve):
    mv = batched(torch.eye(3, dtype=F64).expand(2, 3, 3))[0]
    with pytest.raises(ValueError, match=r"shape \(B, N\)"):
        solve(mv, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"shape \(B, N\)"):
        solve(mv, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="finite"):
        solve(mv, torch.tensor([[1.0, float("nan"), 0.0]] * 2, dtype=F64))
    with pytest.raises(ValueError, match="tol must be non-negative"):
        solve(mv, torch.ones(2, 3, dtype=F64), tol=-1.0)
    with pytest.raises(ValueError, match="tol must be non-negative"):
        solve(mv, torch.ones(2, 3, dtype=F64), tol=float("nan"))
    with pytest.raises(ValueError, match="maxiter must be a non-negative integer"):
        solve(mv, torch.ones(2, 3, dtype=F64), maxiter=-1)
    with pytest.raises(ValueError, match="maxiter must be a non-negative integer"):
        solve(mv, torch.ones(2, 3, dtype=F64), maxiter=2.5)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_default_maxiter_is_N(solver):
    g = torch.Generator().manual_seed(12)
    N = 10
    K = torch.stack([spd(N, 1e3, g)]) if solver == "cg" else torch.stack([nonsym(N, g, 0.9)])
    b = torch.randn(1, N, generator=g, dtype=F64)
    matvec, calls = batched(K)
    sol = SOLVERS[solver](matvec, b, tol=0.0)
    assert sol.iterations == calls["n"] <= N


# --------------------------------------------------------------------------- curvature test


def _noise_plus_prior(B: int, N: int, g: torch.Generator, negative: float):
    """K = S + P with S = diag(s) > 0 (the noise part) and P symmetric with one eigenvalue
    ``negative`` (P is PSD when negative >= 0)."""
    s = 0.05 + torch.rand(B, N, generator=g, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(B, N, N, generator=g, dtype=F64))
    lam = torch.rand(B, N, generator=g, dtype=F64) * 3
    lam[:, 0] = negative
    P = (Q * lam[:, None, :]) @ Q.transpose(1, 2)
    K = torch.diag_embed(s) + (P + P.transpose(1, 2)) / 2
    return K, s


@pytest.mark.parametrize("B", [1, 6])
@pytest.mark.parametrize("solver", ["cg", "gmres", "gmres-restart3"])
def test_curvature_bound_never_triggers_on_a_valid_system(solver, B):
    g = torch.Generator().manual_seed(3)
    N = 20
    K, s = _noise_plus_prior(B, N, g, negative=0.0)  # P is PSD (one zero eigenvalue)
    b = torch.randn(B, N, generator=g, dtype=F64)
    matvec, _ = batched(K)
    plain = SOLVERS[solver](matvec, b, tol=1e-12, maxiter=200)
    bounded = SOLVERS[solver](matvec, b, tol=1e-12, maxiter=200,
                              floor=lambda p: s * p)
    assert plain.truncated is None
    assert not bool(bounded.truncated.any())
    torch.testing.assert_close(bounded.x, plain.x, rtol=0, atol=0)
    assert float(true_residual(K, bounded.x, b).max()) < 1e-10


@pytest.mark.parametrize("solver", ["cg", "gmres"])
def test_curvature_bound_truncates_an_indefinite_system(solver):
    # P has a negative eigenvalue close to -s: K is nearly singular, its exact solution is
    # huge, and the bound (K >= S) is violated along that direction
    g = torch.Generator().manual_seed(4)
    B, N = 8, 20
    K, s = _noise_plus_prior(B, N, g, negative=-1.0)
    b = torch.randn(B, N, generator=g, dtype=F64)
    matvec, _ = batched(K)
    out = SOLVERS[solver](matvec, b, tol=1e-12, maxiter=N, floor=lambda p: s * p)
    assert bool(out.truncated.all()) and not bool(out.converged.any())
    # the truncated solution lives where K behaves: |x| <= |b| / min(s) (a Krylov solution
    # in a subspace on which K >= S), and it still reduces the residual
    assert bool((out.x.norm(dim=1) <= b.norm(dim=1) / s.min(1).values).all())
    assert float(true_residual(K, out.x, b).max()) < 1.0
    # an element whose system is valid is not affected by its neighbours' truncation
    K_ok, s_ok = _noise_plus_prior(1, N, g, negative=0.5)
    K2, s2 = torch.cat([K[:1], K_ok]), torch.cat([s[:1], s_ok])
    b2 = b[:2]
    matvec2, _ = batched(K2)
    mixed = SOLVERS[solver](matvec2, b2, tol=1e-12, maxiter=200,
                            floor=lambda p: s2 * p)
    assert mixed.truncated.tolist() == [True, False]
    assert float(true_residual(K2[1:], mixed.x[1:], b2[1:]).max()) < 1e-10
