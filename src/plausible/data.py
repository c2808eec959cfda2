r"""Datasets for :func:`plausible.fit`.

Every dataset answers three questions: how many items it has (``len``), which items a step
uses (``draw_indices(n, generator)``: uniform with replacement by default, reproducible under
the generator), and what those items are (``batch(index, device, dtype)``: a tensor, or a
tuple of tensors for pairs). :func:`as_dataset` turns what a user passes to ``fit`` into one.

In data-parallel training every process calls ``draw_indices`` and ``batch`` for the *global*
batch and keeps its slice, so ``batch`` is a deterministic function of the indices.

Datasets:

* :class:`TensorData`: tensors in memory, ``(N, *S)`` or pairs ``(theta, y)``.
* :class:`ZarrData`: a chunked zarr array ``(N, *S)`` (or arrays of a group, for pairs) on
  disk, read chunk by chunk with a bounded LRU cache; never loaded whole.
* :class:`Windows`: windows of ``length`` consecutive states of trajectories ``(N, L, *S)``.
* :class:`SimulatorStream`: an infinite stream of ``(theta, y)`` pairs simulated on the fly.
* :class:`Subset`: the items of another dataset at given indices; :func:`random_split` cuts a
  dataset into a training and a held-out part (``fit(..., validation=0.1)``).

:func:`write_zarr` writes tensors to a zarr store chunked along the first axis.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "TensorData",
    "Subset",
    "random_split",
    "ZarrData",
    "Windows",
    "SimulatorStream",
    "as_dataset",
    "write_zarr",
    "parse_bytes",
]

_Device = torch.device | str | None


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


class Subset(Dataset):
    """The items ``indices`` of ``dataset``, renumbered ``0 .. len(indices) - 1``."""

    def __init__(self, dataset: Dataset, indices: Tensor | Sequence[int]) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError("dataset must be a plausible.data.Dataset, got "
                            f"{type(dataset).__name__}")
        indices = torch.as_tensor(indices, dtype=torch.int64).flatten()
        if indices.numel() == 0:
            raise ValueError("a Subset needs at least one index")
        n = len(dataset)
        if int(indices.min()) < 0 or int(indices.max()) >= n:
            raise ValueError(f"Subset indices must lie in [0, {n}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        self.dataset, self.indices = dataset, indices
        self.state_shape = dataset.state_shape

    def __len__(self) -> int:
        return self.indices.numel()

    def batch(
        self, index: Tensor, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        return self.dataset.batch(self.indices[index.cpu()], device=device, dtype=dtype)


def random_split(dataset: Dataset, fraction: float,
                 generator: torch.Generator | None = None) -> tuple[Subset, Subset]:
    """Splits a finite dataset at random into ``(train, held_out)``, with
    ``max(1, round(fraction * N))`` held-out items.

    Raises:
        ValueError: If ``fraction`` is not in (0, 1), or either part would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    if isinstance(dataset, SimulatorStream):
        raise ValueError("a simulator stream has no fixed items to hold out: pass validation "
                         "data explicitly (for example simulated pairs)")
    n = len(dataset)
    n_out = max(1, round(fraction * n))
    if n_out >= n:
        raise ValueError(f"cannot hold out {n_out} of {n} items and keep some for training")
    order = torch.randperm(n, generator=generator)
    return Subset(dataset, order[n_out:]), Subset(dataset, order[:n_out])


# ----------------------------------------------------------------------------------------------
# Helpers


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(size: int | float | str) -> int:
    """A number of bytes from an int or a string such as ``"512MB"``, ``"2 GB"``, ``"1.5GiB"``
    or ``"100kB"`` (kB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024).

    Raises:
        ValueError: On a negative size or a string that is not a size.
    """
    if isinstance(size, bool):
        raise ValueError(f"memory size must be a number of bytes or a string like '2GB', "
                         f"got {size!r}")
    if isinstance(size, (int, float)):
        value = float(size)
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"cannot parse the memory size {size!r}: expected a number of "
                             "bytes or a string like '512MB', '2GB' or '1GiB'")
        value = float(match.group(1)) * _UNITS[unit]
    else:
        raise ValueError(f"memory size must be a number of bytes or a string like '2GB', "
                         f"got {type(size).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"memory size must be non-negative, got {size!r}")
    return int(value)


def _import_zarr() -> Any:
    try:
        import zarr
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("zarr data needs the zarr package: pip install 'zarr>=3'") from error
    return zarr


def _is_zarr(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "zarr"


def _is_zarr_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike)) and \
        os.fspath(obj).rstrip("/\\").endswith(".zarr")


def _check_finite_rows(out: np.ndarray | Tensor, rows: np.ndarray, name: str) -> None:
    """Raises naming the dataset ``rows`` of ``out`` ``(B, ...)`` that hold NaN or inf."""
    if isinstance(out, Tensor):
        if not out.is_floating_point():
            return
        bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
        bad_np = bad.cpu().numpy()
    else:
        if not np.issubdtype(out.dtype, np.floating):
            return
        bad_np = ~np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1)
    if bad_np.any():
        where = sorted({int(r) for r in rows[bad_np]})
        shown = ", ".join(map(str, where[:10])) + (", ..." if len(where) > 10 else "")
        raise ValueError(f"{name} contains NaN or infinity in rows [{shown}]")


def _to_tensor(array: np.ndarray, device: _Device, dtype: torch.dtype | None) -> Tensor:
    t = torch.from_numpy(array)
    return t.to(device=device, dtype=dtype if t.is_floating_point() else None)


def _rows(index: Tensor | np.ndarray | Sequence[int], n: int, name: str) -> np.ndarray:
    """``index`` as an int64 numpy array in ``[0, n)`` (negative indices count from the end)."""
    rows = index.detach().cpu().numpy() if isinstance(index, Tensor) else np.asarray(index)
    if rows.dtype == np.bool_ or not np.issubdtype(rows.dtype, np.integer):
        raise IndexError(f"{name}: indices must be integers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64).reshape(-1)
    if rows.size and (rows.min() < -n or rows.max() >= n):
        bad = rows[(rows < -n) | (rows >= n)]
        raise IndexError(f"{name}: index {int(bad[0])} is out of range for {n} items")
    return np.where(rows < 0, rows + n, rows)


# ----------------------------------------------------------------------------------------------
# Zarr


class ZarrData(Dataset):
    r"""A chunked on-disk array ``(N, *S)`` (zarr), or several arrays with a common first
    dimension (pairs ``(theta, y)`` stored in a group), read lazily.

    ``batch(index)`` reads only the chunks (blocks of rows along axis 0) that contain the
    requested rows, each once, and gathers the rows in the requested order (repeats allowed).
    Decoded chunks are kept in an LRU cache of at most ``memory_budget`` bytes; a chunk larger
    than the budget is read for the batch and not kept. The counters :attr:`bytes_read`
    (decoded bytes read from the store), :attr:`chunks_read` and :attr:`peak_cache_bytes`
    (largest size the cache reached, ``<= memory_budget``) are for monitoring and tests.

    Arguments:
        path_or_array: Path of a zarr store (array or group), a ``zarr.Array`` or
            ``zarr.Group``, or any array-like with ``shape``, ``dtype`` and numpy slicing
            along axis 0 (e.g. an ``h5py`` dataset or a memory map).
        key: For a group: the name of the array (a string), or names of arrays returned as a
            tuple (e.g. ``("theta", "y")``). Optional when the group holds a single array.
        keys: Same as a sequence ``key`` (give one of the two).
        memory_budget: Bytes for the chunk cache: an int or a string like ``"512MB"``.
        check_finite: Check every batch for NaN / infinity (error naming the rows).
        name: Name of the data in error messages.

    Raises:
        FileNotFoundError: If the path holds no zarr store (naming the path).
        KeyError: If a key is not an array of the group (listing the arrays).
        ValueError: If the first array is not floating-point with at least 2 dimensions, the
            arrays do not share their first dimension, or the data are empty.
    """

    def __init__(
        self,
        path_or_array: str | os.PathLike | Any,
        key: str | Sequence[str] | None = None,
        memory_budget: int | str = "1GB",
        check_finite: bool = False,
        name: str = "data",
        *,
        keys: Sequence[str] | None = None,
    ) -> None:
        if key is not None and keys is not None:
            raise ValueError("give key or keys, not both")
        if keys is not None:
            key = tuple(keys)
        self.name = name
        self.memory_budget = parse_bytes(memory_budget)
        self.check_finite = bool(check_finite)
        self.path: str | None = None
        source = path_or_array
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            source = self._open(self.path)
        elif _is_zarr(source):
            store_path = getattr(source, "store_path", None)
            self.path = str(store_path) if store_path is not None else None
        where = f"{name} ({self.path})" if self.path else name
        self._where = where
        self.arrays, self.keys = self._select(source, key, where)

        first = self.arrays[0]
        dtype0 = np.dtype(first.dtype)
        if not np.issubdtype(dtype0, np.floating):
            raise ValueError(f"{where} must be a floating-point array, got dtype {dtype0}")
        if len(first.shape) < 2:
            raise ValueError(f"{where} must have shape (N, *S) with at least 2 dimensions, "
                             f"got {tuple(first.shape)}")
        n = int(first.shape[0])
        for k, arr in zip(self.keys, self.arrays):
            shape = tuple(int(s) for s in arr.shape)
            dt = np.dtype(arr.dtype)
            if len(shape) == 0 or shape[0] != n:
                raise ValueError(f"{where}: all arrays must share their first dimension N = "
                                 f"{n}, array {k!r} has shape {shape}")
            if not (np.issubdtype(dt, np.number) or dt == np.bool_):
                raise ValueError(f"{where}: array {k!r} has non-numeric dtype {dt}")
        if n == 0:
            raise ValueError(f"{where} is empty")
        self._n = n
        self.state_shape = tuple(int(s) for s in first.shape[1:])
        self._dtypes = [np.dtype(a.dtype).newbyteorder("=") for a in self.arrays]
        self._row_bytes = [
            dt.itemsize * math.prod(int(s) for s in a.shape[1:])
            for dt, a in zip(self._dtypes, self.arrays)
        ]
        self.chunk_rows = [self._chunk_rows(a, rb) for a, rb in zip(self.arrays, self._row_bytes)]
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.cache_bytes = 0
        self.peak_cache_bytes = 0
        self.bytes_read = 0
        self.chunks_read = 0

    # -- opening ---------------------------------------------------------------------------

    @staticmethod
    def _open(path: str) -> Any:
        zarr = _import_zarr()
        if not os.path.exists(path) and "://" not in path:
            raise FileNotFoundError(f"no zarr store at {path}: the path does not exist")
        try:
            return zarr.open(path, mode="r")
        except (FileNotFoundError, KeyError) as error:
            raise FileNotFoundError(f"no zarr array or group at {path}: {error}") from None
        except Exception as error:
            if type(error).__name__.endswith("NotFoundError"):
                raise FileNotFoundError(f"no zarr array or group at {path}: {error}") from None
            raise

    @staticmethod
    def _select(source: Any, key: str | Sequence[str] | None,
                where: str) -> tuple[list[Any], tuple[str | None, ...]]:
        is_group = hasattr(source, "array_keys") or (
            isinstance(source, Mapping) and not hasattr(source, "shape"))
        if not is_group:
            if key is not None:
                raise ValueError(f"{where} is an array, not a group: key {key!r} cannot select "
                                 "an array in it")
            if not (hasattr(source, "shape") and hasattr(source, "dtype")
                    and hasattr(source, "__getitem__")):
                raise ValueError(f"{where} must be a zarr array or group (or a path to one), "
                                 f"got {type(source).__name__}")
            return [source], (None,)
        names = sorted(source.array_keys()) if hasattr(source, "array_keys") \
            else sorted(source.keys())
        if key is None:
            if len(names) != 1:
                raise ValueError(f"{where} is a group with arrays {names}: pass key='name' (or "
                                 "keys=('theta', 'y') for pairs)")
            key = names[0]
        selected = (key,) if isinstance(key, str) else tuple(key)
        if not selected:
            raise ValueError(f"{where}: keys must not be empty")
        arrays = []
        for k in selected:
            if k not in names:
                raise KeyError(f"{where} has no array {k!r}; its arrays are {names}")
            arrays.append(source[k])
        return arrays, selected

    @staticmethod
    def _chunk_rows(array: Any, row_bytes: int) -> int:
        """Rows read at a time along axis 0: the array's chunking, else about 1 MiB."""
        chunks = getattr(array, "chunks", None)
        if chunks:
            return max(1, int(chunks[0]))
        return max(1, min(int(array.shape[0]), (1 << 20) // max(row_bytes, 1)))

    # -- protocol --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        keys = "" if self.keys == (None,) else f", keys={self.keys}"
        return (f"ZarrData({self.path or type(self.arrays[0]).__name__!s}{keys}, "
                f"shape=({self._n}, {', '.join(map(str, self.state_shape))}), "
                f"chunk_rows={self.chunk_rows[0]}, memory_budget={self.memory_budget})")

    def batch(
        self, index: Tensor, device: _Device = None, dtype: torch.dtype | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """The rows ``index`` ``(B,)``: a tensor ``(B, *S)`` (or a tuple, one per key), floating
        arrays cast to ``dtype``, on ``device``."""
        rows = _rows(index, self._n, self._where)
        out = []
        for k in range(len(self.arrays)):
            array = self.take(k, rows)
            if self.check_finite:
                _check_finite_rows(array, rows, self._where)
            out.append(_to_tensor(array, device, dtype))
        return out[0] if len(out) == 1 else tuple(out)

    # -- reading ---------------------------------------------------------------------------

    def clear_cache(self) -> None:
        """Drops every cached chunk (counters are kept)."""
        self._cache.clear()
        self.cache_bytes = 0

    def _chunk(self, k: int, c: int) -> np.ndarray:
        """Decoded chunk ``c`` of array ``k`` (rows ``c * r`` to ``(c + 1) * r``), via the
        cache."""
        cached = self._cache.get((k, c))
        if cached is not None:
            self._cache.move_to_end((k, c))
            return cached
        r = self.chunk_rows[k]
        block = np.asarray(self.arrays[k][c * r: min((c + 1) * r, self._n)])
        self.bytes_read += block.nbytes
        self.chunks_read += 1
        if block.nbytes <= self.memory_budget:
            while self._cache and self.cache_bytes + block.nbytes > self.memory_budget:
                _, old = self._cache.popitem(last=False)
                self.cache_bytes -= old.nbytes
            self._cache[(k, c)] = block
            self.cache_bytes += block.nbytes
            self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)
        return block

    def take(self, k: int, rows: np.ndarray, starts: np.ndarray | None = None,
             length: int | None = None) -> np.ndarray:
        """Gathers rows ``rows`` ``(B,)`` (in ``[0, N)``, any order, repeats allowed) of array
        ``k``: ``(B, *S_k)``; with ``starts`` ``(B,)`` and ``length``, only the slices
        ``[start, start + length)`` along axis 1 of each row: ``(B, length, *S_k[1:])``.

        Every needed chunk is read (or found in the cache) once."""
        shape = tuple(int(s) for s in self.arrays[k].shape[1:])
        if starts is not None:
            shape = (int(length),) + shape[1:]
        out = np.empty((len(rows),) + shape, dtype=self._dtypes[k])
        if len(rows) == 0:
            return out
        r = self.chunk_rows[k]
        chunk_of = rows // r
        order = np.argsort(chunk_of, kind="stable")
        sorted_chunks = chunk_of[order]
        bounds = np.flatnonzero(np.diff(sorted_chunks)) + 1
        for group in np.split(order, bounds):
            c = int(chunk_of[group[0]])
            block = self._chunk(k, c)
            local = rows[group] - c * r
            if starts is None:
                out[group] = block[local]
            else:
                steps = starts[group][:, None] + np.arange(length)
                out[group] = block[local[:, None], steps]
        return out


# ----------------------------------------------------------------------------------------------
# Windows


class Windows(Dataset):
    r"""Random windows of ``length`` consecutive states of trajectories ``(N, L, *S)``.

    Item ``i`` is the window of trajectory ``i // W`` starting at ``i % W``, with
    ``W = L - length + 1`` windows per trajectory; ``draw_indices`` draws uniformly among the
    ``N W`` windows. ``batch`` returns ``(B, length, *S)``, or with ``flatten=True``
    ``(B, length * S_0, *S[1:])`` (time merged into the first state axis, e.g. the channels
    of fields ``(C, H, W)``; ``(B, length)`` for scalar states).

    Arguments:
        trajectories: A floating tensor ``(N, L, *S)`` (kept in memory, checked finite), a
            :class:`ZarrData` of one array ``(N, L, *S)``, or a zarr array / path (opened as
            :class:`ZarrData`; only the chunks of the drawn trajectories are read).
        length: Window length, ``1 <= length <= L``.
        flatten: Merge time into the first state axis.
        name: Name of the data in error messages.

    Raises:
        ValueError: On trajectories with fewer than 2 dimensions, non-floating, non-finite or
            empty, or a length outside ``[1, L]``.
    """

    def __init__(self, trajectories: Tensor | ZarrData | Any, length: int,
                 flatten: bool = False, name: str = "trajectories") -> None:
        self.name = name
        if isinstance(trajectories, np.ndarray):
            trajectories = torch.from_numpy(trajectories)
        if isinstance(trajectories, Tensor):
            if not trajectories.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got "
                                 f"{trajectories.dtype}")
            if trajectories.dim() < 2:
                raise ValueError(f"{name} must have shape (N, L, *S) with at least 2 "
                                 f"dimensions, got {tuple(trajectories.shape)}")
            if trajectories.numel() == 0:
                raise ValueError(f"{name} is empty")
            if not torch.isfinite(trajectories).all():
                raise ValueError(f"{name} contains NaN or infinity")
            full = tuple(trajectories.shape)
        else:
            if not isinstance(trajectories, ZarrData):
                trajectories = ZarrData(trajectories, name=name)
            if len(trajectories.arrays) != 1:
                raise ValueError(f"{name}: windows need a single array of trajectories, got "
                                 f"keys {trajectories.keys}")
            full = (len(trajectories), *trajectories.state_shape)
        self.source = trajectories
        n, steps = int(full[0]), int(full[1])
        if isinstance(length, bool) or int(length) != length:
            raise ValueError(f"window length must be an integer, got {length!r}")
        length = int(length)
        if not 1 <= length <= steps:
            raise ValueError(f"window length must be in [1, L] = [1, {steps}] for {name} of "
                             f"shape (N, L, *S) = {full}, got {length}")
        self.n_trajectories, self.trajectory_length = n, steps
        self.length = length
        self.per_trajectory = steps - length + 1
        self.flatten = bool(flatten)
        states = full[2:]
        if self.flatten:
            self.state_shape = (length * states[0], *states[1:]) if states else (length,)
        else:
            self.state_shape = (length, *states)

    def __len__(self) -> int:
        return self.n_trajectories * self.per_trajectory

    def locate(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(trajectory, start) of the windows ``index`` ``(B,)``: two int64 tensors ``(B,)``."""
        index = torch.as_tensor(index, dtype=torch.int64).cpu().reshape(-1)
        return index // self.per_trajectory, index % self.per_trajectory

    def batch(
        self, index: Tensor, device: _Device = None, dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Windows ``index`` ``(B,)``: ``(B, length, *S)`` (or flattened, see the class)."""
        rows = _rows(index, len(self), self.name)
        traj, start = rows // self.per_trajectory, rows % self.per_trajectory
        if isinstance(self.source, Tensor):
            src = self.source
            t = torch.from_numpy(traj).to(src.device)
            s = torch.from_numpy(start).to(src.device)
            out = src[t[:, None], s[:, None] + torch.arange(self.length, device=src.device)]
            out = out.to(device=device, dtype=dtype)
        else:
            array = self.source.take(0, traj, start, self.length)
            if self.source.check_finite:
                _check_finite_rows(array, traj, self.source._where)
            out = _to_tensor(array, device, dtype)
        if self.flatten:
            out = out.reshape(out.shape[0], *self.state_shape)
        return out


# ----------------------------------------------------------------------------------------------
# Simulation


class SimulatorStream(Dataset):
    r"""An infinite stream of pairs ``(theta, y)`` simulated on the fly:
    ``theta = prior(n, generator)`` ``(n, *T)`` and ``y = simulator(theta, generator)``
    ``(n, *Y)``.

    An item index is a seed: ``draw_indices(n, generator)`` draws ``n`` int64 seeds, and
    ``batch(index)`` simulates item ``i`` with a generator seeded by ``index[i]``, one item at
    a time, so an item does not depend on the batch it is in (exact resume and data-parallel
    slicing hold). ``batched=True`` instead simulates the whole batch at once with a
    generator seeded from all the indices (faster; still deterministic given the indices, but
    an item then depends on the whole batch).

    A stream has no length: use a finite dataset (e.g. :class:`TensorData` of simulated pairs)
    for validation.

    Arguments:
        prior: ``prior(n, generator) -> theta`` ``(n, *T)``.
        simulator: ``simulator(theta, generator) -> y`` ``(n, *Y)``.
        batched: See above.
        check: Check every batch for the batch size, shapes and finite values.
        name: Name of the stream in error messages.

    Raises:
        ValueError: If the prior or the simulator returns a non-tensor, the wrong batch size,
            or non-finite values (also on the trial item simulated at construction, which
            sets :attr:`state_shape` and :attr:`observation_shape`).
    """

    def __init__(
        self,
        prior: Callable[[int, torch.Generator], Tensor],
        simulator: Callable[[Tensor, torch.Generator], Tensor],
        batched: bool = False,
        check: bool = True,
        name: str = "stream",
    ) -> None:
        if not callable(prior) or not callable(simulator):
            raise TypeError("prior and simulator must be callables")
        self.prior, self.simulator = prior, simulator
        self.batched, self.check, self.name = bool(batched), bool(check), name
        theta, y = self._simulate(1, torch.Generator().manual_seed(0), seeds=[0], check=True)
        self.state_shape = tuple(theta.shape[1:])
        self.observation_shape = tuple(y.shape[1:])

    def __len__(self) -> int:
        raise TypeError(
            f"{self.name} is a SimulatorStream, an infinite stream of simulations: it has no "
            "length; for validation or anything that iterates over a dataset, pass a finite "
            "one (e.g. TensorData(theta, y) of simulated pairs)"
        )

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (f"SimulatorStream(theta {self.state_shape}, y {self.observation_shape}, "
                f"batched={self.batched})")

    def draw_indices(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` random seeds in ``[0, 2^63 - 1)``, shape ``(n,)`` (int64, CPU)."""
        return torch.randint(0, 2**63 - 1, (n,), generator=generator, dtype=torch.int64)

    def _simulate(self, n: int, generator: torch.Generator, seeds: Sequence[int],
                  check: bool) -> tuple[Tensor, Tensor]:
        theta = self.prior(n, generator)
        if check:
            self._check(theta, n, "prior", seeds)
        y = self.simulator(theta, generator)
        if check:
            self._check(y, n, "simulator", seeds)
        return theta, y

    def _check(self, value: Any, n: int, what: str, seeds: Sequence[int]) -> None:
        call = "prior(n, generator)" if what == "prior" else "simulator(theta, generator)"
        if not isinstance(value, Tensor):
            raise ValueError(f"{self.name}: {call} must return a tensor, got "
                             f"{type(value).__name__}")
        if value.dim() == 0 or value.shape[0] != n:
            raise ValueError(f"{self.name}: {call} must return a batch of n = {n} items "
                             f"(n, ...), got shape {tuple(value.shape)}")
        if what == "prior" and not value.is_floating_point():
            raise ValueError(f"{self.name}: {call} must return floating-point theta, got "
                             f"{value.dtype}")
        if value.is_floating_point():
            bad = ~torch.isfinite(value.reshape(n, -1)).all(dim=1)
            if bad.any():
                which = [int(s) for s, b in zip(seeds, bad.tolist()) if b][:5]
                raise ValueError(f"{self.name}: {call} returned NaN or infinity (seeds "
                                 f"{which})")

    def batch(
        self, index: Tensor, device: _Device = None, dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Simulates the items with seeds ``index`` ``(B,)``: ``(theta (B, *T), y (B, *Y))``,
        floating tensors cast to ``dtype``, on ``device``."""
        seeds = torch.as_tensor(index, dtype=torch.int64).cpu().reshape(-1).tolist()
        if self.batched:
            combined = int(np.random.SeedSequence(
                [s % 2**64 for s in seeds] or [0]).generate_state(1, np.uint64)[0])
            theta, y = self._simulate(len(seeds), torch.Generator().manual_seed(combined),
                                      seeds, self.check)
        else:
            thetas, ys = [], []
            for s in seeds:
                th, yy = self._simulate(1, torch.Generator().manual_seed(s % 2**64), [s],
                                        self.check)
                if self.check and (tuple(th.shape[1:]) != self.state_shape
                                   or tuple(yy.shape[1:]) != self.observation_shape):
                    raise ValueError(
                        f"{self.name}: simulated shapes changed: theta {tuple(th.shape[1:])}"
                        f" and y {tuple(yy.shape[1:])} for seed {s}, expected "
                        f"{self.state_shape} and {self.observation_shape}")
                thetas.append(th)
                ys.append(yy)
            if not seeds:
                thetas = [torch.empty(0, *self.state_shape)]
                ys = [torch.empty(0, *self.observation_shape)]
            theta, y = torch.cat(thetas), torch.cat(ys)
        if self.check and (tuple(theta.shape[1:]) != self.state_shape
                           or tuple(y.shape[1:]) != self.observation_shape):
            raise ValueError(f"{self.name}: simulated shapes changed: theta "
                             f"{tuple(theta.shape[1:])} and y {tuple(y.shape[1:])}, expected "
                             f"{self.state_shape} and {self.observation_shape}")
        theta = theta.to(device=device, dtype=dtype if theta.is_floating_point() else None)
        y = y.to(device=device, dtype=dtype if y.is_floating_point() else None)
        return theta, y


# ----------------------------------------------------------------------------------------------
# Writing and wrapping


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    array = np.ascontiguousarray(np.asarray(value))
    if array.ndim == 0:
        raise ValueError(f"{name} must have a first dimension N, got a scalar")
    return array


def _chunks_for(array: np.ndarray, chunks: int | Sequence[int] | None,
                target: int = 2 << 20) -> tuple[int, ...]:
    if chunks is None:
        row_bytes = max(1, array.itemsize * math.prod(array.shape[1:]))
        rows = max(1, min(array.shape[0], target // row_bytes))
        return (rows, *array.shape[1:])
    if isinstance(chunks, int):
        if chunks < 1:
            raise ValueError(f"chunks must be positive, got {chunks}")
        return (min(chunks, max(array.shape[0], 1)), *array.shape[1:])
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != array.ndim or min(chunks) < 1:
        raise ValueError(f"chunks {chunks} do not fit an array of shape {array.shape}")
    return chunks


def write_zarr(
    path: str | os.PathLike,
    data: Tensor | np.ndarray | Mapping[str, Tensor | np.ndarray],
    chunks: int | Sequence[int] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes a tensor / array ``(N, *S)`` to a zarr array at ``path``, or a dict of them to
    a zarr group (one array per key, e.g. ``{"theta": ..., "y": ...}`` for pairs).

    Arguments:
        chunks: Rows per chunk along axis 0 (an int; other axes whole), or a full chunk shape;
            default about 2 MiB per chunk.
        overwrite: Replace an existing store (otherwise :class:`FileExistsError`).

    Returns:
        The path, ready for :class:`ZarrData` (``ZarrData(path, keys=("theta", "y"))``).
    """
    zarr = _import_zarr()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("write_zarr: the dict of arrays is empty")
        group = zarr.open_group(str(path), mode="w")
        for key, value in data.items():
            array = _as_numpy(value, f"data[{key!r}]")
            group.create_array(str(key), data=array, chunks=_chunks_for(array, chunks))
    else:
        array = _as_numpy(data, "data")
        zarr.create_array(str(path), data=array, chunks=_chunks_for(array, chunks),
                          overwrite=True)
    return path


def as_dataset(data: Any, shape: Sequence[int] | None = None, name: str = "data") -> Dataset:
    """Wraps ``data`` (a :class:`Dataset`, a tensor, a tuple/list of tensors, a zarr array,
    or the path of a zarr store ending in ``.zarr``, opened as :class:`ZarrData`) and checks
    that its states have ``shape`` when it is known.

    Raises:
        ValueError: On an unknown kind of data, NaN, or a shape mismatch (naming both shapes).
        FileNotFoundError: On a ``.zarr`` path that holds no store.
    """
    if isinstance(data, Dataset):
        dataset = data
    elif isinstance(data, Tensor):
        if not data.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {data.dtype}")
        dataset = TensorData(data, name=name)
    elif isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        dataset = TensorData(*data, name=name)
    elif _is_zarr_path(data) or _is_zarr(data):
        dataset = ZarrData(data, name=name)
    else:
        raise ValueError(
            f"{name} must be a tensor (N, *S), a tuple of tensors, or a plausible.data.Dataset; "
            f"got {type(data).__name__} (zarr stores are accepted as a path ending in .zarr "
            "or a zarr array)"
        )
    if shape is not None and dataset.state_shape is not None and \
            tuple(dataset.state_shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape (N, {', '.join(map(str, shape))}), got states of shape "
            f"{tuple(dataset.state_shape)}"
        )
    return dataset
