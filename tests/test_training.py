"""A small MLP prior trained with ``fit`` reproduces a 2-D Gaussian mixture (two-sample test
against exact samples, with the exact-vs-exact statistic as the floor)."""

from __future__ import annotations

import json
import math

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


class _LinearRegression(torch.nn.Module):
    """theta ~ W y: with more features than training pairs it interpolates noise (over-fits)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.config = {"features": features}
        self.linear = torch.nn.Linear(features, 1)

    def loss(self, theta: torch.Tensor, y: torch.Tensor, **_: object) -> torch.Tensor:
        return (self.linear(y) - theta).square().mean()


plausible.checkpoints.register(_LinearRegression, name="tests._LinearRegression")


def _regression_pairs(n: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, features, generator=g)
    theta = y[:, :1] + 0.5 * torch.randn(n, 1, generator=g)  # only feature 0 matters
    return theta, y


def test_early_stopping_keeps_the_best_validated_weights(tmp_path):
    torch.manual_seed(0)
    train, held_out = _regression_pairs(24, 40, seed=1), _regression_pairs(200, 40, seed=2)
    model = _LinearRegression(40)
    history = plausible.fit(model, train, steps=3000, batch_size=24, lr=1e-2, ema=0.0,
                            decay="constant", warmup=0, validation=held_out, validate_every=10,
                            log_every=10, patience=5, progress=False,
                            checkpoint=tmp_path / "run", checkpoint_every=100)
    val = history["val_loss"]
    best = min(range(len(val)), key=val.__getitem__)
    # it stopped on its own, `patience` validations after the best one ...
    assert history["stopped"][0] < 3000
    assert len(val) - 1 - best == 5
    # ... and ended with the best weights, not the last ones
    with torch.no_grad():
        final = float(model.loss(*held_out))
    assert final == pytest.approx(val[best], rel=1e-6)
    assert val[-1] > val[best]
    # the run's last checkpoint holds the same (best) weights for sampling
    from safetensors.torch import load_file

    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert latest["step"] == history["stopped"][0]
    saved = load_file(tmp_path / "run" / latest["folder"] / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(saved[name], value)
    # training to the end over-fits: the held-out loss is worse than the early-stopped one
    torch.manual_seed(0)
    full = _LinearRegression(40)  # the same initial weights
    plausible.fit(full, train, steps=3000, batch_size=24, lr=1e-2, ema=0.0, decay="constant",
                  warmup=0, progress=False)
    with torch.no_grad():
        assert float(full.loss(*held_out)) > 1.2 * final


def test_plateau_decay_halves_the_rate_after_stalled_validations(tmp_path):
    """decay='plateau': the learning rate halves after every patience // 3 validations without
    a new best, read from the logged rates (the over-fitting regression above stalls)."""
    torch.manual_seed(0)
    train, held_out = _regression_pairs(24, 40, seed=1), _regression_pairs(200, 40, seed=2)
    history = plausible.fit(_LinearRegression(40), train, steps=3000, batch_size=24, lr=1e-2,
                            ema=0.0, decay="plateau", warmup=0, validation=held_out,
                            validate_every=10, log_every=10, patience=9, progress=False,
                            checkpoint=tmp_path / "run", checkpoint_every=100)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [x["val_loss"] for x in lines]
    rates = [x["lr"] for x in lines]
    # replay the rule on the logged validation losses: the rate logged with validation i is
    # the one in force after validation i - 1
    best, stale, scale = math.inf, 0, 1.0
    for i, v in enumerate(val):
        assert rates[i] == pytest.approx(1e-2 * scale, rel=1e-9), i
        if v < best:
            best, stale = v, 0
        else:
            stale += 1
            if stale >= 3:
                scale, stale = scale / 2, 0
    assert scale <= 1 / 8  # three halvings before the 9 stalled validations stop it
    assert history["stopped"][0] < 3000
    with pytest.raises(ValueError, match="plateau"):
        plausible.fit(_LinearRegression(3), train, steps=5, decay="plateau", progress=False)


def test_validation_fraction_holds_out_part_of_the_data():
    theta, y = _regression_pairs(40, 3, seed=3)
    history = plausible.fit(_LinearRegression(3), (theta, y), steps=20, batch_size=8, ema=0.0,
                            validation=0.25, validate_every=5, log_every=5, progress=False)
    assert history["val_step"] == [5, 10, 15, 20]
    with pytest.raises(ValueError, match="needs validation"):
        plausible.fit(_LinearRegression(3), (theta, y), steps=5, patience=2, progress=False)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        plausible.fit(_LinearRegression(3), (theta, y), steps=5, validation=1.5,
                      progress=False)
