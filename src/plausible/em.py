r"""Empirical Bayes: learn a prior from noisy observations only, by expectation-maximisation.

Given observations :math:`y_i = A_i x_i + \epsilon_i`, :math:`\epsilon_i \sim \mathcal{N}(0,
\Sigma_i)`, :math:`i = 1..N`, each with its own operator :math:`A_i`, empirical Bayes looks for
the prior :math:`q_\theta(x)` whose evidence :math:`\sum_i \log q_\theta(y_i)`,
:math:`q_\theta(y) = \int p(y \mid x) q_\theta(x) dx`, is largest. EM (Rozet et al. 2024)
iterates

.. math:: \theta_{k+1} = \arg\max_\theta \sum_i \mathbb{E}_{q_{\theta_k}(x \mid y_i)}
    [\log q_\theta(x)],

which never decreases the evidence. Lap 0 fits a Gaussian prior in closed form
(:func:`gaussian_em`); each later lap draws one posterior sample per observation with MMPS from
the current prior (:func:`posterior_samples`, one vectorised solve per minibatch of
observations with different operators), then keeps training the previous lap's network on
those samples with :func:`plausible.fit` (a fresh optimiser and EMA each lap).

API summary (stable)::

    from plausible import em

    # a batch of observations, each with its own operator (vectorised)
    A = em.Masks(masks)              # masks (N, *S): y_i = m_i * x_i
    A = em.Matrices(matrices)        # (N, M, D): y_i = M_i vec(x_i)
    A = em.FourierMasks(masks)       # (N, H, W): y_i = m_i * FFT(x_i) as (..., 2) real/imag
    A = em.Shared(plausible.ops.Blur.gaussian(5, 1.0), n=N)   # one operator for all
    obs = em.Observations(y, A, noise)   # y (N, *S_y); noise: std scalar, (N,) or (N, *S_y)
    obs = em.Observations.simulate(x, A, noise, generator=g)  # y = A x + noise * eps
    obs.save("obs.safetensors"); obs = em.Observations.load("obs.safetensors")  # or .zarr
    obs[idx]                          # a sub-batch; obs.item(i) -> plausible.Observation

    post = em.BatchedMMPS(prior, obs[:B], maxiter=1)    # a Denoiser over B problems at once
    x = em.posterior_samples(prior, obs, steps=64, maxiter=1, batch_size=256)   # (N, *S)

    gauss, log_lik = em.gaussian_em(obs, shape, iterations=32, rank="auto")
    em.gaussian_log_likelihood(gauss, obs)              # (N,) exact log q(y_i)

    result = em.fit(prior, obs, laps=8,                  # prior: a trainable Denoiser
                    sampling={"steps": 64, "maxiter": 1, "batch_size": 256},
                    training={"steps": 4000, "batch_size": 256, "lr": 1e-3},
                    out="run/", resume=False, metric=None, seed=0, progress=True)
    result.prior, result.gaussian, result.gaussian_log_likelihood, result.laps

Run folder of :func:`fit` (safetensors + JSON, nothing pickled)::

    run/options.json                 the EM options (checked on resume)
    run/latest.json                  {"lap": k}: the last completed lap
    run/metrics.jsonl                one JSON line per completed lap
    run/lap-0000/model/              the lap-0 Gaussian (plausible.load works on it)
    run/lap-0000/metrics.json        its log-likelihood per EM iteration
    run/lap-000k/samples.safetensors posterior samples of lap k (kept while the lap trains)
    run/lap-000k/training/           plausible.fit's checkpoints while lap k trains
    run/lap-000k/model/              the prior after lap k (EMA weights)
    run/lap-000k/metrics.json        lap k's metrics

``resume=True`` loads the last completed lap and continues the current one: its samples if
they were all drawn, its training from its last checkpoint; no completed lap is recomputed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, load, model_config, save_model
from .denoisers import Denoiser, GaussianDenoiser, right_broadcast
from .linalg import Solution, cg, gmres
from .observations import FourierMask, Identity, Mask, Matrix, Observation, Operator
from .sampling import sample
from .schedules import Schedule
from .training import fit as train

__all__ = [
    "BatchedOperator",
    "Masks",
    "Matrices",
    "FourierMasks",
    "Shared",
    "Observations",
    "BatchedMMPS",
    "BatchedStep",
    "posterior_samples",
    "gaussian_em",
    "gaussian_log_likelihood",
    "fit_gaussian",
    "SamplingOptions",
    "EMResult",
    "fit",
    "EMConfig",
    "parse_em_config",
    "read_em_config",
    "run_config",
]

Index = int | slice | Sequence[int] | Tensor


def _as_index(index: Index, n: int) -> Tensor:
    """A ``(B,)`` long tensor of item positions in ``[0, n)``."""
    if isinstance(index, int):
        index = [index]
    if isinstance(index, slice):
        return torch.arange(n)[index]
    index = torch.as_tensor(index)
    if index.dtype == torch.bool:
        if index.shape != (n,):
            raise ValueError(f"a boolean index must have shape ({n},), got {tuple(index.shape)}")
        return index.nonzero().squeeze(1)
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"an index must hold integers, got {index.dtype}")
    index = index.long().flatten()
    if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
        raise IndexError(f"index out of range for {n} observations")
    return index % max(n, 1)


# ---------------------------------------------------------------------------------------------
# batched operators


class BatchedOperator(Operator):
    r"""A batch of ``N`` linear operators :math:`A_1, \dots, A_N`, applied item-wise: row ``i``
    of a batch ``x`` ``(N, *S)`` goes through :math:`A_i`. Its adjoint (a vector-Jacobian
    product) is item-wise too, so a whole batch of MMPS problems is solved at once.

    Subclasses implement :meth:`forward`, :meth:`select` (the operators of a subset of the
    items), :meth:`item` (one item's operator as a plain :class:`~plausible.ops.Operator`),
    :meth:`tensors` and :attr:`config` (for :meth:`Observations.save`).
    """

    linear = True

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, index: Index) -> BatchedOperator:  # pragma: no cover - abstract
        raise NotImplementedError

    def item(self, i: int) -> Operator:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def config(self) -> dict[str, Any]:
        return {}

    #: Whether the operators keep a subset of the state's entries unchanged (a mask):
    #: the rank-limited Gaussian EM is then exact and fast.
    selection: bool = False

    def _check(self, x: Tensor) -> None:
        if x.shape[0] != len(self):
            raise ValueError(
                f"{type(self).__name__} holds {len(self)} operators and applies them item-wise: "
                f"expected a batch of {len(self)} states, got {x.shape[0]}"
            )

    def observed(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        r"""Boolean ``(N, *S_y)``: the entries of each observation that its operator reaches
        (a Jacobian row that is not zero; one JVP with a random tangent)."""
        device = _device(self)
        x = torch.zeros(len(self), *shape, dtype=dtype, device=device)
        v = torch.randn(x.shape, dtype=dtype, device=device,
                        generator=torch.Generator(device).manual_seed(0))
        with torch.enable_grad():
            return torch.func.jvp(self, (x,), (v,))[1] != 0

    def selected_entries(self, shape: Sequence[int]) -> Tensor:
        """For a :attr:`selection` operator: the boolean ``(N, *S)`` of the kept entries."""
        raise TypeError(f"{type(self).__name__} is not a selection operator")

    def matrices(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        r"""The operators as dense matrices ``(N, M, D)`` on flattened states (``D`` JVPs over
        the whole batch; for small ``D``)."""
        D = math.prod(shape)
        device = _device(self)
        x = torch.zeros(len(self), *shape, dtype=dtype, device=device)
        op = self
        eye = torch.eye(D, dtype=dtype, device=device)
        cols = []
        with torch.enable_grad():
            for j in range(D):
                v = eye[j].reshape(shape).expand(x.shape)
                cols.append(torch.func.jvp(op, (x,), (v,))[1].flatten(1))
        return torch.stack(cols, dim=-1)


def _device(module: nn.Module) -> torch.device:
    for t in list(module.buffers()) + list(module.parameters()):
        return t.device
    return torch.device("cpu")


class Masks(BatchedOperator):
    r"""One mask per item: :math:`A_i(x) = m_i \odot x`, with ``masks`` a boolean (or 0/1)
    tensor ``(N, *S)``. Observations keep the state's shape; entries outside the mask are
    ignored (they may be NaN)."""

    selection = True

    def __init__(self, masks: Tensor) -> None:
        super().__init__()
        masks = torch.as_tensor(masks)
        if masks.dim() < 2:
            raise ValueError(f"Masks expects masks of shape (N, *S), got {tuple(masks.shape)}")
        if masks.dtype != torch.bool:
            if not ((masks == 0) | (masks == 1)).all():
                raise ValueError("Masks expects boolean or 0/1 masks")
            masks = masks.bool()
        self.register_buffer("masks", masks)

    def __len__(self) -> int:
        return self.masks.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if tuple(x.shape[1:]) != tuple(self.masks.shape[1:]):
            raise ValueError(f"Masks of shape {tuple(self.masks.shape)} expects states of shape "
                             f"(N, {', '.join(map(str, self.masks.shape[1:]))}), got "
                             f"{tuple(x.shape)}")
        return x * self.masks.to(x.dtype)

    def select(self, index: Index) -> Masks:
        return Masks(self.masks[_as_index(index, len(self)).to(self.masks.device)])

    def item(self, i: int) -> Mask:
        return Mask(self.masks[i])

    def observed(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        return self.masks.clone()

    def matrices(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.diag_embed(self.masks.flatten(1).to(dtype))

    def selected_entries(self, shape: Sequence[int]) -> Tensor:
        return self.masks

    def tensors(self) -> dict[str, Tensor]:
        return {"masks": self.masks}


class Matrices(BatchedOperator):
    r"""One matrix per item: :math:`A_i(x) = M_i \operatorname{vec}(x)`, with ``matrices`` of
    shape ``(N, M, D)``; observations have shape ``(M,)``."""

    def __init__(self, matrices: Tensor) -> None:
        super().__init__()
        matrices = torch.as_tensor(matrices)
        if matrices.dim() != 3 or not matrices.is_floating_point():
            raise ValueError(f"Matrices expects floating-point matrices of shape (N, M, D), got "
                             f"{tuple(matrices.shape)} of dtype {matrices.dtype}")
        if not torch.isfinite(matrices).all():
            raise ValueError("Matrices: the matrices must be finite")
        self.register_buffer("weight", matrices)

    def __len__(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        x = x.flatten(1)
        if x.shape[1] != self.weight.shape[2]:
            raise ValueError(f"Matrices of shape {tuple(self.weight.shape)} expect states of "
                             f"{self.weight.shape[2]} entries, got {x.shape[1]}")
        return torch.einsum("bmd,bd->bm", self.weight.to(x.dtype), x)

    def select(self, index: Index) -> Matrices:
        return Matrices(self.weight[_as_index(index, len(self)).to(self.weight.device)])

    def item(self, i: int) -> Matrix:
        return Matrix(self.weight[i])

    def matrices(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        if math.prod(shape) != self.weight.shape[2]:
            raise ValueError(f"Matrices of shape {tuple(self.weight.shape)} do not act on states "
                             f"of shape {tuple(shape)}")
        return self.weight.to(dtype)

    def observed(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        return (self.weight != 0).any(dim=2)

    def tensors(self) -> dict[str, Tensor]:
        return {"matrices": self.weight}


class FourierMasks(BatchedOperator):
    r"""One k-space mask per item (accelerated MRI): :math:`A_i(x) = m_i \odot \mathcal{F}(x)`
    with the orthonormal FFT over the last ``ndim`` dimensions; observations are real, of shape
    ``(..., *size, 2)`` (real and imaginary parts), as :class:`~plausible.ops.FourierMask`."""

    def __init__(self, masks: Tensor, ndim: int = 2) -> None:
        super().__init__()
        masks = torch.as_tensor(masks).bool()
        if masks.dim() != ndim + 1:
            raise ValueError(f"FourierMasks expects masks of shape (N, {', '.join(['n'] * ndim)})"
                             f", got {tuple(masks.shape)}")
        self.register_buffer("masks", masks)
        self.ndim = int(ndim)

    def __len__(self) -> int:
        return self.masks.shape[0]

    @property
    def config(self) -> dict[str, Any]:
        return {"ndim": self.ndim}

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if tuple(x.shape[-self.ndim:]) != tuple(self.masks.shape[1:]):
            raise ValueError(f"FourierMasks of size {tuple(self.masks.shape[1:])} got states of "
                             f"shape {tuple(x.shape)}")
        k = torch.view_as_real(torch.fft.fftn(x, dim=tuple(range(-self.ndim, 0)), norm="ortho"))
        m = self.masks.reshape(len(self), *([1] * (x.dim() - 1 - self.ndim)),
                               *self.masks.shape[1:], 1)
        return k * m.to(k.dtype)

    def select(self, index: Index) -> FourierMasks:
        return FourierMasks(self.masks[_as_index(index, len(self)).to(self.masks.device)],
                            self.ndim)

    def item(self, i: int) -> FourierMask:
        return FourierMask(self.masks[i], self.ndim)

    def tensors(self) -> dict[str, Tensor]:
        return {"masks": self.masks}


class Shared(BatchedOperator):
    """The same operator ``op`` (any linear :class:`~plausible.ops.Operator`) for all ``n``
    items."""

    def __init__(self, op: Operator, n: int) -> None:
        super().__init__()
        if not isinstance(op, Operator) or isinstance(op, BatchedOperator):
            raise TypeError(f"Shared expects a plain Operator, got {type(op).__name__}")
        if not op.linear:
            raise ValueError("empirical Bayes by EM needs linear operators")
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self.op, self.n = op, int(n)
        self.selection = isinstance(op, (Mask, Identity))

    def __len__(self) -> int:
        return self.n

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"op": type(self.op).__name__, "n": self.n}
        if isinstance(self.op, FourierMask):
            config["ndim"] = self.op.ndim
        return config

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.op(x)

    def select(self, index: Index) -> Shared:
        return Shared(self.op, len(_as_index(index, len(self))))

    def item(self, i: int) -> Operator:
        return self.op

    def selected_entries(self, shape: Sequence[int]) -> Tensor:
        if isinstance(self.op, Identity):
            keep = torch.ones(tuple(shape), dtype=torch.bool, device=_device(self))
        elif isinstance(self.op, Mask):
            keep = self.op.mask.expand(tuple(shape))
        else:
            return super().selected_entries(shape)
        return keep.expand(len(self), *shape)

    def observed(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        if self.selection:
            return self.selected_entries(shape).clone()
        one = Observation(torch.zeros(self.op.out_shape(shape, dtype), dtype=dtype), self.op)
        return one.observed_entries(tuple(shape)).expand(len(self), *one.y.shape).clone()

    def matrices(self, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
        return self.op.matrix(shape, dtype).expand(len(self), -1, -1)

    def tensors(self) -> dict[str, Tensor]:
        if isinstance(self.op, Identity):
            return {}
        if isinstance(self.op, Mask):
            return {"mask": self.op.mask}
        if isinstance(self.op, Matrix):
            return {"matrix": self.op.weight}
        if isinstance(self.op, FourierMask):
            return {"mask": self.op.mask}
        raise TypeError(f"Shared({type(self.op).__name__}) cannot be saved; save Identity, Mask, "
                        "Matrix or FourierMask operators")


def _operator_from(config: dict[str, Any], tensors: dict[str, Tensor]) -> BatchedOperator:
    name = config.get("class")
    try:
        if name == "Masks":
            return Masks(tensors["masks"])
        if name == "Matrices":
            return Matrices(tensors["matrices"])
        if name == "FourierMasks":
            return FourierMasks(tensors["masks"], config.get("ndim", 2))
        if name == "Shared":
            op_name, n = config["op"], int(config["n"])
            op = {"Identity": lambda: Identity(), "Mask": lambda: Mask(tensors["mask"]),
                  "Matrix": lambda: Matrix(tensors["matrix"]),
                  "FourierMask": lambda: FourierMask(tensors["mask"], config.get("ndim", 2))}
            if op_name not in op:
                raise ValueError(f"unknown shared operator {op_name!r}")
            return Shared(op[op_name](), n)
    except KeyError as error:
        raise ValueError(f"the observations file lacks the operator tensor {error}") from None
    raise ValueError(f"unknown operator class {name!r} in the observations file (expected Masks, "
                     "Matrices, FourierMasks or Shared)")


# ---------------------------------------------------------------------------------------------
# observations


class Observations:
    r"""A batch of ``N`` observations :math:`y_i = A_i x_i + \epsilon_i`,
    :math:`\epsilon_i \sim \mathcal{N}(0, \mathrm{diag}(s_i^2))`, each of its own state.

    Arguments:
        y: The observations, ``(N, *S_y)``; entries that an operator does not reach are
            ignored (they may be NaN).
        A: A :class:`BatchedOperator` of ``N`` operators, or one plain linear
            :class:`~plausible.ops.Operator` shared by all (wrapped in :class:`Shared`).
        noise: Standard deviations: a positive scalar, one per item ``(N,)``, or one per entry
            ``(N, *S_y)``.
    """

    def __init__(self, y: Tensor, A: BatchedOperator | Operator, noise: float | Tensor) -> None:
        if not isinstance(y, Tensor) or not y.is_floating_point() or y.dim() < 2:
            raise TypeError("y must be a floating-point tensor of shape (N, *S_y), got "
                            + (f"shape {tuple(y.shape)} of dtype {y.dtype}"
                               if isinstance(y, Tensor) else type(y).__name__))
        N = y.shape[0]
        if isinstance(A, Operator) and not isinstance(A, BatchedOperator):
            A = Shared(A, N)
        if not isinstance(A, BatchedOperator):
            raise TypeError(f"A must be a BatchedOperator or an Operator, got {type(A).__name__}")
        if len(A) != N:
            raise ValueError(f"A holds {len(A)} operators for {N} observations")
        noise = torch.as_tensor(noise, dtype=y.dtype, device=y.device)
        if noise.dim() == 0 or noise.shape == (N,) or noise.shape == y.shape:
            pass
        else:
            raise ValueError(f"noise must be a scalar std, one std per item ({N},) or one per "
                             f"entry {tuple(y.shape)}; got shape {tuple(noise.shape)}")
        if not torch.isfinite(noise).all() or not (noise > 0).all():
            raise ValueError("noise standard deviations must be finite and positive")
        self.y, self.A, self.noise = y, A, noise

    def __len__(self) -> int:
        return self.y.shape[0]

    def __repr__(self) -> str:
        return (f"Observations(N={len(self)}, y: {tuple(self.y.shape[1:])}, "
                f"A: {type(self.A).__name__}, noise: {tuple(self.noise.shape)})")

    def __getitem__(self, index: Index) -> Observations:
        idx = _as_index(index, len(self)).to(self.y.device)
        noise = self.noise if self.noise.dim() == 0 else self.noise[idx]
        return Observations(self.y[idx], self.A.select(idx), noise)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Observations:
        """A copy on ``device`` (operator included) with ``y`` and ``noise`` in ``dtype``."""
        A = self.A
        if device is not None and _device(A) != torch.device(device):
            A = copy.deepcopy(A).to(device)
        return Observations(self.y.to(device=device, dtype=dtype), A,
                            self.noise.to(device=device, dtype=dtype))

    def variance(self) -> Tensor:
        """Noise variances of every entry, ``(N, *S_y)``."""
        return right_broadcast(self.noise, self.y).expand(self.y.shape) ** 2 \
            if self.noise.dim() == 1 else (self.noise**2).expand(self.y.shape)

    def observed(self, shape: Sequence[int]) -> Tensor:
        """Boolean ``(N, *S_y)``: the entries of ``y`` that the operators reach."""
        observed = self.A.observed(tuple(shape), self.y.dtype).to(self.y.device)
        return observed.expand(self.y.shape) if observed.shape != self.y.shape else observed

    def validate(self, shape: Sequence[int]) -> Tensor:
        """Checks ``y`` against the operators on states of shape ``shape`` and that ``y`` is
        finite where it is observed; returns :meth:`observed`.

        Raises:
            ValueError: On a shape mismatch or NaN/inf at an observed entry.
        """
        shape = tuple(shape)
        x = torch.zeros(len(self), *shape, dtype=self.y.dtype, device=self.y.device)
        try:
            with torch.no_grad():
                out = self.A(x)
        except Exception as error:  # noqa: BLE001 - report what the operator expected
            raise ValueError(f"the operators failed on states of shape {shape}: {error}") \
                from error
        if tuple(out.shape) != tuple(self.y.shape):
            raise ValueError(f"y has shape {tuple(self.y.shape)} but A(x) has shape "
                             f"{tuple(out.shape)} for states of shape {shape}")
        observed = self.observed(shape)
        if not torch.isfinite(self.y[observed]).all():
            raise ValueError("y contains NaN or infinity at observed entries")
        if not bool(observed.flatten(1).any(1).all()):
            raise ValueError("some observations observe no entry (an empty mask)")
        return observed

    def item(self, i: int) -> Observation:
        """Observation ``i`` as a plain :class:`~plausible.observations.Observation`."""
        noise = self.noise if self.noise.dim() == 0 else self.noise[i]
        return Observation(self.y[i], self.A.item(i), noise)

    @staticmethod
    def simulate(x: Tensor, A: BatchedOperator | Operator, noise: float | Tensor,
                 generator: torch.Generator | None = None) -> Observations:
        r"""Draws :math:`y_i = A_i x_i + s_i \epsilon_i` for states ``x`` ``(N, *S)``."""
        N = x.shape[0]
        if isinstance(A, Operator) and not isinstance(A, BatchedOperator):
            A = Shared(A, N)
        with torch.no_grad():
            y = A(x)
        noise_t = torch.as_tensor(noise, dtype=y.dtype, device=y.device)
        eps = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        scale = right_broadcast(noise_t, y) if noise_t.dim() == 1 and noise_t.shape != \
            y.shape else noise_t
        return Observations(y + scale * eps, A, noise_t)

    # -- files ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``y``, ``noise`` and the operator's tensors (``A.<name>``) to a
        ``.safetensors`` file or a ``.zarr`` group; the operator's class and config go to the
        metadata (JSON). Nothing is pickled."""
        path = Path(path)
        tensors = {"y": self.y, "noise": self.noise,
                   **{f"A.{k}": v for k, v in self.A.tensors().items()}}
        meta = {"class": type(self.A).__name__, **self.A.config}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                      str(path), metadata={"operator": json.dumps(meta)})
        elif path.suffix == ".zarr":
            from .data import write_zarr

            arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
            write_zarr(path, arrays, overwrite=True)
            import zarr

            zarr.open_group(str(path), mode="r+").attrs["operator"] = meta
        else:
            raise ValueError(f"{path}: expected a .safetensors or .zarr path")
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> Observations:
        """Reads what :meth:`save` wrote (``.safetensors`` or ``.zarr``)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no observations at {path}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("operator", "null") or "null")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        elif path.suffix == ".zarr":
            import zarr

            group = zarr.open_group(str(path), mode="r")
            meta = dict(group.attrs.get("operator", {})) or None
            tensors = {k: torch.from_numpy(group[k][...]) for k in group.array_keys()}
        else:
            raise ValueError(f"{path}: expected a .safetensors or .zarr path")
        if meta is None:
            raise ValueError(f"{path} has no operator metadata (write it with "
                             "Observations.save)")
        for key in ("y", "noise"):
            if key not in tensors:
                raise ValueError(f"{path} has no tensor {key!r} (it has {sorted(tensors)})")
        A = _operator_from(meta, {k[2:]: v for k, v in tensors.items() if k.startswith("A.")})
        return Observations(tensors["y"], A, tensors["noise"])


# ---------------------------------------------------------------------------------------------
# MMPS over a batch of problems


@dataclass
class BatchedStep:
    """By-products of one :class:`BatchedMMPS` evaluation (see :class:`plausible.MMPSStep`)."""

    x_hat: Tensor
    x_post: Tensor
    solution: Solution


class BatchedMMPS(Denoiser):
    r"""MMPS (Rozet et al. 2024) for a batch of ``B`` independent problems: row ``i`` of
    ``x_t`` ``(B, *S)`` is denoised under its own observation :math:`(y_i, A_i, \Sigma_i)`,

    .. math:: \mathbb{E}[x_i \mid x_{t,i}, y_i] \approx \hat{x}_i + V_i A_i^\top u_i, \qquad
        (\Sigma_i + A_i V_i A_i^\top) u_i = y_i - A_i \hat{x}_i,

    with :math:`\hat{x} = d(x_t, t)` and :math:`V_i v = \frac{\sigma_t^2}{\alpha_t}
    J_i^\top v` (one VJP through the prior per solver iteration, for the whole batch). The
    ``B`` systems are solved together by the batched Krylov solvers of
    :mod:`plausible.linalg` (each row stops at its own tolerance). Unobserved entries of
    ``y_i`` carry no residual, so the Krylov iterates stay in the observed entries: the result
    equals :class:`plausible.MMPS` applied to each problem alone (with ``safeguard=False``:
    the negative-curvature truncation of MMPS is not applied here).

    Arguments:
        prior: The prior denoiser. observations: ``B`` :class:`Observations`.
        tol, maxiter, solver: As :class:`plausible.MMPS` (``maxiter=None``: the number of
            entries of one observation).
        safeguard: Stop each row's solve at the first Krylov direction along which the prior
            part :math:`A_i V_i A_i^\top` has negative curvature (the ``floor`` of
            :func:`plausible.linalg.cg` / :func:`~plausible.linalg.gmres` with
            :math:`\Sigma_i`), as ``plausible.MMPS(safeguard=True)``. Off by default here.
        covariance: A :class:`~plausible.GaussianDenoiser` :math:`\mathcal{N}(m, C)` whose
            exact Tweedie covariance replaces the network's in the solve (Rozet et al.'s
            ``sigma_x`` heuristic, used in their toy-manifold experiment with the lap-0
            Gaussian):

            .. math:: (\Sigma_i + A_i V_C A_i^\top) u_i = y_i - A_i \hat{x}_i, \qquad
                V_C = (C^{-1} + \tfrac{\alpha_t^2}{\sigma_t^2} I)^{-1}, \qquad
                \mathbb{E}[x_i \mid x_{t,i}, y_i] \approx \hat{x}_i + \tfrac{\sigma_t^2}
                {\alpha_t} J_i^\top A_i^\top u_i.

            The system is symmetric positive definite and involves no network product, so a
            converged solve costs nothing more and cannot follow the errors of the network's
            Jacobian; the update takes one VJP through the prior. With ``covariance`` equal
            to a Gaussian ``prior`` it is exact MMPS. ``None`` (default): the network's
            Tweedie covariance.
    """

    def __init__(self, prior: Denoiser, observations: Observations, tol: float = 1e-6,
                 maxiter: int | None = None, solver: str = "gmres",
                 safeguard: bool = False, covariance: GaussianDenoiser | None = None) -> None:
        super().__init__()
        if not isinstance(prior, Denoiser):
            raise TypeError(f"prior must be a Denoiser, got {type(prior).__name__}")
        if prior.shape is None:
            raise ValueError("the prior's state shape is unknown: build it with shape=(...)")
        if not isinstance(observations, Observations):
            raise TypeError(f"observations must be em.Observations, got "
                            f"{type(observations).__name__}")
        if solver not in ("cg", "gmres"):
            raise ValueError(f"solver must be 'cg' or 'gmres', got {solver!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be non-negative, got {tol}")
        if maxiter is not None and (not isinstance(maxiter, int) or maxiter < 0):
            raise ValueError(f"maxiter must be a non-negative integer or None, got {maxiter!r}")
        self.prior = prior
        self.schedule = prior.schedule
        self.shape = tuple(prior.shape)
        self.obs = observations
        self.A = observations.A
        observed = observations.validate(self.shape)
        self.register_buffer("observed", observed.contiguous().clone())
        self.register_buffer("y", torch.where(observed, observations.y, 0.0))
        self.register_buffer("var", observations.variance())
        self.tol, self.maxiter, self.solver = float(tol), maxiter, solver
        self.safeguard = bool(safeguard)
        if covariance is not None:
            if not isinstance(covariance, GaussianDenoiser):
                raise TypeError(f"covariance must be a GaussianDenoiser or None, got "
                                f"{type(covariance).__name__}")
            if tuple(covariance.shape) != self.shape:
                raise ValueError(f"covariance has state shape {tuple(covariance.shape)}, the "
                                 f"prior {self.shape}")
        self.covariance = covariance
        self.stats = {"calls": 0, "vjps": 0, "solver_iterations": 0}

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self.step(x_t, t, **cond).x_post

    def step(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> BatchedStep:
        t = self.check(x_t, t)
        B = x_t.shape[0]
        if B != len(self.obs):
            raise ValueError(f"BatchedMMPS holds {len(self.obs)} problems: x_t must have "
                             f"{len(self.obs)} rows, got {B}")
        alpha, sigma = self.schedule(t)
        gamma = right_broadcast(sigma**2 / alpha, x_t)
        self.stats["calls"] += 1
        with torch.enable_grad():
            x_hat, vjp_prior = torch.func.vjp(lambda x: self.prior(x, t, **cond), x_t.detach())
        x_hat = x_hat.detach()
        A, observed = self.A, self.observed
        var = self.var.to(x_hat.dtype)
        with torch.enable_grad():
            _, vjp_A = torch.func.vjp(A, x_hat)
        shape_y = self.y.shape

        heuristic = self.covariance

        def matvec(u: Tensor) -> tuple[Tensor, Tensor]:
            U = torch.where(observed, u.reshape(shape_y), 0.0)
            if heuristic is None:
                w = gamma * vjp_prior(vjp_A(U)[0])[0]
                self.stats["vjps"] += 1
            else:  # V_C A^T U, no network product
                w = heuristic.tweedie_cov(x_t, t, vjp_A(U)[0].to(x_hat.dtype))
            out = var * U + torch.where(observed, A(w), 0.0)
            return out.flatten(1), w

        with torch.no_grad():
            b = torch.where(observed, self.y.to(x_hat.dtype) - A(x_hat), 0.0).flatten(1)
            solve = cg if self.solver == "cg" else gmres
            maxiter = self.maxiter if self.maxiter is not None else b.shape[1]
            if self.safeguard:
                flat_var = var.flatten(1)
                solution = solve(matvec, b, tol=self.tol, maxiter=maxiter,
                                 floor=lambda u: flat_var * u)
            else:
                solution = solve(matvec, b, tol=self.tol, maxiter=maxiter)
        self.stats["solver_iterations"] += solution.iterations
        if heuristic is not None:  # the update goes through the network: gamma J^T A^T u
            U = torch.where(observed, solution.x.to(x_hat.dtype).reshape(shape_y), 0.0)
            with torch.no_grad():
                x_post = x_hat + gamma * vjp_prior(vjp_A(U)[0])[0]
            self.stats["vjps"] += 1
        else:
            x_post = x_hat if solution.aux is None else x_hat + solution.aux.to(x_hat.dtype)
        return BatchedStep(x_hat=x_hat, x_post=x_post.detach(), solution=solution)


@dataclass
class SamplingOptions:
    """How each lap draws its posterior samples (MMPS + a reverse-diffusion sampler).

    Attributes:
        steps: Sampler steps. sampler: A sampler of :func:`plausible.sample` (``"ddpm"``...).
        maxiter: MMPS solver iterations (published runs: 1-5; ``None``: converged). The
            default 1 is the robust choice with learned priors: on the toy manifold (2-D
            observations), the converged solve (2 iterations) followed the network Jacobian's
            errors into outliers (largest posterior-sample error 177 against 6.5 with one
            iteration, measured after lap 1). With ``covariance="gaussian"`` the solve
            involves no network product: use ``None`` (converged) there.
        tol: Relative tolerance of the solve. solver: ``"gmres"`` or ``"cg"``.
        batch_size: Observations per vectorised MMPS call.
        grid: The time grid of :func:`plausible.sample`.
        safeguard: Truncate solves at negative curvature (see :class:`BatchedMMPS`).
        covariance: ``"tweedie"`` (the network's Tweedie covariance in the MMPS solve) or
            ``"gaussian"`` (the lap-0 Gaussian's exact Tweedie covariance, Rozet et al.'s
            ``sigma_x`` heuristic; see :class:`BatchedMMPS`): a symmetric positive-definite
            system that is safe to solve to convergence (``maxiter=None``).
        eta, corrections, tau, correct_above: Of the ``"pc"`` sampler (see
            :func:`plausible.sample`): ``eta = 1`` makes its predictor the ancestral DDPM step,
            ``correct_above`` skips the Langevin corrections at low noise (MMPS's default
            posterior sampler: ``"pc"``, ``eta = 1``, 1 correction, ``tau = 0.25``,
            ``correct_above = 0.2``). ``eta`` also sets the stochasticity of ``"ddim"``.
    """

    steps: int = 64
    sampler: str = "ddpm"
    maxiter: int | None = 1
    tol: float = 1e-6
    solver: str = "gmres"
    batch_size: int = 256
    grid: str = "uniform"
    safeguard: bool = False
    covariance: str = "tweedie"
    eta: float | None = None
    corrections: int = 1
    tau: float = 0.25
    correct_above: float = 0.0

    @staticmethod
    def of(options: SamplingOptions | dict | None) -> SamplingOptions:
        if options is None:
            return SamplingOptions()
        if isinstance(options, SamplingOptions):
            return options
        if not isinstance(options, dict):
            raise TypeError(f"sampling must be a dict or SamplingOptions, got "
                            f"{type(options).__name__}")
        known = set(SamplingOptions.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown sampling option {unknown[0]!r} (known: "
                             f"{', '.join(sorted(known))})")
        out = SamplingOptions(**options)
        if out.steps < 1 or out.batch_size < 1:
            raise ValueError("sampling steps and batch_size must be positive")
        if out.covariance not in ("tweedie", "gaussian"):
            raise ValueError(f"sampling covariance must be 'tweedie' or 'gaussian', got "
                             f"{out.covariance!r}")
        return out


def posterior_samples(
    prior: Denoiser,
    observations: Observations,
    steps: int = 64,
    sampler: str = "ddpm",
    *,
    maxiter: int | None = 1,
    tol: float = 1e-6,
    solver: str = "gmres",
    batch_size: int = 256,
    grid: str = "uniform",
    safeguard: bool = False,
    covariance: GaussianDenoiser | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    stats: dict[str, float] | None = None,
    **sampling: Any,
) -> Tensor:
    r"""One posterior sample :math:`x_i \sim q(x \mid y_i)` per observation, shape
    ``(N, *S)``, by MMPS (:class:`BatchedMMPS`) and ``sampler``, ``batch_size`` observations
    per vectorised call. Minibatch ``b`` draws from its own generator seeded by
    ``(seed, b)``, so a run is reproducible and independent of interruptions.

    ``covariance`` (a GaussianDenoiser) replaces the network's Tweedie covariance in the
    solve (see :class:`BatchedMMPS`). ``stats`` (a dict), if given, receives the mean solver
    ``iterations`` per MMPS call. ``sampling`` (``eta``, ``corrections``, ``tau``,
    ``correct_above``) goes to :func:`plausible.sample`."""
    if not isinstance(observations, Observations):
        raise TypeError(f"observations must be em.Observations, got {type(observations).__name__}")
    N = len(observations)
    device = _device(prior)
    out = []
    calls = iterations = 0
    bar = tqdm(range(0, N, batch_size), desc="posterior samples", disable=not progress,
               unit="batch")
    for b, lo in enumerate(bar):
        idx = torch.arange(lo, min(lo + batch_size, N))
        obs = observations[idx].to(device)
        post = BatchedMMPS(prior, obs, tol=tol, maxiter=maxiter, solver=solver,
                           safeguard=safeguard, covariance=covariance)
        generator = torch.Generator(device).manual_seed(int(seed) * 1_000_003 + b)
        x = sample(post, len(idx), steps=steps, sampler=sampler, grid=grid,
                   generator=generator, dtype=dtype, progress=False, **sampling)
        out.append(x.detach())
        calls += post.stats["calls"]
        iterations += post.stats["solver_iterations"]
    if stats is not None:
        stats["iterations"] = iterations / max(calls, 1)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Gaussian EM (lap 0)


def _chunks(N: int, size: int) -> list[Tensor]:
    return [torch.arange(lo, min(lo + size, N)) for lo in range(0, N, size)]


def _flat_obs(obs: Observations, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, var, observed) flattened to ``(B, M)`` in float64, y zero where unobserved."""
    f64 = torch.float64
    observed = obs.observed(shape).flatten(1)
    y = torch.where(observed, obs.y.flatten(1).to(f64), 0.0)
    return y, obs.variance().flatten(1).to(f64), observed


def _dense_estep(m: Tensor, C: Tensor, obs: Observations, shape: tuple[int, ...]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Closed-form posteriors of a batch: returns ``(sum mu, sum mu mu^T, sum P, log-lik
    (B,))`` with :math:`\mu_i = m + C A_i^\top S_i^{-1} r_i`, :math:`P_i = C - C A_i^\top
    S_i^{-1} A_i C`, :math:`S_i = A_i C A_i^\top + \Sigma_i`, :math:`r_i = y_i - A_i m`."""
    y, var, observed = _flat_obs(obs, shape)
    A = obs.A.matrices(shape).to(device=m.device, dtype=torch.float64)
    A = A * observed[..., None]
    CAt = torch.einsum("de,bme->bdm", C, A)  # (B, D, M)
    S = torch.einsum("bmd,bdn->bmn", A, CAt) + torch.diag_embed(var)
    S = (S + S.transpose(1, 2)) / 2
    L = torch.linalg.cholesky(S)
    r = y - A @ m
    z = torch.cholesky_solve(r[..., None], L)[..., 0]
    mu = m + torch.einsum("bdm,bm->bd", CAt, z)
    SinvAC = torch.cholesky_solve(CAt.transpose(1, 2), L)  # (B, M, D)
    P_sum = len(y) * C - torch.einsum("bdm,bme->de", CAt, SinvAC)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
    M = observed.sum(1).to(torch.float64)
    # unobserved entries are a diagonal block var_j with zero residual: removed
    logdet = logdet - torch.where(observed, 0.0, torch.log(var)).sum(1)
    log_lik = -0.5 * ((r * z).sum(1) + logdet + M * math.log(2 * math.pi))
    return mu.sum(0), mu.T @ mu, P_sum, log_lik


def _lowrank_estep(m: Tensor, U: Tensor, d: Tensor, obs: Observations,
                   shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Exact E-step of the factor model :math:`x = m + U z + \eta`, :math:`z \sim
    \mathcal{N}(0, I_r)`, :math:`\eta \sim \mathcal{N}(0, \mathrm{diag}(d))`, seen through
    selection operators (masks): returns the sufficient statistics ``(S_xz (D, r+1), S_zz
    (r+1, r+1), S_xx (D,), log-lik (B,))`` with :math:`\tilde{z} = (z, 1)`."""
    y, var, observed = _flat_obs(obs, shape)
    keep = obs.A.selected_entries(shape).flatten(1).to(m.device) & observed
    r_dim = U.shape[1]
    dv = d + var  # (B, D)
    w = torch.where(keep, 1 / dv, 0.0)
    res = torch.where(keep, y - m, 0.0)
    P = torch.eye(r_dim, dtype=U.dtype, device=U.device) + torch.einsum("dr,bd,ds->brs", U, w, U)
    Lp = torch.linalg.cholesky(P)
    h = (w * res) @ U  # (B, r)
    mu = torch.cholesky_solve(h[..., None], Lp)[..., 0]
    Sz = torch.cholesky_inverse(Lp)
    M = keep.sum(1).to(torch.float64)
    log_lik = -0.5 * ((w * res * res).sum(1) - (h * mu).sum(1)
                      + 2 * torch.log(torch.diagonal(Lp, dim1=1, dim2=2)).sum(1)
                      + torch.where(keep, torch.log(dv), 0.0).sum(1) + M * math.log(2 * math.pi))
    k = torch.where(keep, d / dv, 0.0)  # (B, D)
    a = m + k * res  # posterior mean of x given z = 0
    b = (1 - k)[..., None] * U  # (B, D, r): d E[x | z, y] / dz
    v = d * (1 - k)  # Var[x | z, y]
    Ex = a + torch.einsum("bdr,br->bd", b, mu)
    Ezz = Sz + mu[:, :, None] * mu[:, None, :]
    Exz = a[:, :, None] * mu[:, None, :] + torch.einsum("bdr,brs->bds", b, Ezz)
    Exx = v + Ex**2 + torch.einsum("bdr,brs,bds->bd", b, Sz, b)
    S_xz = torch.cat([Exz.sum(0), Ex.sum(0)[:, None]], dim=1)
    top = torch.cat([Ezz.sum(0), mu.sum(0)[:, None]], dim=1)
    bottom = torch.cat([mu.sum(0), torch.tensor([float(len(y))], dtype=mu.dtype,
                                                device=mu.device)])[None]
    S_zz = torch.cat([top, bottom], dim=0)
    return S_xz, S_zz, Exx.sum(0), log_lik


def _initial_scale(obs: Observations, shape: tuple[int, ...]) -> float:
    """A variance scale for the first Gaussian: the mean square of the observed y per unit of
    operator gain (one JVP with a random state)."""
    g = torch.Generator(_device(obs.A)).manual_seed(0)
    idx = torch.arange(min(len(obs), 1024))
    sub = obs[idx]
    observed = sub.observed(shape)
    x = torch.randn(len(sub), *shape, generator=g, dtype=torch.float64,
                    device=_device(obs.A)).to(sub.y.dtype)
    with torch.no_grad():
        gain = float(sub.A(x).to(torch.float64).square().sum())
    power = float(torch.where(observed, sub.y, 0.0).to(torch.float64).square().sum())
    noise = float(torch.where(observed, sub.variance(), 0.0).to(torch.float64).sum())
    if gain <= 0:
        return 1.0
    return max((power - noise) / gain, 1e-3 * power / gain, 1e-6)


def _lowrank_init(observations: Observations, shape: tuple[int, ...], rank: int, s2: float,
                  seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A starting factor model for selection operators: the mean of the observed entries, and
    ``U`` from a PCA of the mean-filled observations (each entry scaled by the inverse of its
    observed fraction), with a small random part that keeps every direction reachable."""
    f64 = torch.float64
    device = _device(observations.A)
    D = math.prod(shape)
    sub = observations[torch.randperm(len(observations), generator=torch.Generator()
                                      .manual_seed(seed))[:4096]]
    keep = (sub.A.selected_entries(shape).to(device) & sub.observed(shape)).flatten(1)
    y = torch.where(keep, sub.y.flatten(1).to(f64), 0.0)
    count = keep.sum(0).to(f64)
    m = torch.where(count > 0, y.sum(0) / count.clamp(min=1), 0.0)
    frac = (count / len(sub)).clamp(min=1e-3)
    X = torch.where(keep, y - m, 0.0) / frac
    g = torch.Generator(device).manual_seed(seed)
    q = min(rank, D, len(sub))
    _, s, V = torch.linalg.svd(X, full_matrices=False)
    lam = (s[:q] ** 2 / len(sub)).clamp(min=1e-6 * s2)
    U = torch.zeros(D, rank, dtype=f64, device=device)
    U[:, :q] = V[:q].T * lam.sqrt()
    U = U + 0.01 * math.sqrt(s2) * torch.randn(D, rank, generator=g, dtype=f64, device=device)
    var = torch.where(keep, (y - m) ** 2, 0.0).sum(0) / count.clamp(min=1)
    noise = torch.where(keep, sub.variance().flatten(1).to(f64), 0.0).sum(0) / count.clamp(min=1)
    d = (var - noise - U.square().sum(1)).clamp(min=0.05 * s2)
    d = torch.where(count > 0, d, s2)
    return m, U, d


def gaussian_log_likelihood(gaussian: GaussianDenoiser, observations: Observations,
                            batch_size: int = 256) -> Tensor:
    r"""Exact marginal log-likelihoods :math:`\log \mathcal{N}(y_i; A_i m, A_i C A_i^\top +
    \Sigma_i)` of the observations under a Gaussian prior, over the observed entries; ``(N,)``
    float64. Dense covariances take dense per-item operator matrices; low-rank ones take
    selection operators (masks)."""
    shape = tuple(gaussian.shape)
    out = []
    for idx in _chunks(len(observations), batch_size):
        obs = observations[idx]
        if gaussian.kind == "lowrank":
            out.append(_lowrank_estep(gaussian.mean, gaussian.U, gaussian.d, obs, shape)[3])
        else:
            out.append(_dense_estep(gaussian.mean, gaussian.covariance, obs, shape)[3])
    return torch.cat(out)


def gaussian_em(
    observations: Observations,
    shape: Sequence[int],
    iterations: int = 32,
    rank: int | str | None = "auto",
    *,
    init: GaussianDenoiser | None = None,
    schedule: Schedule | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[GaussianDenoiser, list[float]]:
    r"""Fits a Gaussian prior :math:`\mathcal{N}(m, C)` to the observations by EM, in closed
    form: the E-step conditions the prior on each :math:`y_i` (posterior :math:`\mu_i, P_i`),
    the M-step sets

    .. math:: m = \frac{1}{N} \sum_i \mu_i, \qquad C = \frac{1}{N} \sum_i \big(P_i +
        (\mu_i - m)(\mu_i - m)^\top\big)

    (dense), or, for a factor model :math:`C = U U^\top + \mathrm{diag}(d)` of rank ``r``,
    the exact factor-analysis updates :math:`[U, m] = S_{x\tilde z} S_{\tilde z\tilde z}^{-1}`,
    :math:`d = \mathrm{diag}(S_{xx} - [U, m] S_{\tilde z x}) / N` from the posterior moments of
    :math:`(x, z)`. Either way the marginal log-likelihood never decreases.

    Arguments:
        observations: The observations (linear operators).
        shape: The state shape ``S``.
        iterations: EM iterations.
        rank: ``None`` or ``"dense"``: a dense ``(D, D)`` covariance (dense per-item operator
            matrices, for small ``D``); an int: low-rank plus diagonal (selection operators
            such as :class:`Masks`); ``"auto"``: dense if ``D <= 256``, else rank 16.
        init: The starting Gaussian (default: zero mean, isotropic covariance scaled to the
            data, a small random ``U``).
        schedule: Of the returned denoiser (default VP).
        batch_size: Observations per vectorised E-step (default: by memory).
        seed: Of the random initial ``U``.
        progress: A tqdm bar over the iterations.

    Returns:
        ``(gaussian, log_likelihood)``: the fitted :class:`~plausible.GaussianDenoiser` and
        the mean log-likelihood per observation, ``iterations + 1`` values (before each
        iteration and after the last).
    """
    shape = tuple(int(s) for s in shape)
    D = math.prod(shape)
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    observations.validate(shape)
    if rank == "auto":
        rank = None if D <= 256 else 16
    if rank == "dense":
        rank = None
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be None, 'dense', 'auto' or a positive integer, got {rank!r}")
    if rank is not None and not observations.A.selection:
        raise ValueError(
            f"a rank-{rank} Gaussian EM is exact for selection operators (Masks, Shared(Mask), "
            f"Shared(Identity)); {type(observations.A).__name__} needs rank=None (a dense "
            "covariance, small D)"
        )
    device = _device(observations.A)
    f64 = torch.float64
    N = len(observations)
    if init is not None:
        if tuple(init.shape) != shape:
            raise ValueError(f"init has shape {tuple(init.shape)}, expected {shape}")
        m = init.mean.to(device, f64).clone()
        if rank is None:
            C = init.covariance.to(device, f64)
        elif init.kind == "lowrank" and init.U.shape[1] == rank:
            U, d = init.U.to(device, f64).clone(), init.d.to(device, f64).clone()
        else:
            raise ValueError(f"init must be a rank-{rank} GaussianDenoiser for rank={rank}")
    else:
        s2 = _initial_scale(observations, shape)
        m = torch.zeros(D, dtype=f64, device=device)
        if rank is None:
            C = s2 * torch.eye(D, dtype=f64, device=device)
        else:
            m, U, d = _lowrank_init(observations, shape, rank, s2, seed)
    if batch_size is None:
        M = math.prod(observations.y.shape[1:])
        per_item = D * M + M * M if rank is None else D * (rank + 2) * (rank + 1)
        batch_size = max(1, min(N, (1 << 24) // max(per_item, 1)))
    history: list[float] = []
    bar = tqdm(range(iterations + 1), desc="Gaussian EM", disable=not progress)
    for it in bar:
        last = it == iterations
        if rank is None:
            s_mu = torch.zeros(D, dtype=f64, device=device)
            s_mumu = torch.zeros(D, D, dtype=f64, device=device)
            s_P = torch.zeros(D, D, dtype=f64, device=device)
        else:
            s_xz = torch.zeros(D, rank + 1, dtype=f64, device=device)
            s_zz = torch.zeros(rank + 1, rank + 1, dtype=f64, device=device)
            s_xx = torch.zeros(D, dtype=f64, device=device)
        total = 0.0
        for idx in _chunks(N, batch_size):
            obs = observations[idx.to(observations.y.device)]
            if rank is None:
                a, b, c, ll = _dense_estep(m, C, obs, shape)
                s_mu, s_mumu, s_P = s_mu + a, s_mumu + b, s_P + c
            else:
                a, b, c, ll = _lowrank_estep(m, U, d, obs, shape)
                s_xz, s_zz, s_xx = s_xz + a, s_zz + b, s_xx + c
            total += float(ll.sum())
        history.append(total / N)
        bar.set_postfix(log_lik=f"{history[-1]:.4f}", refresh=False)
        if last:
            break
        if rank is None:
            m = s_mu / N
            C = (s_P + s_mumu) / N - m[:, None] * m[None, :]
            C = (C + C.T) / 2
        else:
            W = torch.linalg.solve(s_zz, s_xz.T).T  # (D, r + 1) = S_xz S_zz^-1
            U, m = W[:, :rank].contiguous(), W[:, rank].contiguous()
            d = ((s_xx - (W * s_xz).sum(1)) / N).clamp(min=1e-10 * float(s_xx.mean() / N))
    cov: Tensor | tuple[Tensor, Tensor] = C if rank is None else (U, d)
    gaussian = GaussianDenoiser(m.reshape(shape), cov, schedule)
    return gaussian, history


def fit_gaussian(x: Tensor, like: GaussianDenoiser) -> GaussianDenoiser:
    r"""The maximum-likelihood Gaussian of samples ``x`` ``(N, *S)`` of the same kind as
    ``like`` (dense, diagonal, or rank-``r`` plus diagonal by PCA: :math:`U = V_r
    \Lambda_r^{1/2}`, :math:`d = \mathrm{diag}(\hat{C}) - \mathrm{diag}(U U^\top)`): the
    M-step of an EM lap whose prior family is Gaussian."""
    X = x.flatten(1).to(torch.float64)
    m = X.mean(0)
    Xc = X - m
    N = X.shape[0]
    if like.kind == "dense":
        cov: Any = Xc.T @ Xc / N
        cov = cov + 1e-10 * torch.diagonal(cov).mean() * torch.eye(X.shape[1], dtype=X.dtype)
    elif like.kind == "diag":
        cov = Xc.square().mean(0)
    else:
        r = like.U.shape[1]
        _, s, V = torch.linalg.svd(Xc, full_matrices=False)
        lam = s[:r] ** 2 / N
        U = V[:r].T * lam.sqrt()
        d = (Xc.square().mean(0) - U.square().sum(1)).clamp(min=1e-10 * float(lam[0]))
        cov = (U, d)
    return GaussianDenoiser(m.reshape(like.shape), cov, like.schedule)


# ---------------------------------------------------------------------------------------------
# the EM loop


@dataclass
class EMResult:
    """What :func:`fit` returns.

    Attributes:
        prior: The prior after the last lap (trained in place when it is a network).
        gaussian: The lap-0 Gaussian prior.
        gaussian_log_likelihood: Its mean log-likelihood per observation, per EM iteration.
        laps: One dict of metrics per completed lap (lap 0 included), as in
            ``metrics.jsonl``.
        out: The run folder (``None`` without checkpoints).
    """

    prior: Denoiser
    gaussian: GaussianDenoiser
    gaussian_log_likelihood: list[float]
    laps: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_samples(path: Path, x: Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({"x": x.detach().cpu().contiguous()}, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_samples(path: Path) -> Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["x"]


def _lap_dir(out: Path, lap: int) -> Path:
    return out / f"lap-{lap:04d}"


def _load_into(prior: nn.Module, folder: Path) -> None:
    saved = load(folder)
    if model_config(saved) != model_config(prior):
        raise CheckpointError(
            f"the model in {folder} is of another prior:\n  checkpoint: {model_config(saved)}"
            f"\n  this prior: {model_config(prior)}"
        )
    prior.load_state_dict(saved.state_dict())


def _json_metrics(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if isinstance(v, Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        out[str(k)] = v
    json.dumps(out)  # raises TypeError on a value that JSON cannot hold
    return out


def fit(
    prior: Denoiser,
    observations: Observations,
    laps: int = 8,
    *,
    gaussian: GaussianDenoiser | None = None,
    gaussian_iterations: int = 32,
    gaussian_rank: int | str | None = "auto",
    sampling: SamplingOptions | dict | None = None,
    training: dict[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    metric: Callable[[int, Denoiser, Tensor | None], dict[str, Any]] | None = None,
    keep_samples: bool = False,
    accept: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> EMResult:
    r"""Empirical Bayes by EM: learns ``prior`` from ``observations`` only.

    Lap 0 fits a Gaussian prior by closed-form EM (:func:`gaussian_em`) unless ``gaussian``
    is given. Lap :math:`k \ge 1` draws one posterior sample per observation with MMPS from
    the prior of lap :math:`k - 1` (the Gaussian at lap 1; :func:`posterior_samples`), then
    keeps training the previous lap's network on these samples with :func:`plausible.fit`
    (fresh optimiser and EMA, ``training`` options, seed ``seed + k``). If ``prior`` is a
    :class:`~plausible.GaussianDenoiser`, the M-step is instead the closed-form Gaussian fit
    of the samples (:func:`fit_gaussian`, Monte-Carlo EM in the Gaussian family).

    Arguments:
        prior: The prior to learn: a trainable denoiser (e.g. ``plausible.Denoiser(net,
            schedule, shape=...)``), trained in place, or a GaussianDenoiser.
        observations: The :class:`Observations`.
        laps: Number of laps after lap 0 (resuming with more laps continues a finished run).
        gaussian: The lap-0 prior (skip the Gaussian EM).
        gaussian_iterations, gaussian_rank: Of :func:`gaussian_em`.
        sampling: :class:`SamplingOptions` or a dict of them.
        training: Keyword arguments of :func:`plausible.fit` (``steps``, ``batch_size``,
            ``lr``, ``ema``...; not ``checkpoint``, ``resume``, ``seed``, ``progress``).
        out: The run folder (``None``: no checkpoints, no resume).
        resume: Continue the run in ``out`` from its last completed lap.
        metric: ``metric(lap, prior, samples) -> dict`` called after each lap (``samples``
            are the lap's posterior samples, ``None`` at lap 0); its values are logged.
        keep_samples: Keep each lap's posterior samples in its folder (else deleted once
            the lap is complete).
        accept: ``accept(x) -> (N,)`` booleans: the M-step trains only on the accepted
            posterior samples (e.g. ``lambda x: (x.abs() < 3).all(1)``, the box Rozet et al.
            keep on the toy manifold, which drops the rare far-off samples of a converged
            MMPS solve). ``metric`` still receives all samples; the accepted fraction is
            logged.
        seed: Seed of the Gaussian initialisation, the samples and the training.
        progress: Progress bars.

    Returns:
        An :class:`EMResult`.

    Raises:
        CheckpointError: If ``out`` holds a run and ``resume`` is false, or holds the run
            of another prior.
    """
    if not isinstance(prior, Denoiser):
        raise TypeError(f"prior must be a Denoiser, got {type(prior).__name__}")
    if prior.shape is None:
        raise ValueError("the prior's state shape is unknown: build it with shape=(...)")
    if not isinstance(observations, Observations):
        raise TypeError(f"observations must be em.Observations, got {type(observations).__name__}")
    if not isinstance(laps, int) or laps < 0:
        raise ValueError(f"laps must be a non-negative integer, got {laps!r}")
    shape = tuple(prior.shape)
    observations.validate(shape)
    options = SamplingOptions.of(sampling)
    training = dict(training or {})
    reserved = sorted(set(training) & {"checkpoint", "resume", "seed", "progress"})
    if reserved:
        raise ValueError(f"training option {reserved[0]!r} is set by em.fit")
    is_gaussian = isinstance(prior, GaussianDenoiser)
    run = Path(out) if out is not None else None
    settings = {"n": len(observations), "shape": list(shape), "seed": seed,
                "sampling": asdict(options), "training": _json_safe(training),
                "gaussian_iterations": gaussian_iterations,
                "gaussian_rank": gaussian_rank, "prior": model_config(prior)}
    settings = json.loads(json.dumps(settings))

    done = -1  # last completed lap
    records: list[dict[str, Any]] = []
    log_lik: list[float] = []
    if run is not None:
        pointer = run / "latest.json"
        if pointer.is_file():
            if not resume:
                raise CheckpointError(f"{run} already holds an EM run; pass resume=True "
                                      "(--resume) to continue it, or choose another folder")
            done = int(json.loads(pointer.read_text())["lap"])
            saved = json.loads((run / "options.json").read_text())
            changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            if changed.get("prior") is not None:
                raise CheckpointError(f"{run} holds the EM run of another prior: "
                                      f"{changed['prior']}")
            if changed:
                warnings.warn(f"resuming with changed EM options {changed}: the run will not "
                              "reproduce an uninterrupted one", stacklevel=2)
        run.mkdir(parents=True, exist_ok=True)
        _write_json(run / "options.json", settings)
        metrics_path = run / "metrics.jsonl"
        if metrics_path.is_file():
            for line in metrics_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("lap", done + 1) <= done:
                    records.append(record)
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def finish(lap: int, model: nn.Module, record: dict[str, Any]) -> None:
        records.append(record)
        if run is None:
            return
        folder = _lap_dir(run, lap)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(model, folder / "model")
        _write_json(folder / "metrics.json", record)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        _write_json(run / "latest.json", {"lap": lap})
        shutil.rmtree(folder / "training", ignore_errors=True)
        if not keep_samples and (folder / "samples.safetensors").exists():
            (folder / "samples.safetensors").unlink()

    # lap 0: the Gaussian
    if done >= 0:
        gauss = load(_lap_dir(run, 0) / "model")
        if not isinstance(gauss, GaussianDenoiser):
            raise CheckpointError(f"{_lap_dir(run, 0)}/model is not a GaussianDenoiser")
        log_lik = list(json.loads((_lap_dir(run, 0) / "metrics.json").read_text())
                       .get("log_likelihood", []))
    else:
        tick = time.perf_counter()
        if gaussian is None:
            gauss, log_lik = gaussian_em(observations, shape, gaussian_iterations,
                                         gaussian_rank, schedule=prior.schedule, seed=seed,
                                         progress=progress)
        else:
            if tuple(gaussian.shape) != shape:
                raise ValueError(f"gaussian has shape {tuple(gaussian.shape)}, the prior {shape}")
            gauss, log_lik = gaussian, []
        record = {"lap": 0, "log_likelihood": log_lik, "seconds": time.perf_counter() - tick}
        if metric is not None:
            record.update(_json_metrics(metric(0, gauss, None)))
        finish(0, gauss, record)
    gauss = gauss.to(_device(prior))

    current: Denoiser = gauss  # the prior that draws the samples of the next lap
    if done >= 1:
        if is_gaussian:
            prior = load(_lap_dir(run, done) / "model")
        else:
            _load_into(prior, _lap_dir(run, done) / "model")
        current = prior

    for lap in range(max(done, 0) + 1, laps + 1):
        folder = _lap_dir(run, lap) if run is not None else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {"lap": lap}
        tick = time.perf_counter()
        samples_path = folder / "samples.safetensors" if folder is not None else None
        if samples_path is not None and samples_path.is_file():
            x = _load_samples(samples_path).to(_device(prior))
            record["samples_resumed"] = True
        else:
            stats: dict[str, float] = {}
            was_training = current.training
            current.eval()
            x = posterior_samples(
                current, observations, options.steps, options.sampler,
                maxiter=options.maxiter, tol=options.tol, solver=options.solver,
                batch_size=options.batch_size, grid=options.grid,
                safeguard=options.safeguard,
                covariance=gauss if options.covariance == "gaussian" else None,
                seed=seed * 7919 + lap,
                progress=progress, stats=stats,
                eta=options.eta, corrections=options.corrections, tau=options.tau,
                correct_above=options.correct_above,
            )
            current.train(was_training)
            record["solver_iterations"] = stats.get("iterations")
            if samples_path is not None:
                _save_samples(samples_path, x)
        record["sampling_seconds"] = time.perf_counter() - tick
        tick = time.perf_counter()
        x_all = x
        if accept is not None:
            keep = torch.as_tensor(accept(x), device=x.device)
            if keep.shape != (len(x),) or keep.dtype != torch.bool:
                raise ValueError(f"accept(x) must return booleans of shape ({len(x)},), got "
                                 f"{tuple(keep.shape)} of dtype {keep.dtype}")
            if not bool(keep.any()):
                raise ValueError(f"accept(x) rejected every posterior sample of lap {lap}")
            x = x[keep]
            record["accepted"] = float(keep.double().mean())
        if is_gaussian:
            prior = fit_gaussian(x, prior).to(_device(prior))
        else:
            history = train(prior, x.to(next(prior.parameters()).dtype), **training,
                            checkpoint=folder / "training" if folder is not None else None,
                            resume=True, seed=seed + lap, progress=progress)
            losses = history["loss"]
            if losses:
                tail = losses[-max(1, len(losses) // 10):]
                record["loss"] = sum(tail) / len(tail)
        record["training_seconds"] = time.perf_counter() - tick
        current = prior
        if metric is not None:
            record.update(_json_metrics(metric(lap, prior, x_all)))
        finish(lap, prior, record)
    return EMResult(prior=prior, gaussian=gauss, gaussian_log_likelihood=log_lik,
                    laps=records, out=run)


def _json_safe(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _json_safe(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_json_safe(v) for v in obj]
        return repr(obj)


# ---------------------------------------------------------------------------------------------
# configuration files (``plausible em CONFIG``)


@dataclass
class ObservationsConfig:
    """``[observations]``: the file written by :meth:`Observations.save`."""

    path: str


@dataclass
class EMSection:
    """``[em]``: the run folder, the laps and the Gaussian initialisation."""

    out: str
    laps: int = 8
    seed: int = 0
    gaussian_iterations: int = 32
    gaussian_rank: int | str | None = "auto"
    keep_samples: bool = False


@dataclass
class SamplingConfig:
    """``[sampling]``: :class:`SamplingOptions`."""

    steps: int = 64
    sampler: str = "ddpm"
    maxiter: int | None = 1
    tol: float = 1e-6
    solver: str = "gmres"
    batch_size: int = 256
    grid: str = "uniform"
    safeguard: bool = False
    covariance: str = "tweedie"
    eta: float | None = None
    corrections: int = 1
    tau: float = 0.25
    correct_above: float = 0.0


@dataclass
class EMTrainingConfig:
    """``[training]``: the arguments of :func:`plausible.fit` for each lap."""

    steps: int = 10_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int | None = None
    decay: str = "cosine"
    ema: float = 0.999
    clip: float | None = 1.0
    accumulate: int = 1
    precision: str = "fp32"
    compile: bool = False
    checkpoint_every: int = 1000
    keep: int = 1
    device: str | None = None
    t_distribution: str = "uniform"
    weighting: str = "edm"


@dataclass
class EMConfig:
    """A whole ``plausible em`` configuration: ``[model]`` (as ``plausible train``),
    ``[observations]``, ``[em]``, ``[sampling]``, ``[training]``.

    Example (TOML)::

        [model]
        backbone = "ResMLP"
        backbone_args = { features = 5, hidden = 256, blocks = 3 }
        shape = [5]

        [observations]
        path = "observations.safetensors"   # or .zarr (em.Observations.save)

        [em]
        out = "run/"
        laps = 8

        [sampling]
        steps = 64
        maxiter = 3

        [training]
        steps = 4000
        batch_size = 256
    """

    model: Any
    observations: ObservationsConfig
    em: EMSection
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    training: EMTrainingConfig = field(default_factory=EMTrainingConfig)


_SECTIONS = {"model": None, "observations": ObservationsConfig, "em": EMSection,
             "sampling": SamplingConfig, "training": EMTrainingConfig}


def parse_em_config(raw: dict) -> EMConfig:
    """Validates a mapping (as read from TOML/YAML) into an :class:`EMConfig`.

    Raises:
        plausible.config.ConfigError: Naming the first unknown, missing or mistyped field.
    """
    from .config import ConfigError, ModelConfig, _build, parse_config

    if not isinstance(raw, dict):
        raise ConfigError("an EM configuration must be a mapping with [model], [observations], "
                          "[em] (and optionally [sampling], [training])")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]} (expected {', '.join(_SECTIONS)})")
    for section in ("model", "observations", "em"):
        if section not in raw:
            raise ConfigError(f"missing section [{section}]")
    # [model] is checked as `plausible train` checks it (backbone, arguments, schedule)
    parse_config({"model": raw["model"], "data": {"path": "-"}, "training": {"out": "-"}})
    config = EMConfig(
        model=_build(ModelConfig, raw["model"], "model"),
        observations=_build(ObservationsConfig, raw["observations"], "observations"),
        em=_build(EMSection, raw["em"], "em"),
        sampling=_build(SamplingConfig, raw.get("sampling", {}), "sampling"),
        training=_build(EMTrainingConfig, raw.get("training", {}), "training"),
    )
    e, s, t = config.em, config.sampling, config.training
    if e.laps < 0 or e.gaussian_iterations < 0:
        raise ConfigError("fields em.laps and em.gaussian_iterations must be non-negative")
    rank = e.gaussian_rank
    if not (rank is None or rank in ("auto", "dense") or (isinstance(rank, int) and rank > 0)):
        raise ConfigError(f"field em.gaussian_rank must be 'auto', 'dense' or a positive "
                          f"integer, got {rank!r}")
    from .sampling import SAMPLERS

    for name, value, allowed in (("sampling.sampler", s.sampler, SAMPLERS),
                                 ("sampling.solver", s.solver, ("gmres", "cg")),
                                 ("sampling.grid", s.grid, ("uniform", "logsnr", "karras")),
                                 ("sampling.covariance", s.covariance, ("tweedie", "gaussian")),
                                 ("training.decay", t.decay, ("cosine", "linear", "constant")),
                                 ("training.precision", t.precision, ("fp32", "bf16")),
                                 ("training.t_distribution", t.t_distribution,
                                  ("uniform", "lognormal")),
                                 ("training.weighting", t.weighting, ("edm", "none"))):
        if value not in allowed:
            raise ConfigError(f"field {name} must be one of {tuple(allowed)}, got {value!r}")
    for name, value in (("sampling.steps", s.steps), ("sampling.batch_size", s.batch_size),
                        ("training.steps", t.steps), ("training.batch_size", t.batch_size),
                        ("training.accumulate", t.accumulate),
                        ("training.checkpoint_every", t.checkpoint_every)):
        if value < 1:
            raise ConfigError(f"field {name} must be positive")
    if s.maxiter is not None and s.maxiter < 0:
        raise ConfigError("field sampling.maxiter must be non-negative")
    if s.corrections < 0 or not s.tau > 0 or not s.correct_above >= 0:
        raise ConfigError("fields sampling.corrections and sampling.correct_above must be "
                          "non-negative and sampling.tau positive")
    return config


def read_em_config(path: str | os.PathLike) -> EMConfig:
    """Reads and validates a ``.toml``, ``.yaml`` or ``.yml`` EM configuration."""
    import tomllib

    from .config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no configuration file at {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
    else:
        raise ConfigError(f"{path}: expected a .toml, .yaml or .yml file")
    return parse_em_config(raw)


def run_config(config: EMConfig, resume: bool = False, progress: bool = True,
               base: str | os.PathLike | None = None) -> EMResult:
    """Runs :func:`fit` as ``config`` describes. Relative paths are taken from ``base``
    (the configuration file's folder) when given."""
    from .config import ConfigError, build_prior

    def where(p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() or base is None else Path(base) / path

    model = config.model
    if model.shape is None:
        if model.backbone == "ResMLP" and "features" in model.backbone_args:
            model.shape = [int(model.backbone_args["features"])]
        else:
            raise ConfigError("field model.shape is required for this backbone")
    prior = build_prior(model)
    try:
        observations = Observations.load(where(config.observations.path))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"field observations.path: {error}") from None
    t = asdict(config.training)
    device = t.pop("device")
    if device is not None:
        prior.to(device)
    return fit(prior, observations, config.em.laps,
               gaussian_iterations=config.em.gaussian_iterations,
               gaussian_rank=config.em.gaussian_rank,
               sampling=asdict(config.sampling), training=t, out=where(config.em.out),
               resume=resume, keep_samples=config.em.keep_samples, seed=config.em.seed,
               progress=progress)
