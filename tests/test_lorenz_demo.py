"""The default demo (Lorenz-63 assimilation) and its metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from plausible.lorenz_demo import lorenz_demo, lorenz_prior, wasserstein_1d

F64 = torch.float64


def test_wasserstein_1d_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g, dtype=F64)
    # a shift by c moves every quantile by c: W1 = |c| exactly
    shift = torch.tensor([0.5, -2.0, 0.0], dtype=F64)
    torch.testing.assert_close(wasserstein_1d(x + shift, x), shift.abs(), atol=1e-12, rtol=0)
    # different sizes: the integral of |F^-1 - G^-1| against scipy's implementation
    scipy_stats = pytest.importorskip("scipy.stats")
    y = 0.3 + 1.5 * torch.randn(321, 3, generator=g, dtype=F64)
    w = wasserstein_1d(x, y)
    for d in range(3):
        assert float(w[d]) == pytest.approx(
            scipy_stats.wasserstein_distance(x[:, d].numpy(), y[:, d].numpy()), rel=1e-10)
    with pytest.raises(ValueError, match="must agree after the first axis"):
        wasserstein_1d(x, y[:, :2])


def test_shipped_prior_loads_and_composes():
    prior = lorenz_prior(65)
    assert prior.shape == (65, 3) and prior.order == 4
    # the window prior knows the data: at low noise it returns nearly clean states
    from plausible.tasks.lorenz import Lorenz63

    sim = Lorenz63()
    x = sim.standardize(sim.trajectories(8, 65, burn_in=256, generator=torch.Generator()
                                         .manual_seed(1), progress=False)).float()
    t = torch.tensor(0.05)
    alpha, sigma = prior.schedule(t)
    x_t = alpha * x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (prior(x_t, t) - x).square().mean().sqrt()
    assert float(err) < 0.5 * float(sigma / alpha)  # denoising beats the noise it removes


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lorenz")
    torch.manual_seed(0)
    metrics = lorenz_demo(out, samples=48, steps=16, seed=0, quiet=True, particles=4096,
                          stream=open(out / "stdout.txt", "w"))  # noqa: SIM115
    return out, metrics


def test_demo_writes_figure_and_metrics(demo_run):
    out, metrics = demo_run
    assert (out / "posterior.png").stat().st_size > 10_000
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(metrics["methods"]) == {"MMPS", "reference"}


def test_demo_posterior_explains_the_observations(demo_run):
    _, metrics = demo_run
    mmps, ref = metrics["methods"]["MMPS"], metrics["methods"]["reference"]
    # 9 observations with noise 0.05: log p(y | x) of the truth has mean
    # 9 (-1/2 - log 0.05 - log(2 pi) / 2) = 14.2 with std 3/sqrt(2) = 2.1; samples of a good
    # posterior sit within a few of these std (the reference's do)
    expected = 9 * (-0.5 - math.log(0.05) - 0.5 * math.log(2 * math.pi))
    assert abs(ref["log_p_y_given_x"] - expected) < 4 * 2.13
    assert abs(mmps["log_p_y_given_x"] - expected) < 4 * 2.13
    # the posterior mean is much closer to the truth than the prior (std 1 per entry)
    assert mmps["rmse"] < 0.4 and ref["rmse"] < 0.4
    assert 0.5 <= mmps["coverage_90"] <= 1.0
    # and the observations bring the samples most of the way from the prior to the
    # reference: measured with the demo's settings (256 samples, 64 steps), samples of the
    # composed prior alone are 105x the reference's own W1 floor, MMPS 17x (the gap left is
    # the window composition's: BENCHMARKS.md, data assimilation), the reference 1x
    assert mmps["w1_over_floor"] < 35.0
