r"""Diagnostic figures for samples of posteriors.

Every function builds a :class:`matplotlib.figure.Figure` directly (never through
``pyplot``), so nothing leaks into matplotlib's global state and no display is needed: the
figures render with the Agg canvas. Each returns its figure and, given ``path``, also saves it
there (the format follows the file's extension, e.g. ``.png`` or ``.pdf``).

- :func:`pair_plot`: corner plot of a few dimensions of one or more sample sets;
- :func:`image_grid`: a grid of images;
- :func:`trajectory_bands`: median and 50% / 90% bands of sampled trajectories;
- :func:`coverage_curve`: empirical against nominal coverage of credible regions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

__all__ = ["pair_plot", "image_grid", "trajectory_bands", "coverage_curve"]

ArrayLike = Tensor | np.ndarray | Sequence[float]

_REFERENCE_COLOR = "0.35"


def _numpy(x: ArrayLike) -> np.ndarray:
    """A float64 numpy copy of a tensor, array or sequence (detached, on the CPU)."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


def _colors(n: int) -> list[str]:
    cycle = ["C0", "C3", "C2", "C1", "C4", "C5", "C6", "C8", "C9"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _smooth(h: np.ndarray, passes: int = 2) -> np.ndarray:
    """Binomial (1, 2, 1) / 4 smoothing of a 2-D histogram along both axes."""
    for _ in range(passes):
        for axis in (0, 1):
            p = np.pad(h, [(1, 1) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
            sl = [slice(None), slice(None)]
            parts = []
            for start in (0, 1, 2):
                sl[axis] = slice(start, start + h.shape[axis])
                parts.append(p[tuple(sl)])
            h = (parts[0] + 2 * parts[1] + parts[2]) / 4
    return h


def _hpd_levels(h: np.ndarray, masses: Sequence[float]) -> list[float]:
    """Density thresholds whose super-level sets hold the given probability masses."""
    flat = np.sort(h.ravel())[::-1]
    cum = np.cumsum(flat) / max(flat.sum(), 1e-300)
    levels = [float(flat[min(np.searchsorted(cum, m), flat.size - 1)]) for m in masses]
    return sorted(set(levels))


def _contours(
    ax: Axes, x: np.ndarray, y: np.ndarray, lims: tuple[tuple[float, float], ...], color: str
) -> bool:
    """50% and 90% highest-density contours of a smoothed 2-D histogram (a scatter if the
    histogram is degenerate); returns whether contours were drawn."""
    bins = int(np.clip(0.8 * np.sqrt(x.size), 12, 40))
    h, xe, ye = np.histogram2d(x, y, bins=bins, range=lims)
    h = _smooth(h, passes=3)
    levels = _hpd_levels(h, (0.9, 0.5))
    if len(levels) < 2 or levels[0] <= 0:
        ax.scatter(x, y, s=2, color=color, alpha=0.3, linewidths=0)
        return False
    xc, yc = (xe[1:] + xe[:-1]) / 2, (ye[1:] + ye[:-1]) / 2
    top = float(h.max()) * 1.01 + 1e-12
    for level in levels:  # nested fills: the 50% region comes out darker
        ax.contourf(xc, yc, h.T, levels=[level, top], colors=[color], alpha=0.2)
    ax.contour(xc, yc, h.T, levels=levels, colors=[color], linewidths=1.2)
    return True


def pair_plot(
    samples: Mapping[str, ArrayLike],
    dims: Sequence[int] | None = None,
    reference: str | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    truth: ArrayLike | None = None,
    max_points: int = 600,
    title: str | None = None,
) -> Figure:
    r"""Corner (pair) plot of a few dimensions of one or more sets of samples.

    The diagonal shows each set's marginal histogram; below it, each pair of dimensions
    shows every set as a scatter of (at most ``max_points``) points, one colour per set. The
    ``reference`` set (e.g. exact posterior samples) is drawn as filled 50% / 90%
    highest-density contours instead (a scatter when it has too few points).

    Arguments:
        samples: Name to samples, each of shape ``(N, D)`` (``N`` may differ between sets;
            states of other shapes are flattened to ``(N, D)``).
        dims: The dimensions to show (default: the first ``min(D, 4)``).
        reference: The name of the set to draw as contours (``None``: none).
        path: Where to save the figure (optional).
        names: Axis labels of the shown dimensions (default ``x[i]``).
        truth: A state ``(D,)`` to mark with a star (e.g. the ground truth).
        max_points: The most points scattered per set and panel.
        title: A figure title.

    Returns:
        The figure.

    Raises:
        ValueError: On an empty ``samples``, sets of different dimensions, an unknown
            ``reference`` or out-of-range ``dims``.
    """
    if not samples:
        raise ValueError("pair_plot needs at least one set of samples")
    arrays = {}
    for key, value in samples.items():
        a = _numpy(value)
        if a.ndim < 2 or a.shape[0] == 0:
            raise ValueError(f"samples[{key!r}] must have shape (N, D) with N >= 1, got "
                             f"{a.shape}")
        arrays[key] = a.reshape(a.shape[0], -1)
    D = {a.shape[1] for a in arrays.values()}
    if len(D) != 1:
        raise ValueError(f"all sample sets must have the same dimension, got {sorted(D)}")
    D = D.pop()
    if reference is not None and reference not in arrays:
        raise ValueError(f"reference {reference!r} is not one of the sample sets "
                         f"{list(arrays)}")
    dims = list(range(min(D, 4))) if dims is None else [int(d) for d in dims]
    if not dims or any(not 0 <= d < D for d in dims):
        raise ValueError(f"dims must be a non-empty list of indices in [0, {D}), got {dims}")
    if names is not None and len(names) != len(dims):
        raise ValueError(f"names must have one label per shown dimension ({len(dims)})")
    labels = list(names) if names is not None else [f"x[{d}]" for d in dims]
    truth_np = _numpy(truth).reshape(-1) if truth is not None else None
    if truth_np is not None and truth_np.size != D:
        raise ValueError(f"truth must have {D} entries, got {truth_np.size}")

    k = len(dims)
    others = [key for key in arrays if key != reference]
    colors = dict(zip(others, _colors(len(others))))
    if reference is not None:
        colors[reference] = _REFERENCE_COLOR

    # common limits: central 99.5% of all sets together, padded
    lims = []
    for d in dims:
        values = np.concatenate([a[:, d] for a in arrays.values()])
        values = values[np.isfinite(values)]
        if values.size == 0:
            lo, hi = -1.0, 1.0
        else:
            lo, hi = np.quantile(values, [0.0025, 0.9975])
        if truth_np is not None and np.isfinite(truth_np[d]):
            lo, hi = min(lo, truth_np[d]), max(hi, truth_np[d])
        pad = 0.08 * (hi - lo) if hi > lo else 0.5
        lims.append((float(lo - pad), float(hi + pad)))

    size = 2.0 if k > 2 else 2.6
    fig = _new_figure(size * k + 0.4, size * k + 0.5)
    axes = fig.subplots(k, k, squeeze=False)
    rng = np.random.default_rng(0)
    thinned = {}
    for key, a in arrays.items():
        idx = rng.permutation(a.shape[0])[:max_points] if a.shape[0] > max_points else \
            slice(None)
        thinned[key] = a[idx]

    contoured = False
    for i in range(k):
        for j in range(k):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            di, dj = dims[i], dims[j]
            if i == j:
                n_max = max(a.shape[0] for a in arrays.values())
                bins = np.linspace(*lims[i], int(np.clip(np.sqrt(n_max), 12, 40)) + 1)
                for key, a in arrays.items():
                    v = a[:, di][np.isfinite(a[:, di])]
                    if key == reference:
                        ax.hist(v, bins=bins, density=True, color=colors[key], alpha=0.3,
                                label=key)
                    else:
                        ax.hist(v, bins=bins, density=True, histtype="step",
                                color=colors[key], linewidth=1.4, label=key)
                if truth_np is not None:
                    ax.axvline(truth_np[di], color="k", linestyle="--", linewidth=1)
                ax.set_yticks([])
                ax.set_xlim(lims[i])
            else:
                if reference is not None:
                    ref = arrays[reference]
                    ok = np.isfinite(ref[:, dj]) & np.isfinite(ref[:, di])
                    if ok.sum() >= 200:
                        contoured |= _contours(ax, ref[ok, dj], ref[ok, di],
                                               (lims[j], lims[i]), colors[reference])
                    else:
                        ax.scatter(ref[ok, dj], ref[ok, di], s=3, color=colors[reference],
                                   alpha=0.4, linewidths=0)
                for key in others:
                    a = thinned[key]
                    ax.scatter(a[:, dj], a[:, di], s=3, color=colors[key], alpha=0.35,
                               linewidths=0, rasterized=True)
                if truth_np is not None:
                    ax.plot(truth_np[dj], truth_np[di], marker="*", color="k",
                            markersize=9, markeredgecolor="w", markeredgewidth=0.6)
                ax.set_xlim(lims[j])
                ax.set_ylim(lims[i])
            if i == k - 1:
                ax.set_xlabel(labels[j])
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i])
            elif i != j:
                ax.set_yticklabels([])
            ax.tick_params(labelsize=7)

    handles, names_ = axes[0, 0].get_legend_handles_labels()
    if truth_np is not None:
        handles.append(Line2D([], [], marker="*", color="k", linestyle="none", markersize=9))
        names_.append("truth")
    if contoured:
        names_ = [f"{n} (contours: 50%, 90%)" if n == reference else n for n in names_]
    legend_ax = axes[0, k - 1] if k > 1 else axes[0, 0]
    legend_ax.legend(handles, names_, loc="upper right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def image_grid(
    images: ArrayLike,
    nrow: int = 8,
    path: str | os.PathLike[str] | None = None,
    *,
    titles: Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "gray",
) -> Figure:
    r"""A grid of images, ``nrow`` per row (as in ``torchvision.utils.make_grid``).

    Arguments:
        images: ``(N, C, H, W)`` with ``C`` 1 (shown with ``cmap``) or 3 (RGB), or
            ``(N, H, W)``.
        nrow: Images per row.
        path: Where to save the figure (optional).
        titles: One title per image (optional).
        vmin, vmax: The value range mapped to black and white (default: the images' range,
            shared by all images).
        cmap: The colour map of single-channel images.

    Returns:
        The figure.

    Raises:
        ValueError: On a wrong shape, channel count or ``nrow``.
    """
    a = _numpy(images)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"images must have shape (N, C, H, W) or (N, H, W), got {a.shape}")
    if a.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {a.shape[1]}")
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive integer, got {nrow!r}")
    N = a.shape[0]
    if titles is not None and len(titles) != N:
        raise ValueError(f"titles must have one entry per image ({N})")
    finite = a[np.isfinite(a)]
    if vmin is not None:
        lo = float(vmin)
    else:
        lo = float(finite.min()) if finite.size else 0.0
    if vmax is not None:
        hi = float(vmax)
    else:
        hi = float(finite.max()) if finite.size else 1.0
    if hi <= lo:
        hi = lo + 1.0
    cols = min(nrow, N)
    rows = math.ceil(N / cols)
    aspect = a.shape[2] / a.shape[3]
    cell = 1.6
    fig = _new_figure(cell * cols, cell * aspect * rows + (0.25 * rows if titles else 0.0))
    axes = fig.subplots(rows, cols, squeeze=False)
    for n, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if n >= N:
            continue
        img = a[n]
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        else:
            rgb = np.clip((img.transpose(1, 2, 0) - lo) / (hi - lo), 0.0, 1.0)
            ax.imshow(np.nan_to_num(rgb), interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[n], fontsize=8)
    return _save(fig, path)


def _observation_points(
    observations: ArrayLike | tuple[ArrayLike, ArrayLike], t: np.ndarray, D: int
) -> tuple[np.ndarray, np.ndarray]:
    """Observations as ``(times (K,), values (K, D))``, NaN where a dimension is unobserved."""
    if isinstance(observations, tuple):
        if len(observations) != 2:
            raise ValueError("observations must be (times, values) or an array like truth")
        t_obs, y_obs = _numpy(observations[0]).reshape(-1), _numpy(observations[1])
    else:
        t_obs, y_obs = t, _numpy(observations)
    y_obs = y_obs.reshape(t_obs.size, -1)
    if y_obs.shape[1] != D:
        raise ValueError(f"observations must have {D} value(s) per time, got {y_obs.shape[1]}")
    return t_obs, y_obs


def trajectory_bands(
    t: ArrayLike,
    samples: ArrayLike,
    truth: ArrayLike | None = None,
    observations: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    color: str = "C0",
    title: str | None = None,
) -> Figure:
    r"""Median and central 50% / 90% bands of sampled trajectories, one panel per dimension.

    Arguments:
        t: Times ``(L,)``.
        samples: Trajectories ``(N, L)`` or ``(N, L, D)``.
        truth: The true trajectory ``(L,)`` or ``(L, D)`` (dashed black line; optional).
        observations: Either an array of the shape of ``truth`` with NaN where nothing is
            observed, or a tuple ``(times (K,), values (K,) or (K, D))``; drawn as dots.
        path: Where to save the figure (optional).
        names: One label per dimension (default ``x[d]``).
        color: The colour of the median and the bands.
        title: A figure title.

    Returns:
        The figure.

    Raises:
        ValueError: On inconsistent shapes.
    """
    t_np = _numpy(t).reshape(-1)
    s = _numpy(samples)
    if s.ndim == 2:
        s = s[..., None]
    if s.ndim != 3 or s.shape[1] != t_np.size or s.shape[0] == 0:
        raise ValueError(f"samples must have shape (N, L) or (N, L, D) with L = {t_np.size}, "
                         f"got {s.shape}")
    N, L, D = s.shape
    if names is not None and len(names) != D:
        raise ValueError(f"names must have one label per dimension ({D})")
    truth_np = None
    if truth is not None:
        truth_np = _numpy(truth).reshape(L, -1)
        if truth_np.shape[1] != D:
            raise ValueError(f"truth must have shape (L,) or (L, {D}), got "
                             f"{_numpy(truth).shape}")
    obs = _observation_points(observations, t_np, D) if observations is not None else None

    q = np.nanquantile(s, [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)  # (5, L, D)
    cols = 1 if D <= 3 else 2
    rows = math.ceil(D / cols)
    fig = _new_figure(6.0 * cols, 1.9 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for d, ax in enumerate(axes.flat):
        if d >= D:
            ax.set_axis_off()
            continue
        ax.fill_between(t_np, q[0, :, d], q[4, :, d], color=color, alpha=0.18, linewidth=0,
                        label="90%")
        ax.fill_between(t_np, q[1, :, d], q[3, :, d], color=color, alpha=0.35, linewidth=0,
                        label="50%")
        ax.plot(t_np, q[2, :, d], color=color, linewidth=1.4, label="median")
        if truth_np is not None:
            ax.plot(t_np, truth_np[:, d], color="k", linestyle="--", linewidth=1.1,
                    label="truth")
        if obs is not None:
            ok = np.isfinite(obs[1][:, d])
            if ok.any():
                ax.plot(obs[0][ok], obs[1][ok, d], "o", color="C3", markersize=3.5,
                        label="observations")
        ax.set_ylabel(names[d] if names is not None else f"x[{d}]")
        ax.tick_params(labelsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("t")
    axes.flat[0].legend(fontsize=7, ncol=5, loc="upper left", frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def coverage_curve(
    levels: ArrayLike,
    coverage: ArrayLike | Mapping[str, ArrayLike],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    r"""Calibration plot: empirical coverage of credible regions against their nominal level.

    A calibrated posterior lies on the diagonal; below it, it is over-confident (its
    regions miss the truth too often), above it, under-confident.

    Arguments:
        levels: Nominal credible levels ``(K,)`` in ``[0, 1]``.
        coverage: Empirical coverages ``(K,)``, or a mapping of names to such curves (one
            line each).
        path: Where to save the figure (optional).
        title: A figure title.

    Returns:
        The figure.

    Raises:
        ValueError: If a curve does not have one value per level.
    """
    lv = _numpy(levels).reshape(-1)
    curves = dict(coverage) if isinstance(coverage, Mapping) else {"coverage": coverage}
    fig = _new_figure(4.2, 4.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="calibrated")
    for (name, c), color in zip(curves.items(), _colors(len(curves))):
        c = _numpy(c).reshape(-1)
        if c.size != lv.size:
            raise ValueError(f"coverage {name!r} has {c.size} values for {lv.size} levels")
        order = np.argsort(lv)
        ax.plot(lv[order], c[order], marker="o", markersize=3, color=color, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal level")
    ax.set_ylabel("empirical coverage")
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    if title:
        ax.set_title(title)
    return _save(fig, path)


# --- diagnostics plots ---
# Calibration figures for the results of :mod:`plausible.diagnostics`:
# :func:`coverage_plot` (HPD or marginal coverage with the calibrated band), :func:`tarp_plot`
# (TARP expected coverage), :func:`sbc_histogram` (binned SBC ranks with the band of uniform
# ranks) and :func:`sbc_ecdf` (rank ECDF minus the uniform CDF, simultaneous band).

__all__ += ["coverage_plot", "tarp_plot", "sbc_histogram", "sbc_ecdf"]


def _named(results: object, kind: type, default: str) -> dict[str, object]:
    if isinstance(results, kind):
        return {default: results}
    if isinstance(results, Mapping) and results and all(isinstance(r, kind)
                                                        for r in results.values()):
        return dict(results)
    raise TypeError(f"expected a {kind.__name__} or a non-empty mapping of names to "
                    f"{kind.__name__} results")


def _calibration_axes(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def coverage_plot(
    results: object,
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    r"""Empirical against nominal coverage, with the band of a calibrated posterior.

    Arguments:
        results: A :class:`plausible.diagnostics.Coverage` (from ``expected_coverage`` or
            ``marginal_coverage``), or a mapping of names to them (one line each; marginal
            results draw one line per dimension).
        path: Where to save the figure (optional).
        names: Labels of the dimensions of marginal results (default ``theta[d]``).
        title: A figure title.

    Returns:
        The figure. The grey band is the pointwise binomial band of the first result: a
        calibrated posterior's curve stays inside it (pointwise, at its confidence).
    """
    from .diagnostics import Coverage

    named = _named(results, Coverage, "coverage")
    fig = _new_figure(4.4, 4.2)
    ax = fig.subplots()
    first = next(iter(named.values()))
    lv = _numpy(first.levels)
    order = np.argsort(lv)
    ax.fill_between(lv[order], _numpy(first.lower)[order], _numpy(first.upper)[order],
                    color="0.85", linewidth=0, label="calibrated (99% band)")
    _calibration_axes(ax, "nominal level", "empirical coverage")
    k = 0
    for key, res in named.items():
        c = _numpy(res.coverage)
        lv = _numpy(res.levels)
        order = np.argsort(lv)
        curves = c[:, None] if c.ndim == 1 else c
        for d in range(curves.shape[1]):
            if curves.shape[1] == 1:
                label = key
            else:
                dim = names[d] if names is not None and d < len(names) else f"theta[{d}]"
                label = dim if len(named) == 1 else f"{key} {dim}"
            ax.plot(lv[order], curves[order, d], color=_colors(k + 1)[k], linewidth=1.4,
                    label=label)
            k += 1
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def tarp_plot(
    results: object,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    r"""TARP expected coverage probability against the credibility level.

    Arguments:
        results: A :class:`plausible.diagnostics.TARP`, or a mapping of names to them.
        path: Where to save the figure (optional).
        title: A figure title.

    Returns:
        The figure: the diagonal, the pointwise binomial band of a calibrated posterior (of
        the first result) and one ECP curve per result, labelled with its ATC and KS p-value.
    """
    from .diagnostics import TARP

    named = _named(results, TARP, "TARP")
    fig = _new_figure(4.4, 4.2)
    ax = fig.subplots()
    first = next(iter(named.values()))
    lv = _numpy(first.levels)
    ax.fill_between(lv, _numpy(first.lower), _numpy(first.upper), color="0.85", linewidth=0,
                    label="calibrated (99% band)")
    _calibration_axes(ax, r"credibility level $\alpha$", "expected coverage")
    for (key, res), color in zip(named.items(), _colors(len(named))):
        ax.plot(_numpy(res.levels), _numpy(res.ecp), color=color, linewidth=1.5,
                label=f"{key} (ATC {res.atc:+.3f}, p={res.pvalue:.2g})")
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _sbc_dims(result: object, names: Sequence[str] | None) -> tuple[int, list[str]]:
    from .diagnostics import SBC

    if not isinstance(result, SBC):
        raise TypeError("expected a plausible.diagnostics.SBC result")
    D = int(result.ranks.shape[1])
    if names is not None and len(names) != D:
        raise ValueError(f"names must have one label per dimension ({D})")
    return D, list(names) if names is not None else [f"theta[{d}]" for d in range(D)]


def sbc_histogram(
    result: object,
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    confidence: float = 0.99,
    title: str | None = None,
) -> Figure:
    r"""Histograms of SBC ranks, one panel per dimension (Talts et al. 2018, Fig. 1).

    The grey band holds the central ``confidence`` interval of each bin's count under uniform
    ranks (:math:`\mathrm{Binomial}(B, p_\mathrm{bin})`, pointwise); the line is its mean.
    A U shape means over-confidence, a hump under-confidence, a slope a bias.

    Arguments:
        result: A :class:`plausible.diagnostics.SBC`.
        path: Where to save the figure (optional).
        names: One label per dimension.
        confidence: Of the band.
        title: A figure title.
    """
    from scipy import stats

    D, labels = _sbc_dims(result, names)
    counts = _numpy(result.counts)
    expected = _numpy(result.expected)
    B = int(result.ranks.shape[0])
    p = expected / B
    q = (1 - confidence) / 2
    lo, hi = stats.binom.ppf(q, B, p), stats.binom.ppf(1 - q, B, p)
    cols = min(D, 4)
    rows = math.ceil(D / cols)
    fig = _new_figure(2.6 * cols + 0.3, 2.1 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    edges = np.arange(result.bins + 1)
    for d, ax in enumerate(axes.flat):
        if d >= D:
            ax.set_axis_off()
            continue
        ax.fill_between(edges, np.append(lo, lo[-1]), np.append(hi, hi[-1]), step="post",
                        color="0.85", linewidth=0)
        ax.stairs(counts[:, d], edges, fill=True, color="C0", alpha=0.7)
        ax.stairs(expected, edges, color="0.3", linewidth=1)
        ax.set_title(f"{labels[d]} (p={float(result.pvalues[d]):.2g})", fontsize=8)
        ax.set_xticks([0, result.bins])
        ax.set_xticklabels(["0", str(result.num_samples)], fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("rank", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def sbc_ecdf(
    result: object,
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    confidence: float = 0.99,
    title: str | None = None,
) -> Figure:
    r"""ECDF of the normalised SBC ranks minus the uniform CDF, all dimensions in one panel,
    with the simultaneous ``confidence`` band of uniform ranks (Säilynoja et al. 2022; see
    :func:`plausible.diagnostics.ecdf_band`).

    Arguments:
        result: A :class:`plausible.diagnostics.SBC`.
        path: Where to save the figure (optional).
        names: One label per dimension.
        confidence: Of the simultaneous band.
        title: A figure title.
    """
    from .diagnostics import ecdf_band

    D, labels = _sbc_dims(result, names)
    B = int(result.ranks.shape[0])
    z, lo, hi = (_numpy(a) for a in ecdf_band(B, 101, confidence))
    u = (_numpy(result.ranks) + 0.5) / (result.num_samples + 1)
    fig = _new_figure(4.8, 3.4)
    ax = fig.subplots()
    ax.fill_between(z, lo - z, hi - z, color="0.85", linewidth=0,
                    label=f"uniform ({confidence:.0%} simultaneous)")
    ax.axhline(0.0, color="0.5", linestyle="--", linewidth=1)
    for d, color in zip(range(D), _colors(D)):
        ecdf = np.searchsorted(np.sort(u[:, d]), z, side="right") / B
        ax.plot(z, ecdf - z, color=color, linewidth=1.3, label=labels[d])
    ax.set_xlim(0, 1)
    ax.set_xlabel("normalised rank")
    ax.set_ylabel("ECDF - uniform")
    ax.legend(fontsize=7, loc="best", frameon=False)
    if title:
        ax.set_title(title)
    return _save(fig, path)
# --- end diagnostics plots ---
