"""The `plausible sbi` command: train, sample and check wire the library correctly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from plausible.checkpoints import load
from plausible.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sbi") / "run"
    code = main(["sbi", "train", "--task", "two_moons", "--simulations", "400", "--steps",
                 "30", "--batch-size", "64", "--out", str(out), "--quiet"])
    torch.set_num_threads(threads)
    assert code == 0
    return out


def _has_wheel() -> bool:
    from plausible.tasks.sbi import sbibm_wheel

    try:
        sbibm_wheel()
    except FileNotFoundError:
        return False
    return True


def test_train_writes_a_loadable_run(run):
    info = json.loads((run / "sbi.json").read_text())
    assert info["task"] == "two_moons" and info["simulations"] == 400 and info["steps"] == 30
    # early stopping is on by default (10 % held out), and at most the given steps ran
    assert info["patience"] == 10 and 1 <= info["steps_run"] <= 30
    assert info["decay"] == "plateau"  # the learning rate halves on validation plateaus
    model = load(run)
    assert model.prior["kind"] == "box" and model.y_shape == (2,)
    # 400 simulations: the narrow network of network_width, saved with the model
    assert info["hidden"] == 64 and model.backbone.config["hidden"] == 64
    # support="auto" chose the logit (two_moons' posteriors reach the box: the expected
    # acceptance is about 0.85 < 0.9), and the standardisation was fitted: the logit of
    # U(-1, 1) has std pi / sqrt(3)
    assert model.support == "bijection" and info["support"] == "bijection"
    assert 0.75 < info["expected_acceptance"] < 0.9
    assert ((model.z_scale / (math.pi / math.sqrt(3)) - 1).abs() < 0.15).all()


@pytest.mark.skipif(not _has_wheel(), reason="the sbibm wheel is not in the cache")
def test_sample_matches_the_library_call(run, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    code = main(["sbi", "sample", str(run), "--observation", "2", "-n", "300", "--steps", "8",
                 "--seed", "3", "--out", str(out), "--quiet"])
    assert code == 0
    saved = load_file(str(out))
    assert out.with_suffix(".png").is_file()
    from plausible.tasks.sbi import get_task

    y = get_task("two_moons").observation(2)
    assert torch.equal(saved["y"], y)
    expected = load(run).given(y).sample(300, steps=8, seed=3)
    assert torch.equal(saved["theta"], expected)
    assert saved["theta"].abs().max() <= 1  # inside the prior's box


def test_sample_with_explicit_y_and_bad_arguments(run, tmp_path, capsys):
    out = tmp_path / "y.safetensors"
    assert main(["sbi", "sample", str(run), "--y", "0.1,-0.2", "-n", "20", "--steps", "4",
                 "--out", str(out), "--quiet"]) == 0
    assert load_file(str(out))["theta"].shape == (20, 2)
    # the moment-matched sampler, through the logit of two_moons' box
    assert main(["sbi", "sample", str(run), "--y", "0.1,-0.2", "-n", "20", "--steps", "4",
                 "--sampler", "ddpm-cov", "--seed", "1", "--out", str(out), "--quiet"]) == 0
    theta = load_file(str(out))["theta"]
    expected = load(run).given(torch.tensor([0.1, -0.2])).sample(20, steps=4, seed=1,
                                                                 sampler="ddpm-cov")
    assert torch.equal(theta, expected) and theta.abs().max() <= 1
    with pytest.raises(SystemExit) as info:
        main(["sbi", "sample", str(run), "--y", "0.1", "-n", "5"])
    assert info.value.code == 2
    assert "2 numbers" in capsys.readouterr().err
    assert main(["sbi", "sample", str(tmp_path), "-n", "5"]) == 1
    assert "no sbi.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sbi", "train", "--task", "nope", "--out", str(tmp_path / "x")])
    assert "unknown task" in capsys.readouterr().err


def test_check_reports_calibration(run, tmp_path, capsys):
    out = tmp_path / "check"
    code = main(["sbi", "check", str(run), "--simulations", "40", "--samples", "50",
                 "--steps", "4", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "check.json").read_text())
    assert report["simulations"] == 40 and report["samples"] == 50
    for key in ("sbc_ks_pvalues", "marginal_coverage_pvalues"):
        assert len(report[key]) == 2 and all(0 <= p <= 1 for p in report[key])
    assert 0 <= report["tarp_pvalue"] <= 1
    for name in ("sbc.png", "sbc_ecdf.png", "tarp.png", "coverage.png"):
        assert (out / name).is_file()
    assert "TARP" in capsys.readouterr().out


def test_train_support_flag(tmp_path):
    """gaussian_mixture's posteriors are narrow against its box (expected acceptance about
    0.94): --support auto (the default) rejects, --support bijection forces the logit; the
    choice is saved with the model and in sbi.json, and sampling stays inside the box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for flag, support in ((None, "reject"), ("bijection", "bijection")):
            out = tmp_path / f"run_{support}"
            argv = ["sbi", "train", "--task", "gaussian_mixture", "--simulations", "400",
                    "--steps", "10", "--batch-size", "64", "--out", str(out), "--quiet"]
            assert main(argv + (["--support", flag] if flag else [])) == 0
            info = json.loads((out / "sbi.json").read_text())
            model = load(out)
            assert model.support == info["support"] == support
            assert model.baseline == (support == "reject")
            theta = model.given(torch.tensor([9.5, -9.8])).sample(200, steps=8, seed=0)
            assert bool(model.inside(theta).all())
    finally:
        torch.set_num_threads(threads)
