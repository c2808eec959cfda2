"""``plausible data``: simulated training sets in zarr, read back with plausible.data."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import zarr

from plausible.cli import main
from plausible.data import Windows, ZarrData
from plausible.tasks.lorenz import Lorenz63


def _run(*args: str) -> int:
    return main(["data", *args, "--quiet"])


def test_lorenz63_store_content_and_round_trip(tmp_path, capsys):
    out = tmp_path / "l63.zarr"
    assert _run("lorenz63", "--out", str(out), "--trajectories", "6", "--length", "20",
                "--burn-in", "16", "--batch", "4", "--seed", "3") == 0
    assert "wrote" in capsys.readouterr().out
    group = zarr.open_group(str(out), mode="r")
    x = torch.from_numpy(group["x"][:])
    assert x.shape == (6, 20, 3) and x.dtype == torch.float32
    attrs = dict(group.attrs)
    assert attrs["system"] == "lorenz63" and attrs["standardized"] is True
    assert attrs["simulator"]["dt"] == 0.025 and attrs["burn_in"] == 16
    assert attrs["standardization"]["std"] == [8.0, 9.0, 8.6]
    # exactly the simulator's chains (two batches of 4 and 2 from one generator), standardised
    g = torch.Generator().manual_seed(3)
    model = Lorenz63()
    expected = torch.cat([model.trajectories(4, 20, burn_in=16, generator=g, progress=False),
                          model.trajectories(2, 20, burn_in=16, generator=g, progress=False)])
    assert torch.allclose(x, Lorenz63.standardize(expected).float())
    # and they follow the dynamics: residuals of the RK4 map are N(0, dt) in physical units
    phys = Lorenz63.unstandardize(x.double())
    r = (phys[:, 1:] - model.step(phys[:, :-1])) / math.sqrt(0.025)
    assert abs(float(r.square().mean()) - 1) <= 4 * math.sqrt(2 / r.numel())
    # windows read back from the store equal the slices of the trajectories
    windows = Windows(ZarrData(str(out), key="x"), length=5)
    assert len(windows) == 6 * 16
    index = torch.tensor([0, 17, 95])
    batch = windows.batch(index)
    for b, i in enumerate(index.tolist()):
        traj, start = divmod(i, 16)
        assert torch.equal(batch[b], x[traj, start:start + 5])
    flat = Windows(ZarrData(str(out)), length=5, flatten=True)
    assert flat.state_shape == (15,)


def test_same_seed_same_data_and_overwrite(tmp_path, capsys):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for out in (a, b):
        assert _run("lorenz96", "--out", str(out), "--trajectories", "3", "--length", "8",
                    "--burn-in", "10", "--seed", "1") == 0
    xa, xb = zarr.open_group(str(a))["x"][:], zarr.open_group(str(b))["x"][:]
    assert xa.shape == (3, 8, 40) and (xa == xb).all()
    assert zarr.open_group(str(a)).attrs["standardized"] is False
    capsys.readouterr()
    assert _run("lorenz96", "--out", str(a), "--trajectories", "2", "--length", "4") == 1
    assert "already exists" in capsys.readouterr().err
    assert _run("lorenz96", "--out", str(a), "--trajectories", "2", "--length", "4",
                "--burn-in", "0", "--overwrite", "--dtype", "float64") == 0
    x = zarr.open_group(str(a))["x"][:]
    assert x.shape == (2, 4, 40) and x.dtype.name == "float64"


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _run("lorenz63", "--out", str(tmp_path / "data.h5"))
    assert info.value.code == 2 and ".zarr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        _run("lorenz63", "--out", str(tmp_path / "d.zarr"), "--trajectories", "0")
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        _run("pendulum", "--out", str(tmp_path / "d.zarr"))
    assert info.value.code == 2


def test_kolmogorov_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "plausible.tasks.kolmogorov", None)  # import fails
    assert _run("kolmogorov", "--out", str(tmp_path / "k.zarr")) == 1
    err = capsys.readouterr().err
    assert "Kolmogorov simulator" in err and "not available" in err
    assert not (tmp_path / "k.zarr").exists()


def test_kolmogorov_tiny(tmp_path):
    pytest.importorskip("plausible.tasks.kolmogorov")
    out = tmp_path / "k.zarr"
    assert _run("kolmogorov", "--out", str(out), "--trajectories", "1", "--length", "2",
                "--burn-in", "0") == 0
    group = zarr.open_group(str(out))
    x = group["x"][:]
    assert x.shape[:2] == (1, 2) and tuple(x.shape[2:]) == tuple(group.attrs["state_shape"])
    assert group.attrs["dt"] > 0 and group.attrs["system"] == "kolmogorov"
