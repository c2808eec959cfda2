r"""Calibration and two-sample diagnostics for posterior samplers.

API summary (``B``: simulations ``(theta_b, y_b)``, ``N``: posterior samples per
simulation, ``D``: parameters; posterior samples are always laid out ``(B, N, D)``)::

    from plausible import diagnostics as dg

    dg.c2st(x, y, classifier="mlp", folds=5, seed=1) -> float   # sbibm's C2ST accuracy
    dg.c2st(x, y, classifier="rf")                               # faster random-forest variant

    dg.hpd_credibility(log_prob_samples (B, N), log_prob_true (B,)) -> (B,)
    dg.expected_coverage(log_prob_samples, log_prob_true, levels=21) -> Coverage
    dg.expected_coverage(log_prob_fn=f, theta=theta, samples=samples)   # f: (B, M, D) -> (B, M)
    dg.marginal_coverage(theta (B, D), samples (B, N, D), levels=21) -> Coverage  # per dim
    dg.tarp(theta, samples, bounds=None, references=None, levels=101, seed=0) -> TARP
    dg.sbc(theta, samples, bins=None, seed=0) -> SBC                   # ranks + uniformity
    dg.ecdf_band(num, points, confidence=0.99) -> (z, lower, upper)   # simultaneous band
    dg.binomial_band(num, levels, confidence=0.99) -> (lower, upper)  # pointwise band

    Coverage(levels, coverage, credibility, lower, upper, pvalue)
    TARP(levels, ecp, credibility, references, atc, distance, lower, upper, pvalue)
    SBC(ranks, num_samples, bins, counts, expected, pvalues, ks_pvalues)

What "calibrated" means here: the posterior ``q(theta | y)`` is calibrated when, over
``(theta, y) ~ p(theta) p(y | theta)``, every credible region of level ``alpha`` holds the
true ``theta`` with probability ``alpha``. Each check reduces a simulation to a number that is
exactly uniform on ``[0, 1]`` under calibration (after randomising ties):

- expected coverage (highest-density regions): the credibility of the smallest HPD region
  that contains ``theta_b``, :math:`c_b = \frac{1}{N}\#\{i : \log q(\theta_{bi}) > \log
  q(\theta_b)\}`; the empirical coverage at level ``alpha`` is :math:`\frac{1}{B}\#\{b : c_b
  \le \alpha\}`.
- marginal coverage: the same with central intervals of each dimension, :math:`c_{bd} =
  |2 u_{bd} - 1|`, :math:`u_{bd}` the fraction of samples below :math:`\theta_{bd}`.
- TARP (Lemos et al. 2023): :math:`f_b = \frac{1}{N}\#\{i : \|\theta_{bi} - r_b\| <
  \|\theta_b - r_b\|\}` for a random reference point :math:`r_b`, drawn uniformly in the
  parameters' range after normalising them to ``[0, 1]^D`` (by ``bounds`` or, as the ``tarp``
  package does, by the min/max of the true parameters); ECP(alpha) ``= mean(f_b < alpha)``.
- SBC (Talts et al. 2018): the rank of :math:`\theta_{bd}` among the ``N`` samples, uniform on
  ``{0, ..., N}`` when the samples are independent draws of a calibrated posterior.

The uniformity p-values use Kolmogorov-Smirnov on the randomised statistic
:math:`(k + U)/(N + 1)` (``k`` the integer count, ``U ~ U(0, 1)``), which is exactly ``U(0,1)``
under calibration, and, for SBC, also Pearson's chi-square on binned ranks.

C2ST (as ``sbibm.metrics.c2st``): z-score both sets by the first set's mean and standard
deviation, label them 0 / 1, and report the mean accuracy of an ``MLPClassifier`` (ReLU,
hidden layers ``(10 D, 10 D)``, adam, ``max_iter=10000``, ``random_state=seed``) over
``KFold(folds, shuffle=True, random_state=seed)``. 0.5 means indistinguishable, 1.0 disjoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

__all__ = [
    "c2st",
    "hpd_credibility",
    "expected_coverage",
    "marginal_coverage",
    "tarp",
    "sbc",
    "binomial_band",
    "ecdf_band",
    "Coverage",
    "TARP",
    "SBC",
]


# ---------------------------------------------------------------------------------------------
# checks


def _tensor(x: object, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
    return x.detach().to("cpu", torch.float64)


def _finite(x: Tensor, name: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return x


def _levels(levels: int | Tensor | np.ndarray | list[float]) -> Tensor:
    if isinstance(levels, int) and not isinstance(levels, bool):
        if levels < 2:
            raise ValueError(f"levels must be >= 2 points, got {levels}")
        return torch.linspace(0.0, 1.0, levels, dtype=torch.float64)
    lv = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
    if lv.numel() == 0 or not bool(((lv >= 0) & (lv <= 1)).all()):
        raise ValueError("levels must be an int or values in [0, 1]")
    return lv


def _samples(theta: object, samples: object) -> tuple[Tensor, Tensor]:
    th = _finite(_tensor(theta, "theta"), "theta")
    sm = _finite(_tensor(samples, "samples"), "samples")
    if th.dim() == 1:
        th = th[:, None]
    if sm.dim() == 2 and th.shape[1] == 1:
        sm = sm[..., None]
    if th.dim() != 2 or sm.dim() != 3 or sm.shape[0] != th.shape[0] or sm.shape[2] != th.shape[1]:
        raise ValueError(f"theta must be (B, D) and samples (B, N, D) with the same B and D, got "
                         f"{tuple(th.shape)} and {tuple(sm.shape)}")
    if sm.shape[1] < 1 or th.shape[0] < 1:
        raise ValueError("need at least one simulation and one sample per simulation")
    return th, sm


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------------------------------
# bands


def binomial_band(num: int, levels: Tensor, confidence: float = 0.99) -> tuple[Tensor, Tensor]:
    r"""Pointwise band of the empirical coverage of a calibrated posterior.

    Under calibration, ``num`` times the coverage at level :math:`\alpha` is
    :math:`\mathrm{Binomial}(\mathrm{num}, \alpha)`; the band holds its central ``confidence``
    interval, divided by ``num``.

    Returns:
        ``(lower, upper)``, each of the shape of ``levels``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lv = _levels(levels).numpy()
    q = (1 - confidence) / 2
    lo = stats.binom.ppf(q, num, lv) / num
    hi = stats.binom.ppf(1 - q, num, lv) / num
    return torch.from_numpy(lo), torch.from_numpy(hi)


def ecdf_band(
    num: int, points: int = 101, confidence: float = 0.99, simulations: int = 2000, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Simultaneous band for the ECDF of ``num`` uniform draws (Säilynoja et al. 2022).

    The band is the pointwise binomial band at an adjusted level :math:`\gamma`, chosen by
    simulation so that a whole ECDF of ``num`` uniform draws stays inside it at all ``points``
    evaluation points with probability ``confidence``.

    Returns:
        ``(z, lower, upper)``: evaluation points ``(points,)`` in ``[0, 1]`` and the band of
        the ECDF at them.
    """
    if num < 1 or points < 2:
        raise ValueError("ecdf_band needs num >= 1 and points >= 2")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = np.linspace(0.0, 1.0, points)
    rng = np.random.default_rng(seed)
    u = np.sort(rng.random((simulations, num)), axis=1)
    counts = np.stack([np.searchsorted(row, z, side="right") for row in u])  # (S, P)
    cdf = stats.binom.cdf(counts, num, z)
    cdf_below = stats.binom.cdf(counts - 1, num, z)
    tail = 2 * np.minimum(cdf, 1 - cdf_below)
    gamma = float(np.quantile(tail.min(axis=1), 1 - confidence))
    lo = stats.binom.ppf(gamma / 2, num, z) / num
    hi = stats.binom.ppf(1 - gamma / 2, num, z) / num
    return torch.from_numpy(z), torch.from_numpy(lo), torch.from_numpy(hi)


def _ks_uniform(u: Tensor) -> float:
    return float(stats.kstest(u.numpy(), "uniform").pvalue)


def _randomised(count: Tensor, ties: Tensor, n: int, generator: torch.Generator) -> Tensor:
    r"""``(count + V + U) / (n + 1)`` with ``V`` uniform on ``{0..ties}`` and ``U ~ U(0, 1)``:
    exactly ``U(0, 1)`` when ``count + V`` is uniform on ``{0, ..., n}``."""
    v = torch.floor(torch.rand(count.shape, generator=generator, dtype=torch.float64)
                    * (ties + 1))
    u = torch.rand(count.shape, generator=generator, dtype=torch.float64)
    return (count + v + u) / (n + 1)


# ---------------------------------------------------------------------------------------------
# C2ST


def c2st(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    classifier: str = "mlp",
    folds: int = 5,
    seed: int = 1,
    *,
    z_score: bool = True,
    noise_scale: float | None = None,
    scoring: str = "accuracy",
) -> float:
    r"""Classifier two-sample test (C2ST): cross-validated accuracy of telling ``x`` from ``y``.

    ``classifier="mlp"`` is exactly ``sbibm.metrics.c2st`` (sbibm 1.1.0): z-scoring of both
    sets by the mean and (unbiased) standard deviation of ``x``, optional Gaussian noise of
    std ``noise_scale``, ``sklearn.neural_network.MLPClassifier(activation="relu",
    hidden_layer_sizes=(10 D, 10 D), max_iter=10000, solver="adam", random_state=seed)``,
    scored by ``cross_val_score`` over ``KFold(n_splits=folds, shuffle=True,
    random_state=seed)``; the mean score is returned (as float32, like sbibm). sbibm's
    default ``seed`` is 1.

    ``classifier="rf"`` is a faster variant that is **not** the sbibm metric:
    ``RandomForestClassifier(n_estimators=50, min_samples_leaf=5, max_samples=0.5,
    random_state=seed)`` on the same folds. Its values are on the same scale
    (0.5 = indistinguishable) but differ from the MLP's for the same pair of sets; do not mix
    the two in one comparison.

    Arguments:
        x, y: Sample sets ``(N_x, D)`` and ``(N_y, D)`` (``N_x`` and ``N_y`` may differ; sbibm
            uses equal sizes, and an unequal split changes the chance level to
            ``max(N_x, N_y) / (N_x + N_y)``).
        classifier: ``"mlp"`` (sbibm) or ``"rf"``.
        folds: Number of cross-validation folds.
        seed: Seeds the folds, the classifier and the noise.
        z_score: Standardise by ``x``'s statistics (sbibm's default ``True``).
        noise_scale: Std of Gaussian noise added to both sets after z-scoring (default none).
        scoring: Any scikit-learn scorer name (``"accuracy"``; ``"roc_auc"`` gives sbibm's
            ``c2st_auc``).

    Returns:
        The mean cross-validated score.

    Raises:
        ValueError: On mismatched dimensions, too few samples for the folds, non-finite values
            or an unknown classifier.
    """
    from sklearn.model_selection import KFold, cross_val_score

    X = _finite(_tensor(x, "x"), "x")
    Y = _finite(_tensor(y, "y"), "y")
    if X.dim() == 1:
        X = X[:, None]
    if Y.dim() == 1:
        Y = Y[:, None]
    if X.dim() != 2 or Y.dim() != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"x and y must be (N, D) with the same D, got {tuple(X.shape)} and "
                         f"{tuple(Y.shape)}")
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if X.shape[0] + Y.shape[0] < 2 * folds:
        raise ValueError(f"too few samples ({X.shape[0]} + {Y.shape[0]}) for {folds} folds")
    # sbibm computes in float32
    X, Y = X.float(), Y.float()
    if z_score:
        mean, std = X.mean(0), X.std(0)
        if not bool((std > 0).all()):
            raise ValueError("x has a constant dimension: z-scoring divides by zero "
                             "(pass z_score=False)")
        X, Y = (X - mean) / std, (Y - mean) / std
    if noise_scale is not None:
        g = _generator(seed)
        X = X + noise_scale * torch.randn(X.shape, generator=g)
        Y = Y + noise_scale * torch.randn(Y.shape, generator=g)
    ndim = X.shape[1]
    if classifier == "mlp":
        from sklearn.neural_network import MLPClassifier

        clf = MLPClassifier(activation="relu", hidden_layer_sizes=(10 * ndim, 10 * ndim),
                            max_iter=10000, solver="adam", random_state=seed)
    elif classifier == "rf":
        from sklearn.ensemble import RandomForestClassifier

        clf = RandomForestClassifier(n_estimators=50, min_samples_leaf=5, max_samples=0.5,
                                     random_state=seed)
    else:
        raise ValueError(f"classifier must be 'mlp' (sbibm) or 'rf', got {classifier!r}")
    data = np.concatenate((X.numpy(), Y.numpy()))
    target = np.concatenate((np.zeros(X.shape[0]), np.ones(Y.shape[0])))
    shuffle = KFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(clf, data, target, cv=shuffle, scoring=scoring)
    return float(np.float32(np.mean(scores)))


# ---------------------------------------------------------------------------------------------
# coverage


@dataclass(frozen=True)
class Coverage:
    """Empirical coverage of credible regions.

    Attributes:
        levels: Nominal credible levels ``(K,)``.
        coverage: Empirical coverage ``(K,)`` (HPD) or ``(K, D)`` (marginal).
        credibility: Per simulation, the level of the smallest region holding the truth,
            ``(B,)`` or ``(B, D)`` (uniform on ``[0, 1]`` under calibration, up to ``1/N``).
        lower, upper: Pointwise binomial band ``(K,)`` of a calibrated posterior's coverage.
        pvalue: KS p-value of the uniformity of the randomised credibility (``float``, or
            ``(D,)`` for marginal coverage).
    """

    levels: Tensor
    coverage: Tensor
    credibility: Tensor
    lower: Tensor
    upper: Tensor
    pvalue: float | Tensor


def hpd_credibility(log_prob_samples: Tensor, log_prob_true: Tensor) -> Tensor:
    r"""Credibility of the smallest highest-density region that contains the truth.

    .. math:: c_b = \frac{1}{N} \#\{i : \log q(\theta_{bi} \mid y_b) > \log q(\theta_b \mid
        y_b)\},

    the Monte-Carlo estimate of :math:`\int q(\theta \mid y_b) \,
    [q(\theta \mid y_b) > q(\theta_b \mid y_b)] \, d\theta`.

    Arguments:
        log_prob_samples: ``(B, N)`` log densities of posterior ``b``'s own samples.
        log_prob_true: ``(B,)`` log density of posterior ``b`` at the true ``theta_b``
            (``-inf`` allowed: the truth is then outside every region, credibility 1).

    Returns:
        ``(B,)`` credibilities in ``[0, 1]``.
    """
    lps = _tensor(log_prob_samples, "log_prob_samples")
    lpt = _tensor(log_prob_true, "log_prob_true").reshape(-1)
    if lps.dim() != 2 or lps.shape[0] != lpt.shape[0]:
        raise ValueError(f"log_prob_samples must be (B, N) and log_prob_true (B,), got "
                         f"{tuple(lps.shape)} and {tuple(lpt.shape)}")
    if bool(torch.isnan(lps).any()) or bool(torch.isnan(lpt).any()):
        raise ValueError("log densities must not be NaN")
    return (lps > lpt[:, None]).double().mean(1)


def expected_coverage(
    log_prob_samples: Tensor | None = None,
    log_prob_true: Tensor | None = None,
    *,
    log_prob_fn: Callable[[Tensor], Tensor] | None = None,
    theta: Tensor | None = None,
    samples: Tensor | None = None,
    levels: int | Tensor = 21,
    confidence: float = 0.99,
    seed: int = 0,
) -> Coverage:
    r"""Expected coverage of highest-posterior-density (HPD) regions.

    Give either the log densities (``log_prob_samples`` ``(B, N)``, ``log_prob_true``
    ``(B,)``), or a function and the points: ``log_prob_fn(points)`` maps ``(B, M, D)`` to
    ``(B, M)``, row ``b`` evaluated under posterior ``b`` (e.g. a closure over ``y``), with
    ``theta`` ``(B, D)`` and ``samples`` ``(B, N, D)``.

    The coverage at level :math:`\alpha` is :math:`\frac{1}{B}\#\{b : c_b \le \alpha\}` with
    :math:`c_b` from :func:`hpd_credibility`. A calibrated posterior has coverage
    :math:`\alpha` (within :attr:`Coverage.lower` / :attr:`Coverage.upper`, a pointwise
    ``confidence`` binomial band); below the diagonal it is over-confident.

    Returns:
        A :class:`Coverage`.
    """
    if log_prob_fn is not None:
        if log_prob_samples is not None or log_prob_true is not None:
            raise ValueError("give either log densities or log_prob_fn with theta and samples")
        if theta is None or samples is None:
            raise ValueError("log_prob_fn needs theta (B, D) and samples (B, N, D)")
        th, sm = _samples(theta, samples)
        dtype = samples.dtype if isinstance(samples, Tensor) else torch.float64
        with torch.no_grad():
            lpt = _tensor(log_prob_fn(th[:, None].to(dtype)), "log_prob_fn(theta)").reshape(-1)
            lps = _tensor(log_prob_fn(sm.to(dtype)), "log_prob_fn(samples)")
        if lps.shape != sm.shape[:2]:
            raise ValueError(f"log_prob_fn must map (B, M, D) to (B, M); got {tuple(lps.shape)}"
                             f" for samples of shape {tuple(sm.shape)}")
    else:
        if log_prob_samples is None or log_prob_true is None:
            raise ValueError("expected_coverage needs log_prob_samples and log_prob_true, or "
                             "log_prob_fn, theta and samples")
        lps = _tensor(log_prob_samples, "log_prob_samples")
        lpt = _tensor(log_prob_true, "log_prob_true").reshape(-1)
    cred = hpd_credibility(lps, lpt)
    lv = _levels(levels)
    cov = (cred[None, :] <= lv[:, None] + 1e-12).double().mean(1)
    lo, hi = binomial_band(cred.numel(), lv, confidence)
    B, N = lps.shape
    count = (lps > lpt[:, None]).double().sum(1)
    ties = (lps == lpt[:, None]).double().sum(1)
    pvalue = _ks_uniform(_randomised(count, ties, N, _generator(seed)))
    return Coverage(lv, cov, cred, lo, hi, pvalue)


def marginal_coverage(
    theta: Tensor,
    samples: Tensor,
    levels: int | Tensor = 21,
    confidence: float = 0.99,
    seed: int = 0,
) -> Coverage:
    r"""Coverage of central (equal-tailed) credible intervals, one dimension at a time.

    With :math:`u_{bd} = \frac{1}{N}(\#\{i : \theta_{bid} < \theta_{bd}\} + \frac{1}{2}
    \#\{\text{ties}\})`, the smallest central interval holding :math:`\theta_{bd}` has level
    :math:`c_{bd} = |2 u_{bd} - 1|`; the coverage at level :math:`\alpha` is the fraction of
    simulations with :math:`c_{bd} \le \alpha`.

    Arguments:
        theta: True parameters ``(B, D)``.
        samples: Posterior samples ``(B, N, D)``.

    Returns:
        A :class:`Coverage` with ``coverage`` ``(K, D)``, ``credibility`` ``(B, D)`` and
        ``pvalue`` ``(D,)`` (KS test of the randomised PIT :math:`u_{bd}`).
    """
    th, sm = _samples(theta, samples)
    N = sm.shape[1]
    below = (sm < th[:, None]).double().sum(1)
    ties = (sm == th[:, None]).double().sum(1)
    u = (below + 0.5 * ties) / N
    cred = (2 * u - 1).abs()
    lv = _levels(levels)
    cov = (cred[None] <= lv[:, None, None] + 1e-12).double().mean(1)
    lo, hi = binomial_band(th.shape[0], lv, confidence)
    pit = _randomised(below, ties, N, _generator(seed))
    pvalue = torch.tensor([_ks_uniform(pit[:, d]) for d in range(th.shape[1])])
    return Coverage(lv, cov, cred, lo, hi, pvalue)


# ---------------------------------------------------------------------------------------------
# TARP


@dataclass(frozen=True)
class TARP:
    """Tests of Accuracy with Random Points (Lemos et al. 2023).

    Attributes:
        levels: Credibility levels ``alpha`` ``(K,)`` in ``[0, 1]``.
        ecp: Expected coverage probability at each level ``(K,)``.
        credibility: ``f_b`` ``(B,)``: the fraction of samples closer to the reference point
            than the truth.
        references: The reference points ``(B, D)`` (in normalised coordinates).
        atc: Signed area :math:`\\int_0^1 (\\mathrm{ECP}(\\alpha) - \\alpha) d\\alpha`
            (trapezoid rule): > 0 under-confident, < 0 over-confident (or biased).
        distance: :math:`\\max_\\alpha |\\mathrm{ECP}(\\alpha) - \\alpha|` over the levels.
        lower, upper: Pointwise binomial band ``(K,)`` of a calibrated posterior's ECP.
        pvalue: KS p-value of the uniformity of the randomised ``f_b``.
    """

    levels: Tensor
    ecp: Tensor
    credibility: Tensor
    references: Tensor
    atc: float
    distance: float
    lower: Tensor
    upper: Tensor
    pvalue: float


def tarp(
    theta: Tensor,
    samples: Tensor,
    *,
    bounds: tuple[Tensor, Tensor] | None = None,
    references: Tensor | None = None,
    normalize: bool = True,
    metric: str = "euclidean",
    levels: int | Tensor = 101,
    confidence: float = 0.99,
    seed: int = 0,
) -> TARP:
    r"""TARP expected coverage (Lemos et al. 2023).

    For each simulation ``b``, draw a reference point :math:`r_b` (independent of
    :math:`\theta_b`), take the ball around :math:`r_b` through :math:`\theta_b`, and its
    posterior mass :math:`f_b = \frac{1}{N}\#\{i : \|\theta_{bi} - r_b\| < \|\theta_b -
    r_b\|\}`; :math:`\mathrm{ECP}(\alpha) = \frac{1}{B}\#\{b : f_b < \alpha\}`. For a calibrated
    posterior ECP(alpha) = alpha; TARP is necessary and sufficient for calibration when the
    reference distribution varies (Lemos et al., Theorem 3).

    Coordinates are first normalised to ``[0, 1]^D``: by ``bounds`` (finite lower and upper
    of the parameters' range, e.g. a uniform prior's), else by the min and max of ``theta``
    over the simulations (as the ``tarp`` package). Reference points are then uniform on
    ``[0, 1]^D`` unless given.

    Arguments:
        theta: True parameters ``(B, D)``.
        samples: Posterior samples ``(B, N, D)``.
        bounds: ``(lower, upper)`` ``(D,)`` used to normalise (entries that are infinite fall
            back to the min/max of ``theta``).
        references: Reference points ``(B, D)`` in the normalised coordinates (default:
            uniform, seeded by ``seed``).
        normalize: Whether to normalise (``False``: ``references`` default to uniform in the
            bounding box of ``theta``).
        metric: ``"euclidean"`` or ``"manhattan"``.
        levels: Number of levels in ``[0, 1]``, or the levels.
        confidence: Of the pointwise binomial band.
        seed: Seeds the reference points and the tie randomisation.

    Returns:
        A :class:`TARP`.
    """
    th, sm = _samples(theta, samples)
    B, N, D = sm.shape
    if metric not in ("euclidean", "manhattan"):
        raise ValueError(f"metric must be 'euclidean' or 'manhattan', got {metric!r}")
    g = _generator(seed)
    lo_t, hi_t = th.min(0).values, th.max(0).values
    if bounds is not None:
        lo_b = _tensor(bounds[0], "bounds[0]").reshape(-1)
        hi_b = _tensor(bounds[1], "bounds[1]").reshape(-1)
        if lo_b.numel() != D or hi_b.numel() != D:
            raise ValueError(f"bounds must be two tensors of {D} entries")
        lo_t = torch.where(torch.isfinite(lo_b), lo_b, lo_t)
        hi_t = torch.where(torch.isfinite(hi_b), hi_b, hi_t)
    if normalize:
        span = hi_t - lo_t + 1e-10
        th = (th - lo_t) / span
        sm = (sm - lo_t) / span
        box_lo, box_hi = torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
    else:
        box_lo, box_hi = lo_t, hi_t
    if references is None:
        ref = box_lo + (box_hi - box_lo) * torch.rand(B, D, generator=g, dtype=torch.float64)
    else:
        ref = _finite(_tensor(references, "references"), "references")
        if ref.shape != (B, D):
            raise ValueError(f"references must have shape ({B}, {D}), got {tuple(ref.shape)}")
    if metric == "euclidean":
        d_s = (sm - ref[:, None]).square().sum(-1).sqrt()
        d_t = (th - ref).square().sum(-1).sqrt()
    else:
        d_s = (sm - ref[:, None]).abs().sum(-1)
        d_t = (th - ref).abs().sum(-1)
    count = (d_s < d_t[:, None]).double().sum(1)
    ties = (d_s == d_t[:, None]).double().sum(1)
    f = count / N
    lv = _levels(levels)
    ecp = (f[None, :] < lv[:, None]).double().mean(1)
    if float(lv.max()) == 1.0:
        ecp = torch.where(lv == 1.0, torch.ones_like(ecp), ecp)
    gap = ecp - lv
    order = torch.argsort(lv)
    atc = float(torch.trapezoid(gap[order], lv[order])) if lv.numel() > 1 else 0.0
    lo, hi = binomial_band(B, lv, confidence)
    pvalue = _ks_uniform(_randomised(count, ties, N, g))
    return TARP(lv, ecp, f, ref, atc, float(gap.abs().max()), lo, hi, pvalue)


# ---------------------------------------------------------------------------------------------
# SBC


@dataclass(frozen=True)
class SBC:
    """Simulation-based calibration ranks (Talts et al. 2018).

    Attributes:
        ranks: ``(B, D)`` integer ranks in ``0..N`` (ties broken at random).
        num_samples: ``N``.
        bins: Number of histogram bins.
        counts: ``(bins, D)`` rank histogram.
        expected: ``(bins,)`` expected count per bin under uniformity.
        pvalues: ``(D,)`` Pearson chi-square p-values of the binned ranks.
        ks_pvalues: ``(D,)`` KS p-values of the randomised ranks ``(rank + U) / (N + 1)``.
    """

    ranks: Tensor
    num_samples: int
    bins: int
    counts: Tensor
    expected: Tensor
    pvalues: Tensor
    ks_pvalues: Tensor


def sbc(
    theta: Tensor,
    samples: Tensor,
    *,
    bins: int | None = None,
    statistic: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
) -> SBC:
    r"""SBC ranks and their uniformity tests.

    The rank of :math:`\theta_{bd}` is :math:`r_{bd} = \#\{i : \theta_{bid} < \theta_{bd}\}`
    plus a uniform draw in ``0..#ties``; if the ``N`` samples are independent draws of a
    calibrated posterior, :math:`r_{bd}` is uniform on ``{0, ..., N}``.

    Arguments:
        theta: True parameters ``(B, D)``.
        samples: Posterior samples ``(B, N, D)`` (thin correlated chains first).
        bins: Histogram bins for the chi-square test (default: ``min(N + 1, max(2, B // 20))``
            so that each bin expects about 20 counts). Ranks ``0..N`` are split into ``bins``
            groups of (nearly) equal size, and the expected counts follow the group sizes.
        statistic: Optional test function ``(..., D) -> (..., D')`` applied to ``theta`` and
            the samples before ranking (e.g. the log-likelihood; default: the identity).
        seed: Seeds the tie breaking and the randomised ranks.

    Returns:
        An :class:`SBC`.
    """
    th, sm = _samples(theta, samples)
    if statistic is not None:
        th = _tensor(statistic(th), "statistic(theta)")
        sm = _tensor(statistic(sm), "statistic(samples)")
        if th.dim() == 1:
            th, sm = th[:, None], sm[..., None]
    B, N, D = sm.shape
    g = _generator(seed)
    below = (sm < th[:, None]).double().sum(1)
    ties = (sm == th[:, None]).double().sum(1)
    extra = torch.floor(torch.rand(B, D, generator=g, dtype=torch.float64) * (ties + 1))
    ranks = (below + extra).long()
    if bins is None:
        bins = min(N + 1, max(2, B // 20))
    if not isinstance(bins, int) or not 2 <= bins <= N + 1:
        raise ValueError(f"bins must be an int in [2, N + 1 = {N + 1}], got {bins!r}")
    # rank k falls in bin floor(k * bins / (N + 1))
    which = torch.div(ranks * bins, N + 1, rounding_mode="floor")
    counts = torch.stack([torch.bincount(which[:, d], minlength=bins) for d in range(D)], 1)
    sizes = torch.bincount(torch.div(torch.arange(N + 1) * bins, N + 1, rounding_mode="floor"),
                           minlength=bins).double()
    expected = B * sizes / (N + 1)
    pvalues = torch.tensor([
        float(stats.chisquare(counts[:, d].numpy(), expected.numpy()).pvalue) for d in range(D)])
    u = (ranks.double() + torch.rand(B, D, generator=g, dtype=torch.float64)) / (N + 1)
    ks = torch.tensor([_ks_uniform(u[:, d]) for d in range(D)])
    return SBC(ranks, N, bins, counts, expected, pvalues, ks)
