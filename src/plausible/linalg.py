r"""Batched, matrix-free Krylov solvers for :math:`K u = b`.

Both solvers take a function ``matvec`` that applies :math:`K` to a batch of vectors of
shape ``(B, N)`` (one independent system per batch element), a right-hand side ``b`` of
shape ``(B, N)``, a relative tolerance (stop element ``i`` once
:math:`\|b_i - K u_i\| \le \mathrm{tol}\, \|b_i\|`) and a maximum number of iterations
(default ``N``). Vectors are kept and inner products accumulated in float64; an element
that has converged, broken down or has :math:`b_i = 0` is frozen, never divided by zero,
so the result is finite whatever ``maxiter`` is.

**Auxiliary outputs.** ``matvec`` may return a pair ``(K v, G v)`` where :math:`G` is any
other linear map (for MMPS, :math:`G v = V A^\top v`, a by-product of computing
:math:`K v`). The solver then also returns :math:`G u` as the same linear combination of
the :math:`G p_j` it has seen, at no extra cost: MMPS needs no final vector-Jacobian product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Solution", "cg", "gmres"]

MatVec = Callable[[Tensor], "Tensor | tuple[Tensor, Tensor]"]


@dataclass
class Solution:
    """Result of a Krylov solve.

    Attributes:
        x: The solution, shape ``(B, N)``, in ``b``'s dtype.
        aux: :math:`G x` when ``matvec`` returned pairs, else ``None``.
        iterations: Number of ``matvec`` calls made on the batch.
        residual: Relative residual norms :math:`\\|b - Kx\\| / \\|b\\|`, shape ``(B,)``
            (as tracked by the recurrence), float64.
        converged: Whether each element reached the tolerance, shape ``(B,)``.
        truncated: Whether each element's solve was stopped by the curvature test (only
            when a ``floor`` was given; else ``None``), shape ``(B,)``.
    """

    x: Tensor
    aux: Tensor | None
    iterations: int
    residual: Tensor
    converged: Tensor
    truncated: Tensor | None = None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.einsum("bn,bn->b", a, b)


def _split(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, tuple):
        return out[0].to(torch.float64), out[1]
    return out.to(torch.float64), None


Floor = Callable[[Tensor], Tensor]

# relative slack of the curvature tests, far above rounding, far below any real violation
_CURVATURE_SLACK = 1e-6


def _curvature_ok(
    floor: Floor | None, p: Tensor, pKp: Tensor, dtype: torch.dtype
) -> Tensor | None:
    r"""``p^T K p >= p^T N p (1 - slack)`` per batch element, or ``None`` without a floor."""
    if floor is None:
        return None
    bound = _dot(floor(p.to(dtype)).to(torch.float64), p)
    return pKp >= bound - _CURVATURE_SLACK * bound.abs()


def _check(b: Tensor, tol: float, maxiter: int | None) -> int:
    if not isinstance(b, Tensor) or b.dim() != 2 or not b.is_floating_point():
        raise ValueError(f"b must be a floating-point tensor of shape (B, N), got "
                         f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
    if not torch.isfinite(b).all():
        raise ValueError("b must be finite")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    if maxiter is None:
        return b.shape[1]
    if not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer or None, got {maxiter!r}")
    return maxiter


def _start(
    matvec: MatVec, b: Tensor, x0: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """(x, residual, aux of x, matvecs used) of the starting point, in float64."""
    f64 = torch.float64
    if x0 is None:
        return torch.zeros_like(b, dtype=f64), b.to(f64), None, 0
    if x0.shape != b.shape:
        raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}")
    Kx, Gx = _split(matvec(x0.to(b.dtype)))
    return x0.to(f64), b.to(f64) - Kx, (Gx.to(f64) if Gx is not None else None), 1


def cg(
    matvec: MatVec,
    b: Tensor,
    tol: float = 1e-6,
    maxiter: int | None = None,
    x0: Tensor | None = None,
    floor: Floor | None = None,
) -> Solution:
    r"""Conjugate gradient for symmetric positive-definite :math:`K`.

    Arguments:
        matvec: :math:`v \mapsto K v` (or :math:`(K v, G v)`), on ``(B, N)`` tensors.
        b: Right-hand side, shape ``(B, N)``.
        tol: Relative residual tolerance.
        maxiter: Maximum number of iterations (default ``N``).
        x0: Initial guess ``(B, N)`` (default zero); costs one more ``matvec``, counted in
            ``iterations`` but not against ``maxiter``.
        floor: Optional :math:`v \mapsto N v` for a known symmetric :math:`N` with
            :math:`K - N \succeq 0`, e.g. :math:`N = \Sigma_y` for :math:`K = \Sigma_y + A V
            A^\top` with :math:`V \succeq 0`. An element whose search direction ``p`` has
            :math:`p^\top K p < p^\top N p` (a matrix that is not what it should be, such as
            a learned Tweedie covariance with negative directions) stops before that step,
            like truncated CG (Steihaug) stops at negative curvature;
            :attr:`Solution.truncated` tells which.

    Returns:
        A :class:`Solution`.
    """
    maxiter = _check(b, tol, maxiter)
    f64 = torch.float64
    b64 = b.to(f64)
    bnorm = _dot(b64, b64).sqrt()
    x, r, aux, iterations = _start(matvec, b, x0)
    p = r.clone()
    rr = _dot(r, r)
    active = rr.sqrt() > tol * bnorm
    active &= bnorm > 0
    truncated = torch.zeros_like(active)
    for _ in range(maxiter):
        if not bool(active.any()):
            break
        Kp, Gp = _split(matvec(p.to(b.dtype)))
        iterations += 1
        pKp = _dot(p, Kp)
        ok = active & (pKp > 0) & torch.isfinite(pKp)
        bounded = _curvature_ok(floor, p, pKp, b.dtype)
        if bounded is not None:
            truncated |= active & ~bounded
            ok &= bounded
        step = torch.where(ok, rr / torch.where(ok, pKp, 1.0), 0.0)
        x = x + step[:, None] * p
        if Gp is not None:
            Gp = Gp.to(f64)
            term = step.reshape(-1, *([1] * (Gp.dim() - 1))) * Gp
            aux = term if aux is None else aux + term
        r = torch.where(ok[:, None], r - step[:, None] * Kp, r)
        rr_new = _dot(r, r)
        beta = torch.where(ok, rr_new / torch.where(ok, rr, 1.0), 0.0)
        p = r + beta[:, None] * p
        rr = rr_new
        active = ok & (rr.sqrt() > tol * bnorm)
    residual = rr.sqrt() / torch.where(bnorm > 0, bnorm, 1.0)
    return Solution(
        x=x.to(b.dtype),
        aux=aux,
        iterations=iterations,
        residual=residual,
        converged=residual <= tol,
        truncated=truncated if floor is not None else None,
    )


def gmres(
    matvec: MatVec,
    b: Tensor,
    tol: float = 1e-6,
    maxiter: int | None = None,
    restart: int | None = None,
    x0: Tensor | None = None,
    floor: Floor | None = None,
) -> Solution:
    r"""Restarted GMRES (Arnoldi with classical Gram-Schmidt applied twice, Givens
    rotations) for any non-singular :math:`K` (a learned Tweedie Jacobian is not exactly
    symmetric).

    Arguments:
        matvec: :math:`v \mapsto K v` (or :math:`(K v, G v)`), on ``(B, N)`` tensors.
        b: Right-hand side, shape ``(B, N)``.
        tol: Relative residual tolerance.
        maxiter: Maximum total number of ``matvec`` calls on Krylov vectors (default ``N``).
        restart: Krylov subspace size before a restart (default 32, which bounds the memory
            to 32 Krylov vectors and 32 auxiliary outputs). Each restart costs one extra
            ``matvec`` for the new residual.
        x0: Initial guess ``(B, N)`` (default zero); costs one more ``matvec``, counted in
            ``iterations`` but not against ``maxiter``.
        floor: Optional :math:`v \mapsto N v` with :math:`K - N \succeq 0` (see :func:`cg`).
            After each iteration the projection :math:`V_k^\top (K - N) V_k` (the
            Hessenberg matrix minus :math:`V_k^\top N V_k`) must have a positive
            semi-definite symmetric part; an element where it does not keeps the solution
            of the previous Krylov space and stops (:attr:`Solution.truncated`).

    Returns:
        A :class:`Solution`.
    """
    maxiter = _check(b, tol, maxiter)
    f64 = torch.float64
    B = b.shape[0]
    truncated = torch.zeros(B, dtype=torch.bool, device=b.device)
    b64 = b.to(f64)
    bnorm = b64.norm(dim=1)
    x, r, aux, iterations = _start(matvec, b, x0)
    rnorm = r.norm(dim=1)
    start_cost = iterations  # the matvec of x0 does not count against maxiter
    if restart is None:
        restart = 32
    m_max = max(1, min(restart, maxiter))
    scale = torch.where(bnorm > 0, bnorm, 1.0)
    def unfinished() -> Tensor:
        return (rnorm > tol * bnorm) & (bnorm > 0) & ~truncated

    while iterations - start_cost < maxiter and bool(unfinished().any()):
        if iterations > start_cost:  # restart: fresh residual
            Kx, _ = _split(matvec(x.to(b.dtype)))
            iterations += 1
            r = b64 - Kx
            rnorm = r.norm(dim=1)
            if iterations - start_cost >= maxiter or not bool(unfinished().any()):
                break
        m = min(m_max, maxiter - (iterations - start_cost))
        active = unfinished()
        V = torch.empty(m + 1, B, b.shape[1], dtype=f64, device=b.device)
        V[0] = r / torch.where(rnorm > 0, rnorm, 1.0)[:, None]
        G: list[Tensor] = []
        R = torch.zeros(B, m, m, dtype=f64, device=b.device)
        g = torch.zeros(B, m + 1, dtype=f64, device=b.device)
        g[:, 0] = rnorm
        # the product of the Givens rotations so far, applied to each new column by one
        # batched product (instead of a Python loop over the previous rotations)
        Qt = torch.eye(m + 1, dtype=f64, device=b.device).expand(B, m + 1, m + 1).clone()
        if floor is not None:  # the projections of K (unrotated) and N on the Krylov basis
            H = torch.zeros(B, m + 1, m, dtype=f64, device=b.device)
            S = torch.zeros(B, m, m, dtype=f64, device=b.device)
        k = 0
        for j in range(m):
            w, Gv = _split(matvec(V[j].to(b.dtype)))
            iterations += 1
            k = j + 1
            if Gv is not None:
                G.append(Gv.to(f64))
            # classical Gram-Schmidt, twice (CGS2): two batched products per iteration
            basis = V[: j + 1]
            coef = torch.einsum("kbn,bn->bk", basis, w)
            w = w - torch.einsum("bk,kbn->bn", coef, basis)
            again = torch.einsum("kbn,bn->bk", basis, w)
            w = w - torch.einsum("bk,kbn->bn", again, basis)
            h = torch.empty(B, j + 2, dtype=f64, device=b.device)
            h[:, : j + 1] = coef + again
            h[:, j + 1] = w.norm(dim=1)
            V[j + 1] = w / torch.where(h[:, j + 1] > 0, h[:, j + 1], 1.0)[:, None]
            if floor is not None:
                # V_k^T (K - N) V_k must be PSD (symmetric part) in exact arithmetic
                Nv = floor(V[j].to(b.dtype)).to(f64)
                S[:, : j + 1, j] = torch.einsum("kbn,bn->bk", V[: j + 1], Nv)
                S[:, j, : j + 1] = S[:, : j + 1, j].clone()
                H[:, : j + 2, j] = h  # the column with its subdiagonal entry
                P = H[:, : j + 1, : j + 1] - S[:, : j + 1, : j + 1]
                low = torch.linalg.eigvalsh((P + P.transpose(1, 2)) / 2)[:, 0]
                size = torch.diagonal(S[:, : j + 1, : j + 1], dim1=1, dim2=2).abs().amax(1)
                bounded = low >= -_CURVATURE_SLACK * size
                truncated |= active & ~bounded
                active = active & bounded
            if j > 0:  # previous rotations
                h = torch.einsum("bik,bk->bi", Qt[:, : j + 2, : j + 2], h)
            denom = torch.sqrt(h[:, j] ** 2 + h[:, j + 1] ** 2)
            safe = denom > 0
            c = torch.where(safe, h[:, j] / torch.where(safe, denom, 1.0), 1.0)
            s = torch.where(safe, h[:, j + 1] / torch.where(safe, denom, 1.0), 0.0)
            q_j, q_j1 = Qt[:, j, : j + 2].clone(), Qt[:, j + 1, : j + 2].clone()
            Qt[:, j, : j + 2] = c[:, None] * q_j + s[:, None] * q_j1
            Qt[:, j + 1, : j + 2] = -s[:, None] * q_j + c[:, None] * q_j1
            h[:, j] = c * h[:, j] + s * h[:, j + 1]
            h[:, j + 1] = 0.0
            g_j = g[:, j].clone()
            # frozen (inactive or degenerate) elements: identity column, zero coefficient
            keep = active & safe
            col = torch.where(keep[:, None], h[:, : j + 1], 0.0)
            col[:, j] = torch.where(keep, h[:, j], 1.0)
            R[:, : j + 1, j] = col
            g[:, j] = torch.where(keep, c * g_j, 0.0)
            g[:, j + 1] = torch.where(keep, -s * g_j, g_j)
            res = g[:, j + 1].abs()
            rnorm = torch.where(keep, res, rnorm)
            active = keep & (res > tol * bnorm)
            if not bool(active.any()):
                break
        y = torch.linalg.solve_triangular(R[:, :k, :k], g[:, :k, None], upper=True)[..., 0]
        y = torch.where(torch.isfinite(y), y, 0.0)
        x = x + torch.einsum("bk,kbn->bn", y, V[:k])
        if G:
            Gs = torch.stack(G)  # (k, B, ...)
            term = torch.einsum("bk,kb...->b...", y, Gs)
            aux = term if aux is None else aux + term
    residual = rnorm / scale
    return Solution(
        x=x.to(b.dtype),
        aux=aux,
        iterations=iterations,
        residual=residual,
        converged=residual <= tol,
        truncated=truncated if floor is not None else None,
    )
