r"""Tests of the observation operators (`plausible.ops`) and of `plausible.Observation`.

All computations are float64; batches have 3 states; states are 1-D ``(N,)``, 2-D ``(H, W)``
or 2-D with a leading channel dimension ``(C, H, W)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import multivariate_normal

from plausible import Observation, ops

F64 = torch.float64
B = 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def _symmetric_lowpass(size: tuple[int, ...], cutoff: int) -> torch.Tensor:
    """A k-space mask keeping |k| <= cutoff per axis: symmetric under k -> -k."""
    masks = [torch.fft.fftfreq(n, 1 / n).abs() <= cutoff for n in size]
    out = masks[0]
    for m in masks[1:]:
        out = out[..., None] & m
    return out


def _kernel(*shape: int, g: torch.Generator) -> torch.Tensor:
    """A non-symmetric random kernel with entries exactly representable in float32."""
    k = torch.randint(1, 9, shape, generator=g).to(F64) / 8
    return k


def _operators(kind: str) -> list[tuple[str, ops.Operator, tuple[int, ...]]]:
    """(name, linear operator, state shape) for 1-D, 2-D and channel-2-D states."""
    g = _gen(42)
    if kind == "1d":
        N = 12
        S = (N,)
        return [
            ("identity", ops.Identity(), S),
            ("mask", ops.Mask(torch.rand(N, generator=g) > 0.4), S),
            ("mask-01", ops.Mask((torch.rand(N, generator=g) > 0.4).to(F64)), S),
            ("subsample3", ops.Subsample(3, ndim=1), S),
            ("subsample2-offset1", ops.Subsample(2, ndim=1, offset=1), S),
            ("coarsen3", ops.Coarsen(3, ndim=1), S),
            ("blur-circular", ops.Blur(_kernel(5, g=g)), S),
            ("blur-zeros", ops.Blur(_kernel(5, g=g), padding="zeros"), S),
            ("blur-gaussian", ops.Blur.gaussian(5, 1.2, ndim=1), S),
            ("fourier", ops.FourierMask(torch.rand(N, generator=g) > 0.5, ndim=1), S),
            ("matrix", ops.Matrix(_randn(5, N, g=g)), S),
            ("lambda-cumsum", ops.Lambda(lambda x: torch.cumsum(x, -1), linear=True), S),
            ("compose", ops.Compose(ops.Blur(_kernel(3, g=g)), ops.Subsample(2, ndim=1)), S),
        ]
    if kind == "2d":
        S = (8, 8)
    else:
        S = (2, 8, 8)
    H, W = S[-2:]
    D = math.prod(S)
    return [
        ("identity", ops.Identity(), S),
        ("mask", ops.Mask(torch.rand(*S, generator=g) > 0.4), S),
        ("mask-broadcast", ops.Mask(torch.rand(H, W, generator=g) > 0.4), S),
        ("subsample2", ops.Subsample(2), S),
        ("subsample-2x4-offset1", ops.Subsample((2, 4), offset=1), S),
        ("coarsen2", ops.Coarsen(2), S),
        ("coarsen4", ops.Coarsen(4), S),
        ("blur-circular", ops.Blur(_kernel(3, 5, g=g)), S),
        ("blur-zeros", ops.Blur(_kernel(5, 3, g=g), padding="zeros"), S),
        ("blur-gaussian", ops.Blur.gaussian(5, 1.0), S),
        ("fourier", ops.FourierMask(torch.rand(H, W, generator=g) > 0.5), S),
        ("fourier-full", ops.FourierMask(torch.ones(H, W, dtype=torch.bool)), S),
        ("matrix", ops.Matrix(_randn(10, D, g=g)), S),
        ("lambda-flip", ops.Lambda(lambda x: torch.flip(x, dims=(-1,)) * 2.0, linear=True), S),
        ("compose", ops.Compose(ops.Blur.gaussian(3, 1.0), ops.Coarsen(2), ops.Subsample(2)),
         S),
        ("compose-mask-matrix", ops.Compose(ops.Mask(torch.rand(*S, generator=g) > 0.5),
                                            ops.Matrix(_randn(6, D, g=g))), S),
    ]


CASES = [(kind, name) for kind in ("1d", "2d", "chw") for name, _, _ in _operators(kind)]


def _case(kind: str, name: str) -> tuple[ops.Operator, tuple[int, ...]]:
    for n, op, S in _operators(kind):
        if n == name:
            return op, S
    raise KeyError(name)


def _ids(case):
    return f"{case[0]}-{case[1]}"


# --------------------------------------------------------------------------- linear operators


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_adjoint_identity(case):
    op, S = _case(*case)
    g = _gen(1)
    x = _randn(B, *S, g=g)
    Ax = op(x)
    assert Ax.shape[0] == B and Ax.dtype == F64
    v = _randn(*Ax.shape, g=g)
    Atv = op.adjoint(v, x)
    assert Atv.shape == x.shape and Atv.dtype == F64
    lhs = (Ax * v).flatten(1).sum(1)
    rhs = (x * Atv).flatten(1).sum(1)
    scale = Ax.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1)
    assert ((lhs - rhs).abs() <= 1e-10 * scale).all(), (lhs, rhs)
    # the adjoint of a linear operator does not depend on where it is taken
    torch.testing.assert_close(op.adjoint(v, _randn(B, *S, g=g)), Atv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_linearity(case):
    op, S = _case(*case)
    assert op.linear
    g = _gen(2)
    x, z = _randn(B, *S, g=g), _randn(B, *S, g=g)
    a, b = 0.7, -2.3
    torch.testing.assert_close(op(a * x + b * z), a * op(x) + b * op(z), rtol=1e-12, atol=1e-12)
    assert torch.equal(op(torch.zeros(B, *S, dtype=F64)), torch.zeros_like(op(x)))
    # batch elements are independent
    torch.testing.assert_close(op(x[1:2])[0], op(x)[1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matrix_is_the_dense_operator(case):
    op, S = _case(*case)
    x = _randn(B, *S, g=_gen(3))
    Ax = op(x)
    M = op.matrix(S)
    D = math.prod(S)
    assert M.shape == (Ax[0].numel(), D) and M.dtype == F64
    torch.testing.assert_close(x.flatten(1) @ M.T, Ax.flatten(1), rtol=1e-12, atol=1e-12)
    # and its transpose is the adjoint
    v = _randn(*Ax.shape, g=_gen(4))
    torch.testing.assert_close(v.flatten(1) @ M, op.adjoint(v, x).flatten(1), rtol=1e-12,
                               atol=1e-12)
    assert op.out_shape(S) == tuple(Ax.shape[1:])


@pytest.mark.parametrize("S", [(12,), (8, 8), (2, 4, 8)])
def test_identity(S):
    x = _randn(B, *S)
    assert torch.equal(ops.Identity()(x), x)


def test_mask_zeros_unobserved_entries():
    m = torch.rand(6, 5) > 0.5
    x = _randn(B, 6, 5)
    y = ops.Mask(m)(x)
    assert torch.equal(y[:, m], x[:, m])
    assert torch.equal(y[:, ~m], torch.zeros_like(x[:, ~m]))
    # a mask of the trailing dimensions broadcasts over channels
    xc = _randn(B, 3, 6, 5)
    yc = ops.Mask(m)(xc)
    assert torch.equal(yc, xc * m)


@pytest.mark.parametrize("factor, offset", [(2, 0), (3, 0), (2, 1), (4, 3)])
def test_subsample_1d_picks_entries(factor, offset):
    N = 12
    x = _randn(B, N)
    y = ops.Subsample(factor, ndim=1, offset=offset)(x)
    idx = [i for i in range(N) if i >= offset and (i - offset) % factor == 0]
    assert y.shape == (B, len(idx))
    assert torch.equal(y, x[:, idx])


@pytest.mark.parametrize("factors, offset", [(2, 0), ((2, 3), 0), ((3, 2), 1)])
def test_subsample_2d_picks_entries(factors, offset):
    H, W = 8, 9
    fh, fw = (factors, factors) if isinstance(factors, int) else factors
    x = _randn(B, 2, H, W)
    y = ops.Subsample(factors, offset=offset)(x)
    rows = [i for i in range(H) if i >= offset and (i - offset) % fh == 0]
    cols = [j for j in range(W) if j >= offset and (j - offset) % fw == 0]
    assert y.shape == (B, 2, len(rows), len(cols))
    for a, i in enumerate(rows):
        for b, j in enumerate(cols):
            assert torch.equal(y[..., a, b], x[..., i, j])


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_coarsen_is_block_mean(factor):
    x = _randn(B, 2, 8, 8)
    y = ops.Coarsen(factor)(x)
    h = 8 // factor
    ref = x.reshape(B, 2, h, factor, h, factor).mean(dim=(3, 5))
    torch.testing.assert_close(y, ref, rtol=1e-14, atol=1e-14)
    x1 = _randn(B, 12)
    ref1 = x1.reshape(B, 12 // 3, 3).mean(-1)
    torch.testing.assert_close(ops.Coarsen(3, ndim=1)(x1), ref1, rtol=1e-14, atol=1e-14)
    x3 = _randn(B, 4, 4, 4)
    ref3 = x3.reshape(B, 2, 2, 2, 2, 2, 2).mean(dim=(2, 4, 6))
    torch.testing.assert_close(ops.Coarsen(2, ndim=3)(x3), ref3, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("padding", ["circular", "zeros"])
@pytest.mark.parametrize("kshape", [(5,), (3, 3), (5, 3)])
def test_blur_delta_kernel_is_identity(padding, kshape):
    k = torch.zeros(kshape, dtype=F64)
    k[tuple(s // 2 for s in kshape)] = 1.0
    x = _randn(B, 2, 8, 8) if len(kshape) == 2 else _randn(B, 12)
    assert torch.equal(ops.Blur(k, padding=padding)(x), x)


@pytest.mark.parametrize("ndim", [1, 2])
def test_blur_of_constant_is_constant(ndim):
    op = ops.Blur.gaussian(5, 1.3, ndim=ndim)
    assert math.isclose(float(op.kernel.sum()), 1.0, rel_tol=1e-6)
    assert (op.kernel > 0).all()
    S = (12,) if ndim == 1 else (2, 8, 8)
    c = torch.tensor([1.5, -2.0, 0.25], dtype=F64).reshape(B, *([1] * len(S)))
    x = c * torch.ones(B, *S, dtype=F64)
    # normalised (float32-stored) kernel: constant to float32 precision of its sum
    torch.testing.assert_close(op(x), x, rtol=1e-6, atol=0)
    # with zero padding the interior is still constant, the border loses mass
    opz = ops.Blur.gaussian(5, 1.3, ndim=ndim, padding="zeros")
    yz = opz(x)
    inner = (slice(None),) * (1 + len(S) - ndim) + (slice(2, -2),) * ndim
    torch.testing.assert_close(yz[inner], x[inner], rtol=1e-6, atol=0)
    corner = (slice(None),) * (1 + len(S) - ndim) + (0,) * ndim
    assert (yz[corner].abs() < x[corner].abs() * 0.9).all()


def _circular_convolution(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[i] = sum_j k[j] x[i - (j - c)] (true convolution, periodic), last k.dim() axes."""
    out = torch.zeros_like(x)
    if k.dim() == 1:
        c = k.shape[0] // 2
        for j in range(k.shape[0]):
            out = out + k[j] * torch.roll(x, shifts=j - c, dims=-1)
        return out
    c0, c1 = k.shape[0] // 2, k.shape[1] // 2
    for a in range(k.shape[0]):
        for b in range(k.shape[1]):
            out = out + k[a, b] * torch.roll(x, shifts=(a - c0, b - c1), dims=(-2, -1))
    return out


@pytest.mark.parametrize("kshape", [(5,), (3, 5)])
def test_blur_is_a_true_circular_convolution(kshape):
    """Flipped kernel (convolution, not correlation), periodic boundary. The kernel's entries
    are multiples of 1/8 so this test does not depend on the kernel's storage precision."""
    k = _kernel(*kshape, g=_gen(5))
    x = _randn(B, 2, 6, 7) if len(kshape) == 2 else _randn(B, 11)
    torch.testing.assert_close(ops.Blur(k)(x), _circular_convolution(x, k), rtol=1e-13,
                               atol=1e-13)


def test_blur_keeps_float64_kernel_precision():
    """A float64 kernel applied to float64 states is a float64 convolution (the kernel is not
    rounded to float32 on the way)."""
    k = torch.rand(5, 5, generator=_gen(6), dtype=F64) + 0.1
    k = k / k.sum()
    x = _randn(B, 8, 8)
    op = ops.Blur(k)
    torch.testing.assert_close(op(x), _circular_convolution(x, k), rtol=1e-12, atol=1e-13)
    # so a normalised float64 kernel preserves constants to float64 precision
    ones = torch.ones(1, 8, 8, dtype=F64)
    torch.testing.assert_close(op(ones), ones, rtol=1e-13, atol=0)


@pytest.mark.parametrize("S", [(16,), (8, 8), (2, 6, 8)])
def test_fourier_full_mask_is_orthonormal(S):
    ndim = 1 if len(S) == 1 else 2
    op = ops.FourierMask(torch.ones(S[-ndim:], dtype=torch.bool), ndim=ndim)
    x = _randn(B, *S)
    y = op(x)
    assert y.shape == (B, *S, 2)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-13,
                               atol=0)
    # the adjoint of the full orthonormal FFT is its inverse
    torch.testing.assert_close(op.adjoint(y, x), x, rtol=1e-12, atol=1e-12)
    # matches torch.fft with norm="ortho"
    ref = torch.view_as_real(torch.fft.fftn(x, dim=tuple(range(-ndim, 0)), norm="ortho"))
    torch.testing.assert_close(y, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("S, cutoff", [((16,), 3), ((8, 8), 2), ((2, 8, 6), 1)])
def test_fourier_adjoint_inverts_on_masked_frequencies(S, cutoff):
    ndim = 1 if len(S) == 1 else 2
    mask = _symmetric_lowpass(S[-ndim:], cutoff)
    assert 0 < int(mask.sum()) < mask.numel()
    op = ops.FourierMask(mask, ndim=ndim)
    x = _randn(B, *S)
    y = op(x)
    dims = tuple(range(-ndim, 0))
    # zero outside the mask
    assert torch.equal(y[:, ..., ~mask, :], torch.zeros_like(y[:, ..., ~mask, :]))
    # A^T y is the inverse FFT of the masked spectrum (the low-pass of x)
    lowpass = torch.fft.ifftn(torch.fft.fftn(x, dim=dims) * mask, dim=dims).real
    xt = op.adjoint(y, x)
    torch.testing.assert_close(xt, lowpass, rtol=1e-12, atol=1e-12)
    # A A^T is the identity on the masked measurements, A^T A an orthogonal projection
    torch.testing.assert_close(op(xt), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.adjoint(op(xt), x), xt, rtol=1e-12, atol=1e-12)


def test_compose_applies_left_to_right():
    g = _gen(7)
    m = torch.rand(8, 8, generator=g) > 0.5
    mask, blur = ops.Mask(m), ops.Blur(_kernel(3, 3, g=g))
    x = _randn(B, 8, 8)
    torch.testing.assert_close(ops.Compose(mask, blur)(x), blur(mask(x)), rtol=0, atol=0)
    torch.testing.assert_close(ops.Compose(blur, mask)(x), mask(blur(x)), rtol=0, atol=0)
    # they really do not commute
    assert (ops.Compose(mask, blur)(x) - ops.Compose(blur, mask)(x)).abs().max() > 1e-3
    # shape-changing chain
    c = ops.Compose(ops.Coarsen(2), ops.Subsample(2, offset=1))
    torch.testing.assert_close(c(x), x.reshape(B, 4, 2, 4, 2).mean((2, 4))[:, 1::2, 1::2],
                               rtol=1e-14, atol=1e-14)
    # adjoint of a composition is the reversed composition of adjoints
    cm = ops.Compose(ops.Coarsen(2), ops.Matrix(_randn(5, 16, g=g)))
    v = _randn(B, 5, g=g)
    inner = ops.Coarsen(2)
    expected = inner.adjoint(cm.ops[1].adjoint(v, inner(x)), x)
    torch.testing.assert_close(cm.adjoint(v, x), expected, rtol=1e-13, atol=1e-13)
    # linear iff all parts are
    assert c.linear
    assert not ops.Compose(ops.Identity(), ops.Lambda(torch.sin)).linear


def test_matrix_acts_on_flattened_states():
    M = _randn(4, 6)
    x = _randn(B, 2, 3)
    y = ops.Matrix(M)(x)
    assert y.shape == (B, 4)
    torch.testing.assert_close(y, torch.einsum("md,bd->bm", M, x.reshape(B, 6)), rtol=1e-14,
                               atol=1e-14)


@pytest.mark.parametrize("S", [(7,), (4, 5)])
def test_lambda_nonlinear_adjoint_is_jacobian_transpose(S):
    def f(x):
        s = x.flatten(1).sum(1).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.sin(x) * s + x**3

    op = ops.Lambda(f)
    assert not op.linear
    g = _gen(8)
    x = _randn(B, *S, g=g)
    v = _randn(B, *S, g=g)
    Atv = op.adjoint(v, x)
    for i in range(B):
        J = torch.autograd.functional.jacobian(lambda z: f(z[None])[0], x[i])
        J = J.reshape(math.prod(S), math.prod(S))
        torch.testing.assert_close(Atv[i].flatten(), J.T @ v[i].flatten(), rtol=1e-12,
                                   atol=1e-12)
    # depends on the linearisation point
    assert (op.adjoint(v, 2 * x) - Atv).abs().max() > 1e-3
    # the adjoint is not tracked by autograd of x and leaves x untouched
    xr = x.clone().requires_grad_()
    op.adjoint(v, xr)
    assert xr.grad is None


def test_operator_shape_errors():
    with pytest.raises(ValueError, match="expects states ending in that shape"):
        ops.Mask(torch.ones(4, 4, dtype=torch.bool))(_randn(B, 4, 5))
    with pytest.raises(ValueError, match="divisible"):
        ops.Coarsen(3)(_randn(B, 8, 8))
    with pytest.raises(ValueError, match="expects states of 6 entries"):
        ops.Matrix(_randn(2, 6))(_randn(B, 7))
    with pytest.raises(ValueError, match="FourierMask of size"):
        ops.FourierMask(torch.ones(4, 4))(_randn(B, 4, 5))
    with pytest.raises(ValueError, match="acts on the last 2 dimension"):
        ops.Subsample(2)(_randn(B))
    with pytest.raises(ValueError, match="boolean or 0/1"):
        ops.Mask(torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="odd sizes"):
        ops.Blur(torch.ones(4))
    with pytest.raises(ValueError, match="padding must be"):
        ops.Blur(torch.ones(3), padding="reflect")
    with pytest.raises(ValueError, match="positive factor"):
        ops.Subsample(0)
    with pytest.raises(TypeError, match="Operator instances"):
        ops.Compose()
    with pytest.raises(TypeError, match="callable"):
        ops.Lambda(3)


# --------------------------------------------------------------------------- Observation


def _logpdf(y, mean, cov) -> float:
    return float(multivariate_normal(mean.numpy(), cov.numpy()).logpdf(y.numpy()))


def _spd(M: int, g: torch.Generator) -> torch.Tensor:
    A = _randn(M, M, g=g)
    return A @ A.T / M + 0.3 * torch.eye(M, dtype=F64)


def test_log_likelihood_scalar_noise_identity():
    g = _gen(10)
    S = (3, 4)
    y = _randn(*S, g=g)
    obs = Observation(y, ops.Identity(), noise=0.3)
    obs.validate(S)
    x = _randn(B, *S, g=g)
    ll = obs.log_likelihood(x)
    assert ll.shape == (B,) and ll.dtype == F64
    for i in range(B):
        ref = _logpdf(y.flatten(), x[i].flatten(), 0.09 * torch.eye(12, dtype=F64))
        assert math.isclose(float(ll[i]), ref, rel_tol=1e-12, abs_tol=1e-10)


def test_log_likelihood_scalar_noise_subsample():
    g = _gen(11)
    S = (8, 8)
    op = ops.Subsample(2)
    y = _randn(4, 4, g=g)
    obs = Observation(y, op, noise=0.1)
    obs.validate(S)
    x = _randn(B, *S, g=g)
    ll = obs.log_likelihood(x)
    for i in range(B):
        ref = _logpdf(y.flatten(), op(x)[i].flatten(), 0.01 * torch.eye(16, dtype=F64))
        assert math.isclose(float(ll[i]), ref, rel_tol=1e-12, abs_tol=1e-10)


@pytest.mark.parametrize("noise_kind", ["scalar", "diag"])
def test_log_likelihood_mask_restricted_to_observed(noise_kind):
    g = _gen(12)
    S = (5, 6)
    m = torch.rand(*S, generator=g) > 0.4
    std = 0.2 if noise_kind == "scalar" else 0.1 + torch.rand(*S, generator=g, dtype=F64)
    y = _randn(*S, g=g)
    obs = Observation(y, ops.Mask(m), noise=std)
    obs.validate(S)
    assert torch.equal(obs.observed_entries(S), m)
    x = _randn(B, *S, g=g)
    ll = obs.log_likelihood(x)
    var = (torch.as_tensor(std, dtype=F64) ** 2).expand(S)[m]
    for i in range(B):
        ref = _logpdf(y[m], x[i][m], torch.diag(var))
        assert math.isclose(float(ll[i]), ref, rel_tol=1e-12, abs_tol=1e-10)


def test_log_likelihood_dense_noise_matrix():
    g = _gen(13)
    S, M = (4, 3), 7
    op = ops.Matrix(_randn(M, 12, g=g))
    cov = _spd(M, g)
    y = _randn(M, g=g)
    obs = Observation(y, op, noise=cov)
    assert obs.noise_kind == "dense"
    obs.validate(S)
    x = _randn(B, *S, g=g)
    ll = obs.log_likelihood(x)
    for i in range(B):
        ref = _logpdf(y, op(x)[i], cov)
        assert math.isclose(float(ll[i]), ref, rel_tol=1e-11, abs_tol=1e-10)
    # cov_y and whiten agree with the covariance
    v = _randn(B, M, g=g)
    torch.testing.assert_close(obs.cov_y(v), v @ cov.T, rtol=1e-13, atol=1e-13)
    z = obs.whiten(v)
    torch.testing.assert_close((z**2).sum(1), torch.einsum("bi,ij,bj->b", v,
                               torch.linalg.inv(cov), v), rtol=1e-11, atol=1e-12)


def test_log_likelihood_dense_noise_mask_is_the_observed_marginal():
    r"""With a dense noise covariance and a Mask, the likelihood is the density of the
    observed entries: N(y_o; x_o, \Sigma_oo) (the unobserved entries are ignored)."""
    g = _gen(14)
    S = (3, 3)
    m = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    cov = _spd(9, g)
    y = torch.where(m, _randn(*S, g=g), float("nan"))
    obs = Observation(y, ops.Mask(m), noise=cov)
    obs.validate(S)
    x = _randn(B, *S, g=g)
    ll = obs.log_likelihood(x)
    assert torch.isfinite(ll).all()
    idx = m.flatten()
    for i in range(B):
        ref = _logpdf(y.flatten()[idx], x[i].flatten()[idx], cov[idx][:, idx])
        assert math.isclose(float(ll[i]), ref, rel_tol=1e-11, abs_tol=1e-10)


def test_log_likelihood_fourier_mask():
    g = _gen(15)
    S = (6, 6)
    mask = _symmetric_lowpass(S, 1)
    op = ops.FourierMask(mask)
    y = torch.where(mask[..., None], _randn(*S, 2, g=g), float("nan"))
    obs = Observation(y, op, noise=0.05)
    obs.validate(S)
    observed = obs.observed_entries(S)
    assert torch.equal(observed, mask[..., None].expand(*S, 2))
    x = _randn(B, *S, g=g)
    ll = obs.log_likelihood(x)
    n = int(observed.sum())
    for i in range(B):
        ref = _logpdf(y[observed], op(x)[i][observed], 0.0025 * torch.eye(n, dtype=F64))
        assert math.isclose(float(ll[i]), ref, rel_tol=1e-12, abs_tol=1e-10)


def test_nan_outside_mask_is_ignored():
    g = _gen(16)
    S = (4, 5)
    m = torch.rand(*S, generator=g) > 0.5
    y0 = _randn(*S, g=g)
    y_nan = torch.where(m, y0, float("nan"))
    y_other = torch.where(m, y0, 1e6)
    obs_nan = Observation(y_nan, ops.Mask(m), noise=0.3)
    obs_other = Observation(y_other, ops.Mask(m), noise=0.3)
    obs_nan.validate(S)  # accepted
    obs_other.validate(S)
    x = _randn(B, *S, g=g)
    ll_nan, ll_other = obs_nan.log_likelihood(x), obs_other.log_likelihood(x)
    assert torch.isfinite(ll_nan).all()
    torch.testing.assert_close(ll_nan, ll_other, rtol=1e-14, atol=0)
    assert torch.isfinite(obs_nan.y_clean).all()
    assert torch.equal(obs_nan.y_clean[m], y0[m])


def test_nan_outside_a_composed_mask_is_ignored():
    """Entries of y that the operator never reaches are ignored whatever the operator (the
    documented rule: the Jacobian row is zero), not only for a bare Mask."""
    g = _gen(17)
    S = (4, 5)
    m = torch.rand(*S, generator=g) > 0.5
    y = torch.where(m, _randn(*S, g=g), float("nan"))
    obs = Observation(y, ops.Compose(ops.Identity(), ops.Mask(m)), noise=0.3)
    obs.validate(S)
    assert torch.equal(obs.observed_entries(S), m)
    x = _randn(B, *S, g=g)
    ref = Observation(y, ops.Mask(m), noise=0.3).log_likelihood(x)
    torch.testing.assert_close(obs.log_likelihood(x), ref, rtol=1e-14, atol=0)


def test_observed_entries_of_generic_operators_are_all():
    S = (8, 8)
    obs = Observation(torch.zeros(4, 4, dtype=F64), ops.Subsample(2), noise=1.0)
    assert obs.observed_entries(S).all()


def _simulate_many(x, A, noise, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([Observation.simulate(x, A, noise, generator=g) for _ in range(n)])


def _check_moments(ys: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, k: float = 5.0):
    """Empirical mean and covariance within k Monte-Carlo standard errors, entrywise."""
    n = ys.shape[0]
    ys = ys.flatten(1)
    mean, cov = mean.flatten(), cov
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert ((ys.mean(0) - mean).abs() <= k * se_mean).all()
    emp = torch.cov(ys.T)
    d = torch.diagonal(cov)
    se_cov = torch.sqrt((d[:, None] * d[None, :] + cov**2) / n)
    assert ((emp - cov).abs() <= k * se_cov).all(), (emp, cov)


def test_simulate_scalar_noise():
    x = _randn(2, 3, g=_gen(18))
    ys = _simulate_many(x, ops.Identity(), 0.5, 3000, 0)
    assert ys.shape == (3000, 2, 3) and ys.dtype == F64
    _check_moments(ys, x, 0.25 * torch.eye(6, dtype=F64))


def test_simulate_per_entry_noise():
    g = _gen(19)
    x = _randn(4, 4, g=g)
    std = 0.1 + torch.rand(2, 2, generator=g, dtype=F64)
    op = ops.Subsample(2, offset=1)
    ys = _simulate_many(x, op, std, 3000, 1)
    assert ys.shape == (3000, 2, 2)
    _check_moments(ys, x[1::2, 1::2], torch.diag(std.flatten() ** 2))


def test_simulate_dense_noise():
    g = _gen(20)
    x = _randn(3, 3, g=g)
    op = ops.Matrix(_randn(4, 9, g=g))
    cov = _spd(4, g)
    cov[0, 1] = cov[1, 0] = 0.5 * float(torch.sqrt(cov[0, 0] * cov[1, 1]))  # strong correlation
    ys = _simulate_many(x, op, cov, 3000, 2)
    assert ys.shape == (3000, 4)
    _check_moments(ys, op(x[None])[0], cov)
    # the correlation is really there
    emp = torch.corrcoef(ys.T)
    assert abs(float(emp[0, 1]) - 0.5) < 0.1


def test_simulate_is_reproducible_and_consistent_with_likelihood():
    g = _gen(21)
    x = _randn(4, 4, g=g)
    m = torch.rand(4, 4, generator=g) > 0.3
    y1 = Observation.simulate(x, ops.Mask(m), 0.2, generator=torch.Generator().manual_seed(5))
    y2 = Observation.simulate(x, ops.Mask(m), 0.2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2)
    obs = Observation(y1, ops.Mask(m), noise=0.2)
    obs.validate((4, 4))
    # the true state is far more likely than a perturbed one
    ll = obs.log_likelihood(torch.stack([x, x + 1.0]))
    assert float(ll[0]) > float(ll[1]) + 10


def test_observation_noise_kinds_and_variance():
    y = _randn(2, 3)
    assert Observation(y, noise=0.5).noise_kind == "scalar"
    std = torch.full((2, 3), 0.5, dtype=F64)
    o = Observation(y, noise=std)
    assert o.noise_kind == "diag"
    torch.testing.assert_close(o.variance(), torch.full((2, 3), 0.25, dtype=F64))
    cov = _spd(6, _gen(22))
    o = Observation(y, noise=cov)
    assert o.noise_kind == "dense"
    torch.testing.assert_close(o.variance(), torch.diagonal(cov).reshape(2, 3))
    # a callable is wrapped as a (non-linear) Lambda
    o = Observation(y, A=lambda x: x * 2)
    assert isinstance(o.A, ops.Lambda) and not o.A.linear
    # y is copied
    y2 = y.clone()
    o = Observation(y2)
    y2.zero_()
    assert torch.equal(o.y, y)
