r"""Tests of the command line (`plausible.cli`, `python -m plausible`) and the figures
(`plausible.plots`)."""

import contextlib
import io
import json
import math
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from plausible import cli, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLES = 512


def assert_png(path):
    """A non-empty PNG: the signature, then an IHDR chunk of positive width and height."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100
    assert data[-8:-4] == b"IEND"  # the last chunk: the file is complete
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # something was drawn


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One quiet run of the gaussian demo with small settings: (out dir, metrics, stdout)."""
    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = cli.main(["demo", "gaussian", "--out", str(out), "--quiet",
                           "--samples", str(SAMPLES), "--seed", "3"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return out, metrics, buffer.getvalue()


def test_demo_writes_files_and_metrics(demo):
    out, metrics, stdout = demo
    assert_png(out / "posterior.png")
    assert set(metrics) >= {"demo", "settings", "problem", "mc_floor", "methods"}
    assert metrics["demo"] == "gaussian"
    assert metrics["settings"] == {"samples": SAMPLES, "steps": 64, "seed": 3}
    methods = metrics["methods"]
    assert set(methods) == {"mmps-dpm++", "mmps-ddpm", "dps-ddpm", "exact-denoiser-dpm++",
                            "exact-denoiser-ddpm", "exact"}
    keys = {"method", "sampler", "steps", "mean_error", "cov_error", "mean_error_raw",
            "cov_error_raw", "wall_time_s", "denoiser_calls", "vjps", "diverged"}
    for name, row in methods.items():
        assert keys <= set(row), name
        assert not row["diverged"], name
        assert math.isfinite(row["mean_error"]) and math.isfinite(row["cov_error"]), name
    # the errors are in units of the Monte-Carlo floor of SAMPLES exact samples
    D = metrics["problem"]["dim"]
    assert metrics["mc_floor"]["mean_error_raw"] == pytest.approx(math.sqrt(D / SAMPLES))
    for row in methods.values():
        ratio = row["cov_error_raw"] / metrics["mc_floor"]["cov_error_raw"]
        assert row["cov_error"] == pytest.approx(ratio)
    # costs: one denoiser call per step, one VJP per DPS call, >= one per MMPS call
    assert methods["mmps-dpm++"]["steps"] == 16 and methods["mmps-dpm++"]["denoiser_calls"] == 16
    assert methods["dps-ddpm"]["vjps"] == methods["dps-ddpm"]["denoiser_calls"] == 64
    assert methods["mmps-ddpm"]["vjps"] >= 64
    # the table is printed, even with --quiet, and the paths
    assert "MMPS" in stdout and "DPS" in stdout and "cov err" in stdout
    assert "metrics.json" in stdout


def test_demo_mmps_is_accurate_and_beats_dps(demo):
    methods = demo[1]["methods"]
    mmps, dps = methods["mmps-dpm++"], methods["dps-ddpm"]
    # exact samples are about 1 Monte-Carlo unit off; MMPS with 16 DPM-Solver++ steps too
    assert methods["exact"]["cov_error"] < 2.0
    assert mmps["cov_error"] < 3.0
    assert mmps["mean_error"] < 3.0
    # DPS's approximate likelihood biases its posterior: well above MMPS's errors
    assert mmps["cov_error"] < dps["cov_error"]
    assert 2 * mmps["mean_error"] < dps["mean_error"]


def test_demo_mmps_matches_the_exact_denoiser(demo):
    # for a Gaussian prior with a converged solve, MMPS is the exact posterior denoiser: with
    # common random numbers both runs give the same samples, hence the same errors
    methods = demo[1]["methods"]
    for sampler in ("dpm++", "ddpm"):
        mmps, exact = methods[f"mmps-{sampler}"], methods[f"exact-denoiser-{sampler}"]
        assert mmps["cov_error_raw"] == pytest.approx(exact["cov_error_raw"], rel=1e-3, abs=1e-4)
        assert mmps["mean_error_raw"] == pytest.approx(exact["mean_error_raw"], rel=1e-3,
                                                       abs=1e-4)


def test_posterior_errors_units():
    # exact samples: both errors are about one Monte-Carlo unit (root-mean-square over draws)
    D, N = 6, 400
    g = torch.Generator().manual_seed(0)
    L = torch.randn(D, D, generator=g, dtype=torch.float64)
    cov = L @ L.T + torch.eye(D, dtype=torch.float64)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    errs = [cli.posterior_errors(mean + torch.randn(N, D, generator=g, dtype=torch.float64)
                                 @ chol.T, mean, cov) for _ in range(200)]
    rms_mean = math.sqrt(sum(e["mean_error"] ** 2 for e in errs) / len(errs))
    rms_cov = math.sqrt(sum(e["cov_error"] ** 2 for e in errs) / len(errs))
    assert rms_mean == pytest.approx(1.0, abs=0.15)
    assert rms_cov == pytest.approx(1.0, abs=0.15)
    # a shifted mean is detected in the Mahalanobis metric
    x = mean + 0.5 + torch.randn(N, D, generator=g, dtype=torch.float64) @ chol.T
    assert cli.posterior_errors(x, mean, cov)["mean_error"] > 3


def test_demo_list(capsys):
    assert cli.main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    assert "gaussian" in out and "mixture" in out
    default = [line for line in out.splitlines() if "(default)" in line]
    assert len(default) == 1 and default[0].startswith("lorenz")


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "usage: plausible" in out


def test_unknown_demo_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "nope", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown demo 'nope'" in err and "gaussian" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--samples", "0"], "must be at least 32"),
        (["--samples", "many"], "expected an integer"),
        (["--steps", "2"], "must be at least 4"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_are_clear_errors(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--out", str(tmp_path / "x"), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_directory(capsys, tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("not a directory")
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--out", str(path), "--quiet"])
    assert info.value.code == 2
    assert "not a directory" in capsys.readouterr().err


def test_unwritable_out_is_a_clear_error(capsys, tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("not a directory")
    assert cli.main(["demo", "--out", str(path / "sub"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot create the output directory" in err and "Traceback" not in err


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "plausible", "demo", "--list"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gaussian" in result.stdout
    result = subprocess.run([sys.executable, "-m", "plausible", "demo", "nope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown demo" in result.stderr


# ---------------------------------------------------------------------------------------------
# plots


def test_plots_do_not_touch_pyplot():
    code = ("import sys, plausible.plots, plausible.cli; "
            "assert 'matplotlib.pyplot' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_pair_plot_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(800, 5, generator=g)
    other = torch.randn(300, 5, generator=g) * 1.5 + 0.5
    path = tmp_path / "pair.png"
    fig = plots.pair_plot({"exact": ref, "approx": other}, dims=[0, 2, 4], reference="exact",
                          path=path, truth=torch.zeros(5))
    assert_png(path)
    assert len(fig.axes) == 9
    # defaults: no reference, first four dims, numpy input
    fig = plots.pair_plot({"a": other.numpy()}, path=tmp_path / "pair2.png")
    assert_png(tmp_path / "pair2.png")
    assert len(fig.axes) == 16
    with pytest.raises(ValueError, match="reference"):
        plots.pair_plot({"a": ref}, reference="b")
    with pytest.raises(ValueError, match="dims"):
        plots.pair_plot({"a": ref}, dims=[7])
    with pytest.raises(ValueError, match="same dimension"):
        plots.pair_plot({"a": ref, "b": ref[:, :2]})


def test_image_grid_png(tmp_path):
    images = torch.rand(10, 1, 8, 8)
    path = tmp_path / "grid.png"
    fig = plots.image_grid(images, nrow=4, path=path)
    assert_png(path)
    assert len(fig.axes) == 12  # 3 rows of 4
    plots.image_grid(torch.rand(3, 3, 8, 8), nrow=3, path=tmp_path / "rgb.png")
    assert_png(tmp_path / "rgb.png")
    plots.image_grid(np.random.rand(2, 8, 8), nrow=2, path=tmp_path / "hw.png")
    assert_png(tmp_path / "hw.png")
    with pytest.raises(ValueError, match="channels"):
        plots.image_grid(torch.rand(2, 2, 8, 8), nrow=2)


def test_trajectory_bands_png(tmp_path):
    t = torch.linspace(0, 1, 50)
    truth = torch.stack([torch.sin(6 * t), torch.cos(6 * t)], dim=-1)  # (L, 2)
    samples = truth + 0.2 * torch.randn(100, 50, 2)
    observations = torch.full_like(truth, float("nan"))
    observations[::7] = truth[::7]
    path = tmp_path / "bands.png"
    fig = plots.trajectory_bands(t, samples, truth=truth, observations=observations, path=path)
    assert_png(path)
    assert len(fig.axes) == 2
    # one dimension, observations as (times, values)
    plots.trajectory_bands(t, samples[..., 0], truth=truth[:, 0],
                           observations=(t[::10], truth[::10, 0]), path=tmp_path / "b1.png")
    assert_png(tmp_path / "b1.png")
    with pytest.raises(ValueError, match="shape"):
        plots.trajectory_bands(t[:10], samples)


def test_coverage_curve_png(tmp_path):
    levels = torch.linspace(0.05, 0.95, 10)
    path = tmp_path / "coverage.png"
    plots.coverage_curve(levels, {"calibrated": levels, "over-confident": levels**2}, path=path)
    assert_png(path)
    plots.coverage_curve(levels.numpy(), levels.numpy(), path=tmp_path / "c1.pdf")
    assert (tmp_path / "c1.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match="levels"):
        plots.coverage_curve(levels, levels[:3])
