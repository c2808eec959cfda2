r"""Datasets for :func:`plausible.fit`.

Every dataset answers three questions: how many items it has (``len``), which items a step
uses (``draw_indices(n, generator)``: uniform with replacement by default, reproducible under
the generator), and what those items are (``batch(index, device, dtype)``: a tensor, or a
tuple of tensors for pairs). :func:`as_dataset` turns what a user passes to ``fit`` into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Dataset", "TensorData", "as_dataset"]


class Dataset:
    """Base of datasets: ``len``, ``draw_indices`` and ``batch``; ``state_shape`` is the shape
    of one training state (the first tensor of an item), or ``None`` if unknown."""

    state_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def draw_indices(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` item indices drawn uniformly with replacement, shape ``(n,)`` (int64, CPU)."""
        return torch.randint(0, len(self), (n,), generator=generator)

    def batch(
        self, index: Tensor, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor | tuple[Tensor, ...]:  # pragma: no cover
        raise NotImplementedError


class TensorData(Dataset):
    """In-memory data: a tensor ``(N, *S)`` or a tuple of tensors with a common first
    dimension (for example ``(theta, y)`` pairs). Floating-point tensors are cast to the
    training dtype; all are checked to be finite."""

    def __init__(self, *tensors: Tensor, name: str = "data") -> None:
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            raise ValueError(f"{name} must be a tensor or a tuple of tensors")
        n = tensors[0].shape[0] if tensors[0].dim() > 0 else 0
        for i, t in enumerate(tensors):
            if t.dim() < 2 and t.is_floating_point() and len(tensors) == 1:
                raise ValueError(f"{name} must have shape (N, *S) with at least 2 dimensions, "
                                 f"got {tuple(t.shape)}")
            if t.dim() == 0 or t.shape[0] != n:
                raise ValueError(f"{name}: all tensors must share their first dimension N = {n}, "
                                 f"tensor {i} has shape {tuple(t.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or infinity (tensor {i})")
        if n == 0:
            raise ValueError(f"{name} is empty")
        self.tensors = tensors
        self.state_shape = tuple(tensors[0].shape[1:])

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def batch(
        self, index: Tensor, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        out = []
        for t in self.tensors:
            b = t[index.to(t.device)]
            b = b.to(device=device, dtype=dtype if b.is_floating_point() else None,
                     non_blocking=True)
            out.append(b)
        return out[0] if len(out) == 1 else tuple(out)


def as_dataset(data: Any, shape: Sequence[int] | None = None, name: str = "data") -> Dataset:
    """Wraps ``data`` (a :class:`Dataset`, a tensor, or a tuple/list of tensors) and checks
    that its states have ``shape`` when it is known.

    Raises:
        ValueError: On an unknown kind of data, NaN, or a shape mismatch (naming both shapes).
    """
    if isinstance(data, Dataset):
        dataset = data
    elif isinstance(data, Tensor):
        if not data.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {data.dtype}")
        dataset = TensorData(data, name=name)
    elif isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        dataset = TensorData(*data, name=name)
    else:
        raise ValueError(
            f"{name} must be a tensor (N, *S), a tuple of tensors, or a plausible.data.Dataset; "
            f"got {type(data).__name__}"
        )
    if shape is not None and dataset.state_shape is not None and \
            tuple(dataset.state_shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape (N, {', '.join(map(str, shape))}), got states of shape "
            f"{tuple(dataset.state_shape)}"
        )
    return dataset
