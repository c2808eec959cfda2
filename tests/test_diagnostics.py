"""Calibration diagnostics on cases with known answers.

The reference model is conjugate: ``theta ~ N(0, I_2)``, ``y = theta + N(0, s^2 I_2)``, whose
exact posterior is ``N(y / (1 + s^2), s^2 / (1 + s^2) I_2)``. Over ``B`` simulated pairs, the
exact posterior is calibrated; the same posterior with its standard deviation halved is
over-confident (and doubled, under-confident).

"Passes" means, with the fixed seeds below:
- every uniformity p-value (KS of the randomised credibility / PIT, chi-square of SBC ranks)
  is above 0.01;
- the coverage / ECP curve stays within the DKW simultaneous band
  ``eps = sqrt(log(2 / 0.01) / (2 B))`` of the diagonal (plus ``1 / (N + 1)`` for the
  discreteness of the credibility).
"Fails" means a p-value below 1e-6 and a curve farther than ``2 eps`` from the diagonal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from plausible import diagnostics as dg


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small tensor operations: one intra-op thread avoids oversubscription on a shared
    machine (restored after each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


B, N, D, S2 = 1000, 200, 2, 0.25
EPS = math.sqrt(math.log(2 / 0.01) / (2 * B)) + 1 / (N + 1)


def _conjugate(shrink: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = theta + math.sqrt(S2) * torch.randn(B, D, generator=g, dtype=torch.float64)
    mean = y / (1 + S2)
    std = shrink * math.sqrt(S2 / (1 + S2))
    samples = mean[:, None] + std * torch.randn(B, N, D, generator=g, dtype=torch.float64)

    def log_prob(points: torch.Tensor) -> torch.Tensor:  # (B, M, D) -> (B, M)
        return (-0.5 * ((points - mean[:, None]) / std).square().sum(-1)
                - D * math.log(std * math.sqrt(2 * math.pi)))

    return theta, samples, log_prob


@pytest.fixture(scope="module")
def calibrated():
    return _conjugate(1.0)


@pytest.fixture(scope="module")
def overconfident():
    return _conjugate(0.5)


def _gap(levels: torch.Tensor, curve: torch.Tensor) -> float:
    return float((curve - levels.reshape(-1, *([1] * (curve.dim() - 1)))).abs().max())


# --- coverage -------------------------------------------------------------------------------


def test_hpd_credibility_counts_denser_samples():
    lps = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -2.0, -3.0, -4.0]])
    lpt = torch.tensor([1.5, 0.0])
    assert dg.hpd_credibility(lps, lpt).tolist() == [0.5, 0.0]
    assert dg.hpd_credibility(lps, torch.tensor([-math.inf, 5.0])).tolist() == [1.0, 0.0]


def test_expected_coverage_calibrated(calibrated):
    theta, samples, log_prob = calibrated
    res = dg.expected_coverage(log_prob_fn=log_prob, theta=theta, samples=samples)
    assert res.pvalue > 0.01
    assert _gap(res.levels, res.coverage) < EPS
    # the band is the binomial band around the diagonal
    assert bool((res.lower <= res.levels + 1e-12).all() and (res.upper >= res.levels - 1e-12).all())
    # the same result from explicit log densities
    explicit = dg.expected_coverage(log_prob(samples), log_prob(theta[:, None])[:, 0])
    assert torch.equal(explicit.credibility, res.credibility)


def test_expected_coverage_overconfident_and_underconfident(overconfident):
    theta, samples, log_prob = overconfident
    res = dg.expected_coverage(log_prob_fn=log_prob, theta=theta, samples=samples)
    assert res.pvalue < 1e-6
    assert _gap(res.levels, res.coverage) > 2 * EPS
    # below the diagonal: over-confident. For a Gaussian with std shrunk by k the exact
    # coverage at level a of the 2-D HPD region is 1 - (1 - a)^(k^2) (chi-square with 2 dof).
    exact = 1 - (1 - res.levels) ** 0.25
    assert _gap(exact, res.coverage) < EPS
    theta, samples, log_prob = _conjugate(2.0, seed=1)
    res = dg.expected_coverage(log_prob_fn=log_prob, theta=theta, samples=samples)
    assert _gap(1 - (1 - res.levels) ** 4.0, res.coverage) < EPS


def test_marginal_coverage(calibrated, overconfident):
    theta, samples, _ = calibrated
    res = dg.marginal_coverage(theta, samples)
    assert res.coverage.shape == (21, D) and res.credibility.shape == (B, D)
    assert bool((res.pvalue > 0.01).all())
    assert _gap(res.levels, res.coverage) < EPS
    theta, samples, _ = overconfident
    res = dg.marginal_coverage(theta, samples)
    assert bool((res.pvalue < 1e-6).all())
    # exact: P(|Z| k <= z_a) with z_a the central-a quantile: 2 Phi(k z_a) - 1, k = 0.5
    z = stats.norm.ppf((1 + res.levels.numpy()) / 2)
    exact = torch.from_numpy(2 * stats.norm.cdf(0.5 * z) - 1)
    assert _gap(exact, res.coverage) < EPS


# --- TARP -----------------------------------------------------------------------------------


def test_tarp_calibrated(calibrated):
    theta, samples, _ = calibrated
    res = dg.tarp(theta, samples, seed=3)
    assert res.pvalue > 0.01
    assert res.distance < EPS
    assert abs(res.atc) < EPS
    assert float(res.ecp[0]) == 0.0 and float(res.ecp[-1]) == 1.0
    # with finite bounds (a box that contains everything) the test is still exact
    res = dg.tarp(theta, samples, bounds=(-6 * torch.ones(D), 6 * torch.ones(D)), seed=4)
    assert res.pvalue > 0.01 and res.distance < EPS


def test_tarp_overconfident(overconfident):
    theta, samples, _ = overconfident
    res = dg.tarp(theta, samples, seed=3)
    assert res.pvalue < 1e-6
    assert res.distance > 2 * EPS


def test_tarp_known_credibility():
    # one sample at distance 1, one at 3 from the reference; truth at distance 2: f = 1/2
    theta = torch.tensor([[2.0, 0.0]])
    samples = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    res = dg.tarp(theta, samples, references=torch.zeros(1, 2), normalize=False, levels=5)
    assert res.credibility.tolist() == [0.5]
    assert res.ecp.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # ECP(a) = [f < a], levels 0..1


# --- SBC ------------------------------------------------------------------------------------


def test_sbc_calibrated(calibrated):
    theta, samples, _ = calibrated
    res = dg.sbc(theta, samples)
    assert res.ranks.shape == (B, D) and int(res.ranks.min()) >= 0
    assert int(res.ranks.max()) <= N
    assert int(res.counts.sum()) == B * D
    assert float(res.expected.sum()) == pytest.approx(B)
    assert bool((res.pvalues > 0.01).all()) and bool((res.ks_pvalues > 0.01).all())


def test_sbc_overconfident(overconfident):
    theta, samples, _ = overconfident
    res = dg.sbc(theta, samples)
    assert bool((res.pvalues < 1e-6).all()) and bool((res.ks_pvalues < 1e-6).all())
    # over-confidence piles the ranks at both ends (the U shape)
    ends = (res.counts[0] + res.counts[-1]).double()
    assert bool((ends > 3 * (res.expected[0] + res.expected[-1])).all())


def test_sbc_rank_counts_and_ties():
    theta = torch.tensor([[0.5], [0.0]])
    samples = torch.tensor([[[0.0], [1.0], [0.2]], [[0.0], [0.0], [0.0]]])
    res = dg.sbc(theta, samples, bins=2)
    assert int(res.ranks[0, 0]) == 2
    assert 0 <= int(res.ranks[1, 0]) <= 3  # all tied: uniform in 0..3


def test_sbc_statistic_is_applied():
    theta, samples, _ = _conjugate(1.0, seed=5)
    res = dg.sbc(theta, samples, statistic=lambda x: x.square().sum(-1))
    assert res.ranks.shape == (B, 1) and float(res.pvalues[0]) > 0.01


# --- bands ----------------------------------------------------------------------------------


def test_ecdf_band_has_its_simultaneous_coverage():
    num, confidence = 200, 0.9
    z, lo, hi = dg.ecdf_band(num, 51, confidence, simulations=2000, seed=0)
    rng = np.random.default_rng(1)
    inside = 0
    trials = 1000
    for _ in range(trials):
        u = np.sort(rng.random(num))
        ecdf = np.searchsorted(u, z.numpy(), side="right") / num
        inside += bool(((ecdf >= lo.numpy() - 1e-12) & (ecdf <= hi.numpy() + 1e-12)).all())
    sd = math.sqrt(confidence * (1 - confidence) / trials)
    assert abs(inside / trials - confidence) < 4 * sd + 0.01


def test_binomial_band_covers_binomial_draws():
    levels = torch.tensor([0.1, 0.5, 0.9])
    lo, hi = dg.binomial_band(400, levels, 0.99)
    rng = np.random.default_rng(0)
    draws = rng.binomial(400, levels.numpy(), size=(20000, 3)) / 400
    frac = ((draws >= lo.numpy()) & (draws <= hi.numpy())).mean(0)
    assert bool((frac >= 0.99 - 0.003).all())


# --- C2ST -----------------------------------------------------------------------------------


def _binomial_tol(n: int) -> float:
    """3 standard deviations of an accuracy measured on ``n`` held-out predictions."""
    return 3 * math.sqrt(0.25 / n)


def test_c2st_identical_distributions_near_half():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 2, generator=g)
    y = torch.randn(1000, 2, generator=g)
    assert abs(dg.c2st(x, y) - 0.5) < _binomial_tol(2000)
    assert abs(dg.c2st(x, y, classifier="rf") - 0.5) < _binomial_tol(2000)


def test_c2st_separated_distributions_near_one():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 3, generator=g)
    y = torch.randn(500, 3, generator=g) + 6.0
    assert dg.c2st(x, y) > 0.99
    assert dg.c2st(x, y, classifier="rf") > 0.99


def test_c2st_matches_bayes_accuracy():
    # N(0, 1) vs N(1, 1): the optimal classifier thresholds at 1/2, accuracy Phi(1/2) = 0.6915
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 1, generator=g)
    y = torch.randn(2000, 1, generator=g) + 1.0
    bayes = float(stats.norm.cdf(0.5))
    acc = dg.c2st(x, y)
    assert abs(acc - bayes) < _binomial_tol(4000) + 0.01  # + the MLP's excess risk


def test_c2st_rejects_bad_input():
    x = torch.randn(50, 2)
    with pytest.raises(ValueError, match="same D"):
        dg.c2st(x, torch.randn(50, 3))
    with pytest.raises(ValueError, match="classifier"):
        dg.c2st(x, x, classifier="svm")
    with pytest.raises(ValueError, match="finite"):
        dg.c2st(x, torch.full((50, 2), math.nan))
    with pytest.raises(ValueError, match="folds"):
        dg.c2st(x, x, folds=1)


def test_validation_messages():
    theta = torch.randn(10, 2)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        dg.sbc(theta, torch.randn(10, 5, 3))
    with pytest.raises(ValueError, match="finite"):
        dg.tarp(theta, torch.full((10, 5, 2), math.nan))
    with pytest.raises(ValueError, match="log_prob_fn"):
        dg.expected_coverage(torch.randn(10, 5))
    with pytest.raises(ValueError, match="levels"):
        dg.marginal_coverage(theta, torch.randn(10, 5, 2), levels=torch.tensor([1.5]))
    with pytest.raises(TypeError):
        dg.sbc([[0.0]], torch.randn(1, 2, 1))


# --- figures --------------------------------------------------------------------------------


def test_diagnostic_figures_render(tmp_path, calibrated, overconfident):
    from plausible import plots

    results = {}
    for name, (theta, samples, log_prob) in {"exact": calibrated,
                                             "shrunk": overconfident}.items():
        results[name] = (dg.expected_coverage(log_prob_fn=log_prob, theta=theta,
                                              samples=samples),
                         dg.tarp(theta, samples), dg.sbc(theta, samples))
    figs = {
        "coverage.png": plots.coverage_plot({k: v[0] for k, v in results.items()}),
        "marginal.png": plots.coverage_plot(dg.marginal_coverage(*calibrated[:2]),
                                            names=["a", "b"]),
        "tarp.png": plots.tarp_plot({k: v[1] for k, v in results.items()}),
        "sbc.png": plots.sbc_histogram(results["shrunk"][2]),
        "ecdf.png": plots.sbc_ecdf(results["shrunk"][2]),
    }
    for name, fig in figs.items():
        fig.savefig(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 5000
    # one curve per result (+ the diagonal) in the TARP plot; one panel per dimension in SBC
    assert len(figs["tarp.png"].axes[0].get_lines()) == 3
    assert len([ax for ax in figs["sbc.png"].axes if ax.axison]) == D
    with pytest.raises(TypeError, match="TARP"):
        plots.tarp_plot(results["exact"][0])
    with pytest.raises(TypeError, match="SBC"):
        plots.sbc_histogram(results["exact"][1])


def test_c2st_is_sbibm_c2st():
    """The MLP C2ST equals ``sbibm.metrics.c2st`` run from the sbibm 1.1.0 wheel's source
    (that file needs only numpy, torch and scikit-learn; sbibm itself is not imported)."""
    import zipfile

    from plausible.tasks.sbi import sbibm_wheel

    try:
        path = sbibm_wheel()
    except FileNotFoundError:
        pytest.skip("sbibm 1.1.0 wheel not downloaded")
    with zipfile.ZipFile(path) as zf:
        source = zf.read("sbibm/metrics/c2st.py").decode()
    namespace: dict = {}
    exec(compile(source, "sbibm/metrics/c2st.py", "exec"), namespace)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2, generator=g)
    y = torch.randn(200, 2, generator=g) * 1.3 + 1.0
    ours = dg.c2st(x, y, seed=7)
    assert ours == float(namespace["c2st"](x, y, seed=7)[0])
    assert 0.6 < ours < 0.95  # a case where the folds and the fit matter
    assert dg.c2st(x, y, scoring="roc_auc") == float(namespace["c2st_auc"](x, y)[0])
