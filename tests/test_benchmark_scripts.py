"""Every benchmark script parses its command line: ``--help`` prints and exits 0.

A help string with a bare ``%`` (argparse formats help with ``%``) made ``sbi.py --help``
crash; this catches that and any import error of the scripts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted(p for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py")
                 if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help(script: Path) -> None:
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout


def test_sbi_whitened_moments_on_known_gaussians() -> None:
    """benchmarks/sbi.py's moment diagnostic: exact samples of a correlated Gaussian give a
    mean error of about sqrt(D / N) reference standard deviations and whitened covariance
    eigenvalues near 1; samples shrunk by 0.8 about the mean give eigenvalues near 0.64; a
    shift of half a standard deviation along a whitened axis gives a mean error near 0.5."""
    import importlib.util

    import torch

    path = Path(__file__).parents[1] / "benchmarks" / "sbi.py"
    spec = importlib.util.spec_from_file_location("_bench_sbi", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    g = torch.Generator().manual_seed(0)
    L = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.5, 0.0], [-0.3, 0.2, 0.1]], dtype=torch.float64)
    ref = torch.randn(40000, 3, generator=g, dtype=torch.float64) @ L.T + 2.0
    x = torch.randn(40000, 3, generator=g, dtype=torch.float64) @ L.T + 2.0
    exact = bench.whitened_moments(ref, x)
    assert exact["mean_error"] < 4 * (2 * 3 / 40000) ** 0.5
    assert abs(exact["cov_eig_min"] - 1) < 0.03 and abs(exact["cov_eig_max"] - 1) < 0.03
    shrunk = bench.whitened_moments(ref, 2.0 + 0.8 * (x - 2.0))
    assert abs(shrunk["cov_eig_mean"] - 0.64) < 0.02
    shifted = bench.whitened_moments(ref, x + 0.5 * L[:, 1])
    assert abs(shifted["mean_error"] - 0.5) < 0.03
