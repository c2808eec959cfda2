r"""Observation models :math:`y = A(x) + \epsilon`, :math:`\epsilon \sim \mathcal{N}(0, \Sigma_y)`.

An :class:`Operator` maps a batch of states ``(B, *S)`` to a batch of observations
``(B, *S_y)`` that keep their natural shape (a masked image stays an image, a coarsened field
stays a field). Operators are differentiable ``nn.Module``s; their adjoint is the
vector-Jacobian product (:meth:`Operator.adjoint`), and a non-linear operator
(:class:`Lambda`) is linearised where it is applied.

The operators are collected in the namespace ``plausible.ops``: :class:`Identity`,
:class:`Mask`, :class:`Subsample`, :class:`Coarsen`, :class:`Blur`, :class:`FourierMask`,
:class:`Matrix`, :class:`Lambda`, :class:`Compose`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Operator",
    "Identity",
    "Mask",
    "Subsample",
    "Coarsen",
    "Blur",
    "FourierMask",
    "Matrix",
    "Lambda",
    "Compose",
    "Observation",
]


class Operator(nn.Module):
    """Base class of observation operators :math:`x \\mapsto A(x)` on batches ``(B, *S)``.

    Attributes:
        linear: Whether the operator is linear (then its Jacobian is the same everywhere).
    """

    linear: bool = True

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def adjoint(self, v: Tensor, x: Tensor) -> Tensor:
        r"""Adjoint (transposed Jacobian at ``x``) applied to ``v``: :math:`J_A(x)^\top v`.

        ``x`` has shape ``(B, *S)`` and ``v`` the shape of ``A(x)``.
        """
        with torch.enable_grad():
            _, vjp = torch.func.vjp(self, x.detach())
            return vjp(v)[0]

    def out_shape(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> tuple:
        """Shape of one observation for states of shape ``shape`` (evaluated on zeros)."""
        p = next(self.buffers(), None)
        device = p.device if p is not None else None
        x = torch.zeros(1, *shape, dtype=dtype, device=device)
        with torch.no_grad():
            return tuple(self(x).shape[1:])

    def matrix(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        """The Jacobian at zero as a dense ``(M, D)`` matrix on flattened states (for tests and
        small problems; the exact matrix of a linear operator)."""
        D = math.prod(shape)
        p = next(self.buffers(), None)
        device = p.device if p is not None else None
        eye = torch.eye(D, dtype=dtype, device=device).reshape(D, *shape)
        self_ = self.to(dtype) if any(b.is_floating_point() for b in self.buffers()) else self
        with torch.no_grad():
            jac = torch.func.jacfwd(lambda x: self_(x[None])[0])(torch.zeros(*shape, dtype=dtype,
                                                                               device=device))
        del eye
        return jac.reshape(-1, D)


def _spatial(x: Tensor, ndim: int, name: str) -> None:
    if x.dim() < ndim + 1:
        raise ValueError(
            f"{name} acts on the last {ndim} dimension(s) of a batch (B, ..., "
            f"{', '.join(['N'] * ndim)}), got a tensor of shape {tuple(x.shape)}"
        )


class Identity(Operator):
    """:math:`A(x) = x`."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Mask(Operator):
    r"""Masking :math:`A(x) = m \odot x` with a boolean (or 0/1) mask ``m`` of the state shape
    (or broadcastable to it from the right).

    The observation keeps the state's shape with zeros where ``m`` is false; entries of ``y``
    outside the mask are ignored (they may be NaN, a natural way to mark missing values).
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("Mask expects a boolean or 0/1 mask")
            mask = mask.bool()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[x.dim() - self.mask.dim():]) != tuple(self.mask.shape):
            raise ValueError(
                f"Mask of shape {tuple(self.mask.shape)} expects states ending in that shape, "
                f"got {tuple(x.shape)}"
            )
        return x * self.mask.to(x.dtype)


class Subsample(Operator):
    """Keeps every ``factor``-th entry along the last ``ndim`` dimensions:
    ``x[..., ::f, ::f]`` (for ``ndim=2``), starting at ``offset``."""

    def __init__(self, factor: int | Sequence[int], ndim: int = 2, offset: int = 0) -> None:
        super().__init__()
        factors = (factor,) * ndim if isinstance(factor, int) else tuple(factor)
        if len(factors) != ndim or any(f < 1 for f in factors):
            raise ValueError(f"Subsample expects {ndim} positive factor(s), got {factor!r}")
        self.factors, self.ndim, self.offset = factors, ndim, int(offset)

    def forward(self, x: Tensor) -> Tensor:
        _spatial(x, self.ndim, "Subsample")
        index = (Ellipsis,) + tuple(slice(self.offset, None, f) for f in self.factors)
        return x[index]


class Coarsen(Operator):
    """Average pooling by ``factor`` over the last ``ndim`` (1, 2 or 3) dimensions."""

    def __init__(self, factor: int, ndim: int = 2) -> None:
        super().__init__()
        if ndim not in (1, 2, 3) or factor < 1:
            raise ValueError(f"Coarsen expects ndim in (1, 2, 3) and factor >= 1, got "
                             f"{ndim}, {factor}")
        self.factor, self.ndim = int(factor), ndim

    def forward(self, x: Tensor) -> Tensor:
        _spatial(x, self.ndim, "Coarsen")
        size = x.shape[-self.ndim:]
        if any(s % self.factor for s in size):
            raise ValueError(f"Coarsen by {self.factor} needs sizes divisible by it, got {size}")
        lead = x.shape[: -self.ndim]
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.ndim - 1]
        y = pool(x.reshape(-1, 1, *size), self.factor)
        return y.reshape(*lead, *y.shape[-self.ndim:])


class Blur(Operator):
    """Convolution of each channel with a fixed kernel over the last ``kernel.dim()``
    (1 or 2) dimensions, with ``"circular"`` or ``"zeros"`` padding (output keeps the size;
    odd kernel sizes)."""

    def __init__(self, kernel: Tensor, padding: str = "circular") -> None:
        super().__init__()
        kernel = torch.as_tensor(kernel)
        if kernel.dim() not in (1, 2) or any(s % 2 == 0 for s in kernel.shape):
            raise ValueError(f"Blur expects a 1-D or 2-D kernel of odd sizes, got "
                             f"{tuple(kernel.shape)}")
        if padding not in ("circular", "zeros"):
            raise ValueError(f"padding must be 'circular' or 'zeros', got {padding!r}")
        if not kernel.is_floating_point():
            kernel = kernel.to(torch.get_default_dtype())
        self.register_buffer("kernel", kernel)
        self.padding = padding

    @staticmethod
    def gaussian(size: int, std: float, ndim: int = 2, padding: str = "circular") -> Blur:
        """A normalised Gaussian blur of odd ``size`` and standard deviation ``std`` (pixels)."""
        r = torch.arange(size, dtype=torch.float64) - size // 2
        k = torch.exp(-0.5 * (r / std) ** 2)
        k = k / k.sum()
        return Blur(k if ndim == 1 else k[:, None] * k[None, :], padding)

    def forward(self, x: Tensor) -> Tensor:
        nd = self.kernel.dim()
        _spatial(x, nd, "Blur")
        size, lead = x.shape[-nd:], x.shape[:-nd]
        h = x.reshape(-1, 1, *size)
        pads = [s // 2 for s in reversed(self.kernel.shape) for _ in range(2)]
        if self.padding == "circular":
            h = F.pad(h, pads, mode="circular")
        else:
            h = F.pad(h, pads)
        conv = F.conv1d if nd == 1 else F.conv2d
        # flip: true convolution rather than cross-correlation
        k = torch.flip(self.kernel.to(x.dtype), dims=list(range(nd)))[None, None]
        return conv(h, k).reshape(*lead, *size)


class FourierMask(Operator):
    r"""Sub-sampled Fourier measurements (accelerated MRI):
    :math:`A(x) = m \odot \mathcal{F}(x)` with the orthonormal FFT over the last ``ndim``
    dimensions and a boolean k-space mask ``m`` of that size.

    The observation is real: shape ``(..., *size, 2)`` holding (real, imaginary) parts, zero
    outside the mask; noise is per real component.
    """

    def __init__(self, mask: Tensor, ndim: int = 2) -> None:
        super().__init__()
        mask = torch.as_tensor(mask).bool()
        if mask.dim() != ndim:
            raise ValueError(f"FourierMask expects a {ndim}-D mask, got {tuple(mask.shape)}")
        self.register_buffer("mask", mask)
        self.ndim = ndim

    def forward(self, x: Tensor) -> Tensor:
        _spatial(x, self.ndim, "FourierMask")
        if tuple(x.shape[-self.ndim:]) != tuple(self.mask.shape):
            raise ValueError(f"FourierMask of size {tuple(self.mask.shape)} got states of shape "
                             f"{tuple(x.shape)}")
        k = torch.fft.fftn(x, dim=tuple(range(-self.ndim, 0)), norm="ortho")
        k = torch.view_as_real(k)
        return k * self.mask[..., None].to(k.dtype)


class Matrix(Operator):
    """A dense linear map :math:`A(x) = M \\operatorname{vec}(x)` with ``M`` of shape
    ``(M, D)`` acting on flattened states; the observation has shape ``(M,)``."""

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        matrix = torch.as_tensor(matrix)
        if matrix.dim() != 2 or not matrix.is_floating_point():
            raise ValueError(f"Matrix expects a floating-point (M, D) matrix, got "
                             f"{tuple(matrix.shape)} of dtype {matrix.dtype}")
        self.register_buffer("weight", matrix)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"Matrix of shape {tuple(self.weight.shape)} expects states of "
                             f"{self.weight.shape[1]} entries, got {x.shape[1]}")
        return x @ self.weight.to(x.dtype).T


class Lambda(Operator):
    """Any differentiable callable ``f`` on batches ``(B, *S) -> (B, *S_y)``, treated as
    non-linear (linearised by JVP/VJP where it is applied) unless ``linear=True``."""

    def __init__(self, f: Callable[[Tensor], Tensor], linear: bool = False) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"Lambda expects a callable, got {type(f).__name__}")
        self.f = f
        self.linear = bool(linear)

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)


class Compose(Operator):
    """Operators applied in the given order: ``Compose(a, b)(x) = b(a(x))``."""

    def __init__(self, *ops: Operator) -> None:
        super().__init__()
        if not ops or not all(isinstance(op, Operator) for op in ops):
            raise TypeError("Compose expects one or more Operator instances")
        self.ops = nn.ModuleList(ops)
        self.linear = all(op.linear for op in ops)

    def forward(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op(x)
        return x


class Observation(nn.Module):
    r"""A noisy observation :math:`y = A(x) + \epsilon`, :math:`\epsilon \sim
    \mathcal{N}(0, \Sigma_y)`.

    Arguments:
        y: The observation, of its natural shape ``S_y`` (one observation shared by all
            samples).
        A: The operator (an :class:`Operator`, or any differentiable callable, wrapped in
            :class:`Lambda`). Default :class:`Identity`.
        noise: The noise: a positive scalar standard deviation; a tensor of standard
            deviations of the shape of ``y`` (per entry); or a ``(M, M)`` covariance over the
            ``M = y.numel()`` flattened entries (symmetric positive-definite).

    Entries of ``y`` that the operator never reaches (outside a :class:`Mask` or
    :class:`FourierMask`) are ignored and may be NaN; any other NaN or infinity is an error.
    The check of ``y``'s shape against the operator happens when a posterior is built, since
    only the prior knows the state shape (:meth:`validate`).
    """

    def __init__(
        self, y: Tensor, A: Operator | Callable[[Tensor], Tensor] | None = None,
        noise: float | Tensor = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor, got {type(y).__name__}")
        if A is None:
            A = Identity()
        elif not isinstance(A, Operator):
            if not callable(A):
                raise TypeError(f"A must be an Operator or a callable, got {type(A).__name__}")
            A = Lambda(A)
        self.A = A
        self.register_buffer("y", y.clone())
        noise = torch.as_tensor(noise, dtype=y.dtype if noise is not None else None)
        M = y.numel()
        if noise.dim() == 0:
            self.noise_kind = "scalar"
        elif tuple(noise.shape) == tuple(y.shape):
            self.noise_kind = "diag"
        elif noise.shape == (M, M):
            self.noise_kind = "dense"
        else:
            raise ValueError(
                f"noise must be a scalar std, a tensor of stds of y's shape {tuple(y.shape)}, "
                f"or a ({M}, {M}) covariance; got shape {tuple(noise.shape)}"
            )
        if not torch.isfinite(noise).all():
            raise ValueError("noise must be finite (got NaN or infinity)")
        if self.noise_kind == "dense":
            if not torch.allclose(noise, noise.T, rtol=1e-5, atol=1e-8):
                raise ValueError("a noise covariance must be symmetric")
            L, info = torch.linalg.cholesky_ex(noise.to(torch.float64))
            if int(info) != 0:
                raise ValueError("a noise covariance must be positive definite")
            self.register_buffer("noise", noise)
            self.register_buffer("_chol", L.to(y.dtype))
        else:
            if not (noise > 0).all():
                raise ValueError(f"noise standard deviations must be positive, got min "
                                 f"{float(noise.min()):.3g}")
            self.register_buffer("noise", noise)
        self._observed: Tensor | None = None
        self._observed_for: tuple[int, ...] | None = None
        self._chol_observed: Tensor | None = None

    def validate(self, shape: Sequence[int]) -> None:
        """Checks ``y`` against ``A`` applied to states of shape ``shape``, that the operator is
        differentiable, and that ``y`` is finite where it is observed.

        Raises:
            ValueError: On a shape mismatch or NaN/inf at observed entries.
            TypeError: If the operator is not differentiable.
        """
        x = torch.zeros(1, *shape, dtype=self.y.dtype, device=self.y.device, requires_grad=True)
        with torch.enable_grad():
            try:
                out = self.A(x)
            except Exception as error:  # noqa: BLE001 - report what the operator expected
                raise ValueError(f"the operator failed on states of shape {tuple(shape)}: "
                                 f"{error}") from error
        if not isinstance(out, Tensor):
            raise TypeError(f"the operator must return a tensor, got {type(out).__name__}")
        if tuple(out.shape[1:]) != tuple(self.y.shape):
            raise ValueError(
                f"y has shape {tuple(self.y.shape)} but A(x) has shape {tuple(out.shape[1:])} "
                f"for states of shape {tuple(shape)}"
            )
        if not out.requires_grad:
            raise TypeError("the operator is not differentiable (its output does not depend on "
                            "x through autograd); wrap a differentiable torch function")
        x = torch.randn(1, *shape, dtype=self.y.dtype, device=self.y.device)
        with torch.enable_grad():
            jvp = torch.func.jvp(self.A, (x,), (torch.randn_like(x),))[1]
        if not bool((jvp != 0).any()):
            raise TypeError("the operator's Jacobian is zero: y does not depend on x (a "
                            "piecewise-constant or non-differentiable operator, or an empty mask)")
        observed = self.observed_entries(shape)
        if not torch.isfinite(self.y[observed]).all():
            raise ValueError("y contains NaN or infinity at observed entries")

    def observed_entries(self, shape: Sequence[int]) -> Tensor:
        """Boolean tensor of y's shape: the entries that the operator reaches. For a linear
        operator, the entries whose Jacobian row is non-zero (one JVP with a random tangent;
        outside a :class:`Mask`, even inside a :class:`Compose`, nothing is observed); a
        non-linear operator observes every entry. ``shape`` is the state shape."""
        shape = tuple(shape)
        if self._observed is None or self._observed_for != shape:
            if isinstance(self.A, Mask):
                observed = self.A.mask.expand(self.y.shape)
            elif isinstance(self.A, FourierMask):
                observed = self.A.mask[..., None].expand(self.y.shape)
            elif self.A.linear:
                x = torch.zeros(1, *shape, dtype=self.y.dtype, device=self.y.device)
                v = torch.randn(x.shape, dtype=self.y.dtype, device=self.y.device,
                                generator=torch.Generator(self.y.device).manual_seed(0))
                with torch.enable_grad():
                    observed = torch.func.jvp(self.A, (x,), (v,))[1][0] != 0
            else:
                observed = torch.ones(self.y.shape, dtype=torch.bool, device=self.y.device)
            self._observed = observed.reshape(self.y.shape).clone()
            self._observed_for = shape
            if self.noise_kind == "dense":
                o = self._observed.flatten()
                self._chol_observed = torch.linalg.cholesky(
                    self.noise.to(torch.float64)[o][:, o]).to(self.y.dtype)
        return self._observed

    @property
    def y_clean(self) -> Tensor:
        """``y`` with the ignored entries (outside the operator's reach) set to zero."""
        return torch.where(torch.isfinite(self.y), self.y, torch.zeros_like(self.y)) \
            if self._observed is None else torch.where(self._observed, self.y, 0.0)

    def cov_y(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma_y v` for ``v`` of shape ``(B, *S_y)``."""
        if self.noise_kind == "dense":
            flat = v.flatten(1) @ self.noise.to(v.dtype).T
            return flat.reshape(v.shape)
        return self.noise.to(v.dtype) ** 2 * v

    def variance(self) -> Tensor:
        """Per-entry noise variances, shape of y (the diagonal of :math:`\\Sigma_y`)."""
        if self.noise_kind == "dense":
            return torch.diagonal(self.noise).reshape(self.y.shape)
        return (self.noise**2).expand(self.y.shape)

    def whiten(self, r: Tensor) -> Tensor:
        r""":math:`L_o^{-1} r_o` on the observed entries :math:`o` (zero elsewhere), with
        :math:`\Sigma_{y,oo} = L_o L_o^\top`, for ``r`` ``(B, *S_y)``: so that
        :math:`\|\cdot\|^2 = r_o^\top \Sigma_{y,oo}^{-1} r_o`. Call after
        :meth:`observed_entries` (all entries count as observed before)."""
        if self.noise_kind == "dense":
            if self._chol_observed is None:
                o = torch.ones(self.y.numel(), dtype=torch.bool, device=r.device)
                L = self._chol
            else:
                o, L = self._observed.flatten(), self._chol_observed
            flat = r.flatten(1)
            z = torch.linalg.solve_triangular(L.to(r.dtype), flat[:, o].T, upper=False)
            out = torch.zeros_like(flat)
            out[:, o] = z.T
            return out.reshape(r.shape)
        z = r / self.noise.to(r.dtype)
        return z if self._observed is None else torch.where(self._observed, z, 0.0)

    def log_likelihood(self, x: Tensor) -> Tensor:
        r""":math:`\log \mathcal{N}(y_o; A(x)_o, \Sigma_{y,oo})` over the observed entries
        :math:`o`, shape ``(B,)``."""
        observed = self.observed_entries(x.shape[1:])
        r = torch.where(observed, self.y_clean.to(x.dtype) - self.A(x), 0.0)
        z = self.whiten(r)
        M = int(observed.sum())
        if self.noise_kind == "dense":
            logdet = 2 * torch.log(torch.diagonal(self._chol_observed)).sum()
        else:
            logdet = torch.log(self.variance()[observed]).sum()
        return -0.5 * (z.flatten(1).square().sum(1) + logdet + M * math.log(2 * math.pi))

    def extra_repr(self) -> str:
        return f"y: {tuple(self.y.shape)}, noise: {self.noise_kind}"

    @staticmethod
    def simulate(
        x: Tensor, A: Operator, noise: float | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draws :math:`y = A(x) + \\epsilon` for one state ``x`` of shape ``S`` (not batched)."""
        y = A(x[None])[0]
        noise = torch.as_tensor(noise, dtype=y.dtype)
        z = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        if noise.dim() == 2 and noise.shape[0] == y.numel() and noise.shape != y.shape:
            L = torch.linalg.cholesky(noise)
            return y + (L @ z.flatten()).reshape(y.shape)
        return y + noise * z

