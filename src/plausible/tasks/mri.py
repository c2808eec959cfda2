r"""Accelerated MRI on real brain slices, offline: the MNI152 T1 template and k-space masks.

Data. The ``nilearn`` wheel ships the ICBM 2009a symmetric MNI152 T1 template
(``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, 197 x 233 x 189
voxels of 1 mm, skull-stripped, 8-bit intensities). Fetch the wheel once with the package
registry's client and install ``nibabel`` to read NIfTI files,

.. code-block:: bash

    pip download --no-deps nilearn -d ~/.cache/plausible/wheels
    pip install nibabel

then :func:`load_mni_volume` reads the volume from the wheel (a zip file; nothing of nilearn is
imported or run) and caches it as a plain ``.npz``, and :func:`load_mni_slices` cuts it into
2-D slices along one axis, crops the brain's bounding square, resizes it to ``size x size``
and splits the slices into training and held-out sets by slice index.

Observations (accelerated MRI): :math:`y = m \odot \mathcal{F}(x) + \epsilon` with the
orthonormal 2-D FFT and a k-space mask ``m`` per item (:func:`kspace_masks`: a fully sampled
centre and random lines or points elsewhere, 4-6x acceleration), applied with
:class:`plausible.ops.FourierMask`. :func:`zero_filled` is the classical baseline
:math:`A^\top y = \operatorname{Re} \mathcal{F}^{-1}(m \odot y)`; :func:`psnr` and
:func:`ssim` score reconstructions against the truth.

Empirical Bayes: in the real orthonormal Fourier basis (:func:`real_fourier`) every k-space
mask is a selection, so a Gaussian prior with a free mean image and a covariance diagonal in
that basis (:class:`FourierGaussian`) has closed-form posteriors and evidence, and
:func:`fourier_gaussian_em` fits it exactly from the observations: the lap 0 of
:func:`plausible.em.fit` on MRI data (``gaussian=...denoiser()``, an FFT-based exact
denoiser).
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoisers import Denoiser, GaussianDenoiser
from ..schedules import Schedule, VPSchedule
from .mnist import WheelNotFoundError, default_cache

__all__ = [
    "MNI_MEMBER",
    "load_mni_volume",
    "load_mni_slices",
    "heldout_slices",
    "kspace_masks",
    "observe",
    "real_fourier",
    "real_fourier_inverse",
    "FourierGaussian",
    "FourierGaussianDenoiser",
    "fourier_gaussian_em",
    "zero_filled",
    "psnr",
    "ssim",
]

MNI_MEMBER = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_SHAPE = (197, 233, 189)


def _cache_dir(cache: str | os.PathLike[str] | None) -> Path:
    return default_cache() if cache is None else Path(cache)


def _find_wheel(cache: Path) -> Path:
    for folder in (cache / "wheels", cache):
        found = sorted(folder.glob("nilearn-*-py3-none-any.whl"))
        if found:
            return found[-1]
    raise WheelNotFoundError(
        f"the MNI152 brain template needs a nilearn wheel in {cache / 'wheels'}; fetch it once "
        f"with\n    pip download --no-deps nilearn -d {cache / 'wheels'}\n"
        "and install nibabel (pip install nibabel) to read it (or set PLAUSIBLE_CACHE to the "
        "folder above 'wheels/' that holds it)"
    )


def load_mni_volume(cache: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The MNI152 T1 template as a float32 array ``(197, 233, 189)`` (axes x: left-right,
    y: posterior-anterior, z: inferior-superior; 1 mm voxels; intensities 0-255, zero
    outside the brain).

    The first call reads it from the nilearn wheel in ``cache/wheels/`` with nibabel and
    writes ``cache/mni152_t1.npz``; later calls read that file (``allow_pickle=False``).

    Raises:
        WheelNotFoundError: If no nilearn wheel is there (the message gives the pip command).
        ImportError: If nibabel is needed (first call) and not installed.
    """
    folder = _cache_dir(cache)
    npz = folder / "mni152_t1.npz"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as f:
            volume = f["volume"] if "volume" in f.files else None
        if volume is not None and volume.shape == _SHAPE:
            return volume.astype(np.float32)
    wheel = _find_wheel(folder)
    try:
        import nibabel
    except ImportError as error:
        raise ImportError("reading the MNI152 template needs nibabel: pip install nibabel") \
            from error
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = gzip.decompress(z.read(MNI_MEMBER))
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise ValueError(f"{wheel} does not hold {MNI_MEMBER}: {error}") from error
    image = nibabel.Nifti1Image.from_bytes(raw)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    if volume.shape != _SHAPE or not np.isfinite(volume).all() or volume.min() < 0:
        raise ValueError(f"unexpected MNI152 volume: shape {volume.shape}, expected {_SHAPE}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"mni152_t1.{os.getpid()}.tmp.npz"
    np.savez(tmp, volume=volume.astype(np.uint8) if np.array_equal(volume, np.round(volume))
             and volume.max() <= 255 else volume)
    os.replace(tmp, npz)
    return volume


def heldout_slices(index: Tensor, block: int = 8, period: int = 4) -> Tensor:
    r"""Which slices are held out: slice ``k`` is held out when ``(k // block) % period ==
    period // 2`` (blocks of ``block`` consecutive slices, one block in ``period``, spread over
    the whole brain). Returns a boolean tensor of ``index``'s shape."""
    if block < 1 or period < 2:
        raise ValueError(f"block must be >= 1 and period >= 2, got {block}, {period}")
    return (torch.div(index, block, rounding_mode="floor") % period) == period // 2


def load_mni_slices(
    size: int = 64,
    axis: int = 2,
    cache: str | os.PathLike[str] | None = None,
    *,
    split: str = "all",
    min_fraction: float = 0.1,
    block: int = 8,
    period: int = 4,
    gap: int = 2,
    signed: bool = True,
    volume: np.ndarray | None = None,
) -> tuple[Tensor, Tensor]:
    r"""2-D slices of the MNI152 T1 template, resized to ``size x size`` and normalised.

    Each slice along ``axis`` (2: axial, 1: coronal, 0: sagittal) is shown with the second
    in-plane axis pointing up (anterior or superior at the top); the square box around the
    brain's bounding box in the whole volume (the same for every slice, zero-padded) is resized
    to ``size x size`` (bilinear with antialiasing). Intensities :math:`v \in [0, 255]` become
    :math:`v / 255 \in [0, 1]`, or :math:`2 v / 255 - 1 \in [-1, 1]` when ``signed``. Slices
    whose brain covers less than ``min_fraction`` of the box are dropped.

    Split by slice index (see :func:`heldout_slices`): ``"test"`` is the held-out blocks,
    ``"train"`` the other slices at more than ``gap`` slices from any held-out one, ``"all"``
    every kept slice.

    Arguments:
        size: The output side in pixels.
        axis: The slicing axis of the volume.
        cache: The cache folder (see :func:`load_mni_volume`).
        split: ``"train"``, ``"test"`` or ``"all"``.
        min_fraction: The least brain fraction of a kept slice.
        block, period: The held-out blocks (:func:`heldout_slices`).
        gap: Slices next to a held-out block left out of ``"train"``.
        signed: Values in [-1, 1] (default) or [0, 1].
        volume: A volume to slice instead of the template (for tests), non-negative, 0-255.

    Returns:
        ``(slices, index)``: float32 ``(N, 1, size, size)`` and the int64 slice indices
        ``(N,)`` along ``axis``.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    if not isinstance(size, int) or size < 4:
        raise ValueError(f"size must be an integer >= 4, got {size!r}")
    if gap < 0:
        raise ValueError(f"gap must be non-negative, got {gap}")
    v = load_mni_volume(cache) if volume is None else np.asarray(volume, dtype=np.float32)
    if v.ndim != 3 or not np.isfinite(v).all() or v.min() < 0:
        raise ValueError("the volume must be a finite non-negative 3-D array")
    v = np.moveaxis(v, axis, 0)  # (K, a, b): slices of (a, b)
    v = np.flip(np.swapaxes(v, 1, 2), axis=1)  # rows: b reversed (up), columns: a
    brain = v > 0
    rows = np.nonzero(brain.any(axis=(0, 2)))[0]
    cols = np.nonzero(brain.any(axis=(0, 1)))[0]
    if rows.size == 0:
        raise ValueError("the volume is empty (no positive voxel)")
    side = int(max(rows[-1] - rows[0], cols[-1] - cols[0])) + 1
    r0 = (rows[0] + rows[-1] + 1 - side) // 2
    c0 = (cols[0] + cols[-1] + 1 - side) // 2
    pad = max(0, -r0, -c0, r0 + side - v.shape[1], c0 + side - v.shape[2])
    v = np.pad(v, ((0, 0), (pad, pad), (pad, pad)))
    box = v[:, r0 + pad:r0 + pad + side, c0 + pad:c0 + pad + side]
    fraction = (box > 0).mean(axis=(1, 2))
    index = torch.from_numpy(np.nonzero(fraction >= min_fraction)[0].astype(np.int64))
    x = torch.from_numpy(np.ascontiguousarray(box[index.numpy()], dtype=np.float32))[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False).clamp(0.0, 255.0) / 255.0
    if signed:
        x = 2 * x - 1
    held = heldout_slices(index, block, period)
    if split == "test":
        keep = held
    elif split == "train":
        held_index = index[held]
        if held_index.numel():
            distance = (index[:, None] - held_index[None, :]).abs().min(dim=1).values
            keep = distance > gap
        else:
            keep = torch.ones_like(held)
    else:
        keep = torch.ones_like(held)
    return x[keep], index[keep]


def kspace_masks(
    n: int,
    size: int = 64,
    acceleration: float | tuple[float, float] = (4.0, 6.0),
    center_fraction: float = 0.08,
    kind: str = "lines",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Random k-space sampling masks, one per item, in FFT order (frequency 0 at index 0, as
    :class:`plausible.ops.FourierMask` expects).

    ``kind="lines"`` (Cartesian MRI): whole lines of k-space are acquired (all rows of the
    chosen columns); the ``c = max(1, round(center_fraction * size))`` lowest-frequency columns
    always, and ``round(size / R) - c`` more columns uniformly at random among the others, so
    that exactly ``round(size / R)`` of ``size`` columns are sampled. ``kind="points"``:
    the central ``c x c`` square of frequencies always, and uniformly random points elsewhere,
    ``round(size^2 / R)`` points in all. The acceleration ``R`` is fixed, or drawn per item
    uniformly in ``[lo, hi]`` when a pair is given.

    Returns:
        Boolean masks ``(n, size, size)``, true where k-space is sampled.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if kind not in ("lines", "points"):
        raise ValueError(f"kind must be 'lines' or 'points', got {kind!r}")
    lo, hi = (acceleration, acceleration) if isinstance(acceleration, (int, float)) \
        else tuple(float(a) for a in acceleration)
    if not 1.0 <= lo <= hi:
        raise ValueError(f"acceleration must be >= 1 (a number or a range lo <= hi), got "
                         f"{acceleration!r}")
    if not 0.0 <= center_fraction < 1.0:
        raise ValueError(f"center_fraction must be in [0, 1), got {center_fraction}")
    c = max(1, round(center_fraction * size))
    freqs = torch.fft.fftfreq(size).abs()  # |frequency| of each FFT index
    centre_1d = freqs.argsort(stable=True)[:c]
    R = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    if kind == "lines":
        centre = torch.zeros(size, dtype=torch.bool)
        centre[centre_1d] = True
        fixed, count = c, size
        total = (size / R).round().clamp(min=c, max=size).long()
    else:
        centre = torch.zeros(size, size, dtype=torch.bool)
        centre[centre_1d[:, None], centre_1d[None, :]] = True
        centre = centre.flatten()
        fixed, count = c * c, size * size
        total = (size * size / R).round().clamp(min=c * c, max=size * size).long()
    others = (~centre).nonzero().squeeze(1)
    # a uniformly random subset of (total - fixed) of the other frequencies, per item
    ranks = torch.rand(n, others.numel(), generator=generator).argsort(1).argsort(1)
    chosen = torch.zeros(n, count, dtype=torch.bool)
    chosen[:, others] = ranks < (total - fixed)[:, None]
    chosen |= centre
    if kind == "lines":
        masks = chosen[:, None, :].expand(n, size, size).clone()
    else:
        masks = chosen.reshape(n, size, size)
    return masks


def zero_filled(y: Tensor, masks: Tensor) -> Tensor:
    r"""Zero-filled reconstructions :math:`A^\top y = \operatorname{Re}\,
    \mathcal{F}^{-1}(m \odot y)` (the adjoint of :class:`~plausible.ops.FourierMask` for real
    images, orthonormal FFT).

    Arguments:
        y: k-space observations ``(N, C, H, W, 2)`` (real and imaginary parts).
        masks: Their masks ``(N, H, W)`` (or one ``(H, W)`` mask for all).

    Returns:
        Real images ``(N, C, H, W)``.
    """
    if y.dim() < 3 or y.shape[-1] != 2:
        raise ValueError(f"y must end in (H, W, 2), got {tuple(y.shape)}")
    if masks.dim() == 2:
        masks = masks.expand(y.shape[0], *masks.shape)
    if tuple(masks.shape) != (y.shape[0], *y.shape[-3:-1]):
        raise ValueError(f"masks must have shape (N, H, W) = ({y.shape[0]}, "
                         f"{y.shape[-3]}, {y.shape[-2]}), got {tuple(masks.shape)}")
    m = masks.reshape(masks.shape[0], *([1] * (y.dim() - 4)), *masks.shape[1:], 1)
    k = torch.view_as_complex((y * m.to(y.dtype)).contiguous())
    return torch.fft.ifftn(k, dim=(-2, -1), norm="ortho").real


# ---------------------------------------------------------------------------------------------
# the lap-0 Gaussian of accelerated MRI: EM in the real Fourier basis


def _fourier_index(H: int, W: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(rep, selfconj, conj)`` over the FFT grid ``(H, W)``: the representative of each pair
    ``{k, -k}`` (the smaller flat index), the self-conjugate frequencies (``k = -k``), and the
    flat index of ``-k``."""
    a = torch.arange(H)[:, None].expand(H, W)
    b = torch.arange(W)[None, :].expand(H, W)
    flat = (a * W + b).flatten()
    conj = (((-a) % H) * W + ((-b) % W)).flatten()
    return flat <= conj, flat == conj, conj


def real_fourier(x: Tensor) -> Tensor:
    r"""Coordinates of real images ``x`` ``(B, H, W)`` in the real orthonormal Fourier basis,
    ``(B, H W)``: with :math:`X = \mathcal{F} x` (orthonormal FFT), for each pair of
    frequencies :math:`\{k, -k\}`, :math:`k \ne -k`, the two coordinates :math:`\sqrt{2}
    \operatorname{Re} X_k` and :math:`\sqrt{2} \operatorname{Im} X_k`, and for each
    self-conjugate frequency (:math:`k = -k`) :math:`X_k` (real). Order: the real parts of the
    pairs, their imaginary parts, then the self-conjugate frequencies (flat FFT order within
    each). The map is orthogonal: :func:`real_fourier_inverse` is its transpose and inverse."""
    if x.dim() != 3:
        raise ValueError(f"expected real images (B, H, W), got {tuple(x.shape)}")
    B, H, W = x.shape
    rep, selfconj, _ = _fourier_index(H, W)
    X = torch.fft.fft2(x, norm="ortho").reshape(B, H * W)
    pairs = rep & ~selfconj
    return torch.cat([math.sqrt(2) * X.real[:, pairs], math.sqrt(2) * X.imag[:, pairs],
                      X.real[:, selfconj]], dim=1)


def real_fourier_inverse(c: Tensor, H: int, W: int) -> Tensor:
    """Images ``(B, H, W)`` of coordinates ``c`` ``(B, H W)`` (the inverse of
    :func:`real_fourier`)."""
    if c.dim() != 2 or c.shape[1] != H * W:
        raise ValueError(f"expected coordinates (B, {H * W}), got {tuple(c.shape)}")
    rep, selfconj, conj = _fourier_index(H, W)
    pairs = rep & ~selfconj
    P = int(pairs.sum())
    dtype = torch.complex128 if c.dtype == torch.float64 else torch.complex64
    X = torch.zeros(c.shape[0], H * W, dtype=dtype, device=c.device)
    half = torch.complex(c[:, :P], c[:, P:2 * P]) / math.sqrt(2)
    X[:, pairs] = half
    X[:, conj[pairs]] = half.conj()
    X[:, selfconj] = c[:, 2 * P:].to(dtype)
    return torch.fft.ifft2(X.reshape(-1, H, W), norm="ortho").real


def _fourier_looks(y: Tensor, masks: Tensor, noise: float) -> tuple[Tensor, Tensor]:
    r"""The looks of k-space observations at each real Fourier coordinate: ``(z, var)``, each
    ``(N, H W)``, where ``z`` is the mean of the looks (``NaN``-free: 0 where none) and ``var``
    its noise variance (``inf`` where unobserved). A pair :math:`\{k, -k\}` is seen once per
    observed frequency of the pair, with noise variance :math:`2 \sigma_y^2` per look in the
    orthonormal coordinates; a self-conjugate frequency with :math:`\sigma_y^2`."""
    N, H, W = masks.shape
    rep, selfconj, conj = _fourier_index(H, W)
    pairs = rep & ~selfconj
    m = masks.reshape(N, H * W).to(torch.float64)
    yr = y[..., 0].reshape(N, H * W).to(torch.float64) * m
    yi = y[..., 1].reshape(N, H * W).to(torch.float64) * m
    n_pair = m[:, pairs] + m[:, conj[pairs]]
    s2 = math.sqrt(2)
    z_re = s2 * (yr[:, pairs] + yr[:, conj[pairs]])
    z_im = s2 * (yi[:, pairs] - yi[:, conj[pairs]])
    n = torch.cat([n_pair, n_pair, m[:, selfconj]], dim=1)
    z = torch.cat([z_re, z_im, yr[:, selfconj]], dim=1) / n.clamp(min=1)
    unit = torch.cat([torch.full((2 * int(pairs.sum()),), 2.0), torch.ones(int(selfconj.sum()))])
    var = torch.where(n > 0, unit * noise**2 / n.clamp(min=1), torch.inf)
    return z, var


def _noise_log_density(y: Tensor, masks: Tensor, noise: float) -> Tensor:
    r"""The part of :math:`\log p(y_i)` that does not depend on the prior, ``(N,)``: two looks
    at a coordinate differ by pure noise (variance :math:`4 \sigma_y^2` in orthonormal units),
    self-conjugate frequencies have a pure-noise imaginary part, and each look at a pair is
    :math:`\sqrt{2}` times an entry of ``y`` (Jacobian :math:`\log \sqrt{2}`)."""
    N, H, W = masks.shape
    rep, selfconj, conj = _fourier_index(H, W)
    pairs = rep & ~selfconj
    m = masks.reshape(N, H * W).to(torch.float64)
    yr = y[..., 0].reshape(N, H * W).to(torch.float64) * m
    yi = y[..., 1].reshape(N, H * W).to(torch.float64) * m
    both = m[:, pairs] * m[:, conj[pairs]]
    d_re = math.sqrt(2) * (yr[:, pairs] - yr[:, conj[pairs]])
    d_im = math.sqrt(2) * (yi[:, pairs] + yi[:, conj[pairs]])
    v4 = 4 * noise**2
    out = -0.5 * (both * (d_re**2 / v4 + d_im**2 / v4 + 2 * math.log(2 * math.pi * v4))).sum(1)
    looks = 2 * (m[:, pairs] + m[:, conj[pairs]]).sum(1)
    out = out + looks * 0.5 * math.log(2)
    ms = m[:, selfconj]
    out = out - 0.5 * (ms * (yi[:, selfconj] ** 2 / noise**2
                             + math.log(2 * math.pi * noise**2))).sum(1)
    return out


class FourierGaussian:
    r"""A Gaussian prior :math:`x \sim \mathcal{N}(m, \Phi^\top \mathrm{diag}(p) \Phi)` on
    ``(1, H, W)`` images, with :math:`\Phi` the real orthonormal Fourier basis of
    :func:`real_fourier`: a free mean image and a covariance that is diagonal in the Fourier
    basis (stationary, up to the real and imaginary parts' own variances). Under k-space
    observations both the posterior and the evidence are closed-form, coordinate by coordinate.

    Attributes:
        mean: Coordinates :math:`\Phi m`, ``(D,)``. var: Variances :math:`p`, ``(D,)``.
        shape: ``(1, H, W)``.
    """

    def __init__(self, mean: Tensor, var: Tensor, shape: tuple[int, int, int]) -> None:
        D = math.prod(shape)
        if mean.shape != (D,) or var.shape != (D,) or not (var > 0).all():
            raise ValueError(f"expected mean and positive variances of shape ({D},)")
        self.mean, self.var, self.shape = mean.double(), var.double(), tuple(shape)

    def posterior_mean(self, y: Tensor, masks: Tensor, noise: float) -> Tensor:
        r"""Exact posterior means :math:`\mathbb{E}[x_i \mid y_i]` of k-space observations ``y``
        ``(N, 1, H, W, 2)`` with masks ``(N, H, W)`` and noise std ``noise``; ``(N, 1, H,
        W)`` float64 (the Gaussian-prior reconstruction)."""
        z, var = _fourier_looks(y, masks, noise)
        gain = self.var / (self.var + var)  # 0 where unobserved
        c = self.mean + gain * torch.where(torch.isfinite(var), z - self.mean, 0.0)
        return real_fourier_inverse(c, *self.shape[1:])[:, None]

    def log_likelihood(self, y: Tensor, masks: Tensor, noise: float) -> Tensor:
        r"""The exact log-evidence :math:`\log p(y_i) = \log \mathcal{N}(y_{i,o}; A_i m,
        A_i C A_i^\top + \sigma_y^2 I)` over the observed entries :math:`o` (real and
        imaginary parts of the sampled frequencies), ``(N,)`` float64: the evidence of the
        looks (:func:`_fourier_looks`) plus the pure-noise part of ``y`` (the differences of
        two looks at one coordinate, the imaginary parts of self-conjugate frequencies) and the
        Jacobian of the change of variables."""
        z, var = _fourier_looks(y, masks, noise)
        return self._looks_log_likelihood(z, var) + _noise_log_density(y, masks, noise)

    def _looks_log_likelihood(self, z: Tensor, var: Tensor) -> Tensor:
        seen = torch.isfinite(var)
        s = torch.where(seen, self.var + var, 1.0)
        r = torch.where(seen, z - self.mean, 0.0)
        return -0.5 * torch.where(seen, r**2 / s + torch.log(2 * math.pi * s), 0.0).sum(1)

    def denoiser(self, schedule: Schedule | None = None) -> FourierGaussianDenoiser:
        """The prior's exact denoiser, applied by FFTs (:class:`FourierGaussianDenoiser`)."""
        return FourierGaussianDenoiser(self, schedule)

    def dense_denoiser(self, schedule: Schedule | None = None) -> GaussianDenoiser:
        """The prior as a dense :class:`~plausible.GaussianDenoiser` (a ``D x D`` covariance
        and one eigendecomposition of it: for small images)."""
        _, H, W = self.shape
        D = H * W
        basis = real_fourier_inverse(torch.eye(D, dtype=torch.float64), H, W).reshape(D, D)
        cov = (basis.T * self.var) @ basis  # basis rows are the basis images
        cov = (cov + cov.T) / 2
        mean = real_fourier_inverse(self.mean[None], H, W).reshape(self.shape)
        return GaussianDenoiser(mean, cov, schedule)


class FourierGaussianDenoiser(Denoiser):
    r"""The exact denoiser of a :class:`FourierGaussian` prior, by FFTs: with
    :math:`c = \Phi x` (:func:`real_fourier`), coordinate by coordinate,

    .. math:: \mathbb{E}[c \mid c_t] = \mu + \frac{\alpha_t p}{\alpha_t^2 p + \sigma_t^2}
        (c_t - \alpha_t \mu),

    :math:`O(D \log D)` per state instead of the :math:`O(D^2)` of a dense
    :class:`~plausible.GaussianDenoiser` (equal to it up to rounding). Differentiable (MMPS
    takes vector-Jacobian products through it). States ``(B, 1, H, W)``."""

    def __init__(self, gaussian: FourierGaussian, schedule: Schedule | None = None) -> None:
        super().__init__()
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.shape = tuple(gaussian.shape)
        self.register_buffer("mu", gaussian.mean.clone())
        self.register_buffer("p", gaussian.var.clone())

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = self.check(x_t, t)
        alpha, sigma = self.schedule(t.to(torch.float64))
        a, s2 = alpha[:, None], (sigma**2)[:, None]
        _, H, W = self.shape
        c_t = real_fourier(x_t.to(torch.float64).reshape(-1, H, W))
        c = self.mu + a * self.p / (a**2 * self.p + s2) * (c_t - a * self.mu)
        return real_fourier_inverse(c, H, W).reshape(x_t.shape).to(x_t.dtype)


def fourier_gaussian_em(
    y: Tensor,
    masks: Tensor,
    noise: float,
    iterations: int = 64,
) -> tuple[FourierGaussian, list[float]]:
    r"""Empirical Bayes (EM) for the :class:`FourierGaussian` prior from k-space observations
    :math:`y_i = m_i \odot (\mathcal{F} x_i) + \epsilon_i` only: in the real Fourier basis the
    operators are selections, so each coordinate :math:`c_j \sim \mathcal{N}(\mu_j, p_j)` is
    seen by item :math:`i` through looks :math:`z_{ij} = c_{ij} + \mathcal{N}(0, v_{ij})`
    (or not at all), and EM iterates

    .. math:: \pi_{ij} = (1/p_j + 1/v_{ij})^{-1}, \quad \hat{c}_{ij} = \pi_{ij} (\mu_j / p_j
        + z_{ij} / v_{ij}), \quad \mu_j \leftarrow \frac{1}{N} \sum_i \hat{c}_{ij}, \quad
        p_j \leftarrow \frac{1}{N} \sum_i \pi_{ij} + (\hat{c}_{ij} - \mu_j)^2,

    (:math:`\hat{c}_{ij} = \mu_j`, :math:`\pi_{ij} = p_j` when unobserved), which never
    decreases the evidence. This is the lap 0 of EM on accelerated MRI: the dense Gaussian EM
    of :func:`plausible.em.gaussian_em` would need ``(N, 2 D, D)`` operator matrices.

    Arguments:
        y: k-space observations ``(N, 1, H, W, 2)`` (as :func:`observe` returns).
        masks: Their masks ``(N, H, W)``. noise: The noise std :math:`\sigma_y > 0`.
        iterations: EM iterations.

    Returns:
        ``(gaussian, log_likelihood)``: the prior and the mean log-evidence per observation
        (of the looks) before each iteration and after the last (``iterations + 1`` values).
    """
    if y.dim() != 5 or y.shape[1] != 1 or y.shape[-1] != 2 or \
            tuple(masks.shape) != (y.shape[0], *y.shape[2:4]):
        raise ValueError(f"expected y (N, 1, H, W, 2) and masks (N, H, W), got "
                         f"{tuple(y.shape)} and {tuple(masks.shape)}")
    if not noise > 0:
        raise ValueError(f"noise must be positive, got {noise}")
    H, W = masks.shape[1:]
    if H % 2 or W % 2:
        raise ValueError(f"the image sides must be even, got {H} x {W}")
    z, var = _fourier_looks(y, masks, noise)
    seen = torch.isfinite(var)
    count = seen.sum(0).clamp(min=1)
    mu = torch.where(seen, z, 0.0).sum(0) / count
    p = (torch.where(seen, (z - mu) ** 2, 0.0).sum(0) / count).clamp(min=noise**2)
    gaussian = FourierGaussian(mu, p, (1, H, W))
    history = []
    N = y.shape[0]
    constant = float(_noise_log_density(y, masks, noise).mean())
    for it in range(iterations + 1):
        history.append(float(gaussian._looks_log_likelihood(z, var).mean()) + constant)
        if it == iterations:
            break
        pi = torch.where(seen, 1 / (1 / p + 1 / torch.where(seen, var, 1.0)), p)
        c = torch.where(seen, pi * (mu / p + torch.where(seen, z, 0.0)
                                    / torch.where(seen, var, 1.0)), mu)
        mu = c.mean(0)
        p = (pi + (c - mu) ** 2).sum(0) / N
        p = p.clamp(min=1e-12 * float(p.max()))
        gaussian = FourierGaussian(mu, p, (1, H, W))
    return gaussian, history


def _check_pair(x: Tensor, ref: Tensor) -> None:
    if x.shape != ref.shape or x.dim() < 2:
        raise ValueError(f"x and ref must have the same shape (..., H, W), got "
                         f"{tuple(x.shape)} and {tuple(ref.shape)}")


def psnr(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    r"""Peak signal-to-noise ratio per image, :math:`10 \log_{10}(L^2 / \mathrm{MSE})` dB,
    with ``L = data_range``; ``x`` and ``ref`` ``(N, ..., H, W)``, returns ``(N,)``."""
    _check_pair(x, ref)
    mse = (x.double() - ref.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(x: Tensor, ref: Tensor, data_range: float = 1.0, win_size: int = 7) -> Tensor:
    r"""Structural similarity (Wang et al. 2004) per image, as scikit-image's
    ``structural_similarity`` with its defaults: local means, variances and covariance over
    ``win_size x win_size`` uniform windows (unbiased sample (co)variances),

    .. math:: \mathrm{SSIM} = \frac{(2 \mu_x \mu_r + C_1)(2 \sigma_{xr} + C_2)}
        {(\mu_x^2 + \mu_r^2 + C_1)(\sigma_x^2 + \sigma_r^2 + C_2)},

    :math:`C_1 = (0.01 L)^2`, :math:`C_2 = (0.03 L)^2`, averaged over the windows that lie
    inside the image (and over channels). ``x``, ``ref``: ``(N, C, H, W)`` or ``(N, H, W)``;
    returns ``(N,)`` in float64.
    """
    _check_pair(x, ref)
    if win_size < 3 or win_size % 2 == 0 or min(x.shape[-2:]) < win_size:
        raise ValueError(f"win_size must be odd, >= 3 and <= the image side, got {win_size}")
    a = x.double().reshape(x.shape[0], -1, *x.shape[-2:])
    b = ref.double().reshape(a.shape)
    N, C, H, W = a.shape
    a, b = a.reshape(N * C, 1, H, W), b.reshape(N * C, 1, H, W)

    def mean(z: Tensor) -> Tensor:
        return F.avg_pool2d(z, win_size, stride=1)

    npix = win_size**2
    cov_norm = npix / (npix - 1)
    ux, uy = mean(a), mean(b)
    vx = cov_norm * (mean(a * a) - ux * ux)
    vy = cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux**2 + uy**2 + C1) * (vx + vy + C2))
    return s.reshape(N, C, -1).mean(dim=(1, 2))


def observe(
    x: Tensor,
    masks: Tensor,
    noise: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Simulates k-space observations :math:`y_i = m_i \odot (\mathcal{F}(x_i) +
    \sigma_y \epsilon_i)` of images ``x`` ``(N, C, H, W)`` with masks ``(N, H, W)``; returns
    ``(N, C, H, W, 2)`` (zero outside the masks), the layout of
    :class:`~plausible.ops.FourierMask`."""
    if x.dim() != 4 or tuple(masks.shape) != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"expected x (N, C, H, W) and masks (N, H, W), got {tuple(x.shape)} "
                         f"and {tuple(masks.shape)}")
    if not noise > 0:
        raise ValueError(f"noise must be positive, got {noise}")
    k = torch.view_as_real(torch.fft.fft2(x, norm="ortho"))
    eps = torch.randn(k.shape, generator=generator, dtype=k.dtype)
    return (k + noise * eps) * masks[:, None, :, :, None].to(k.dtype)

