"""A small MLP prior trained with ``fit`` reproduces a 2-D Gaussian mixture (two-sample test
against exact samples, with the exact-vs-exact statistic as the floor)."""

from __future__ import annotations

import pytest
import torch

import plausible
from helpers import energy_distance
from plausible import GaussianMixtureDenoiser, sample


@pytest.fixture(scope="module")
def mixture():
    covs = torch.tensor([[0.3, 0.1], [0.1, 0.4]]).expand(2, 2, 2) * torch.tensor([1.0, 0.5])[
        :, None, None
    ]
    return GaussianMixtureDenoiser(
        torch.tensor([0.5, 0.5]), torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), covs
    )


def test_trained_mlp_prior_reproduces_a_mixture(mixture):
    data = mixture.sample(20_000, generator=torch.Generator().manual_seed(0)).float()
    torch.manual_seed(0)
    prior = plausible.Denoiser(plausible.nets.ResMLP(features=2, hidden=64, blocks=2))
    assert prior.shape == (2,)
    untrained = sample(prior, 2000, steps=64, seed=0, progress=False)
    history = plausible.fit(prior, data, steps=1500, batch_size=256, lr=2e-3, progress=False)
    assert len(history["loss"]) == 1500
    assert sum(history["loss"][-100:]) < sum(history["loss"][:100])
    x = sample(prior, 2000, steps=64, sampler="ddpm", seed=0, progress=False)
    ref = mixture.sample(2000, generator=torch.Generator().manual_seed(1))
    ref2 = mixture.sample(2000, generator=torch.Generator().manual_seed(2))
    floor = energy_distance(ref2, ref)
    assert energy_distance(x, ref) < 3 * floor, (energy_distance(x, ref), floor)
    # the same statistic does fail for the untrained network
    assert energy_distance(untrained, ref) > 10 * floor
    # mode weights: fraction in the right-hand mode within 4 binomial standard errors of 1/2
    frac = float((x[:, 0] > 0).double().mean())
    assert abs(frac - 0.5) < 4 * (0.25 / 2000) ** 0.5


def test_fit_rejects_bad_data():
    prior = plausible.Denoiser(plausible.nets.ResMLP(features=2, hidden=16, blocks=1))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        plausible.fit(prior, torch.randn(10, 3), steps=1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        plausible.fit(prior, torch.full((10, 2), float("nan")), steps=1, progress=False)


def test_fit_is_reproducible_under_a_seed():
    data = torch.randn(512, 2)
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        prior = plausible.Denoiser(plausible.nets.ResMLP(features=2, hidden=16, blocks=1))
        plausible.fit(prior, data, steps=20, batch_size=32, seed=7, progress=False)
        weights.append(torch.cat([p.flatten() for p in prior.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_bf16_autocast_and_accumulation_train():
    """bf16 autocast and gradient accumulation run and lower the loss of a small prior."""
    torch.manual_seed(0)
    data = torch.randn(2048, 4) * 0.5 + 1.0
    prior = plausible.Denoiser(plausible.nets.ResMLP(features=4, hidden=32, blocks=1))
    history = plausible.fit(prior, data, steps=200, batch_size=128, precision="bf16",
                            accumulate=2, lr=3e-3, progress=False, log_every=1)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    assert sum(history["loss"][-20:]) < 0.8 * sum(history["loss"][:20])


def test_accumulation_equals_one_big_batch():
    """With the noise drawn for the global batch, 2 micro-batches give the same step as one."""
    data = torch.randn(256, 3)
    weights = []
    for accumulate in (1, 2):
        torch.manual_seed(1)
        prior = plausible.Denoiser(plausible.nets.ResMLP(features=3, hidden=16, blocks=1))
        plausible.fit(prior, data, steps=5, batch_size=64, accumulate=accumulate, ema=0.0,
                      seed=2, progress=False)
        weights.append(torch.cat([p.flatten() for p in prior.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_trains():
    torch.manual_seed(0)
    prior = plausible.Denoiser(plausible.nets.ResMLP(features=4, hidden=32, blocks=1))
    history = plausible.fit(prior, torch.randn(512, 4), steps=30, batch_size=64, compile=True,
                            progress=False)
    assert len(history["loss"]) == 30
