"""Datasets of plausible.data: zarr on disk with a bounded chunk cache, trajectory windows,
simulator streams, and as_dataset on zarr paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import plausible
from plausible.data import (
    SimulatorStream,
    TensorData,
    Windows,
    ZarrData,
    as_dataset,
    parse_bytes,
    write_zarr,
)

pytest.importorskip("zarr")


def _model(features: int) -> plausible.Denoiser:
    torch.manual_seed(0)
    return plausible.Denoiser(plausible.nets.ResMLP(features=features, hidden=32, blocks=1))


@pytest.fixture
def big(tmp_path):
    """A (4096, 64) float32 array (1 MiB) written with chunks of 128 rows (32 KiB)."""
    array = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    path = write_zarr(tmp_path / "big.zarr", array, chunks=128)
    return array, path


def test_parse_bytes():
    assert parse_bytes(1234) == 1234
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes("100kB") == 100_000
    assert parse_bytes("0") == 0
    for bad in ("lots", "-1MB", "2XB", -5, None):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_zarr_data_larger_than_its_budget_trains_and_matches_memory(big):
    array, path = big
    budget = 100_000  # three chunks of 32 KiB; the array is 1 MiB
    zdata = ZarrData(path, memory_budget=budget)
    assert len(zdata) == 4096 and zdata.state_shape == (64,) and zdata.chunk_rows == [128]

    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randint(0, 4096, (50,), generator=gen)
        idx = torch.cat([idx, idx[:7], idx[3:5]])[torch.randperm(59, generator=gen)]
        assert len(set(idx.tolist())) < len(idx)  # repeated, unsorted
        assert torch.equal(zdata.batch(idx), array[idx])
    assert torch.equal(zdata.batch(torch.tensor([-1, 0])), array[[4095, 0]])
    assert zdata.batch(torch.tensor([5, 9]), dtype=torch.float64).dtype == torch.float64

    history = plausible.fit(_model(64), zdata, steps=20, batch_size=32, progress=False)
    assert len(history["loss"]) == 20
    assert all(math.isfinite(v) for v in history["loss"])
    assert 0 < zdata.peak_cache_bytes <= budget
    assert zdata.cache_bytes <= budget
    # far more was read than the cache can hold: chunks were evicted and read again
    assert zdata.bytes_read > 2 * budget


def test_zarr_reads_only_the_needed_chunks_and_caches_them(big):
    array, path = big
    zdata = ZarrData(str(path), memory_budget="1MB")
    chunk = 128 * 64 * 4
    idx = torch.tensor([130, 5, 129, 5, 200, 0])  # chunks 0 and 1 only
    assert torch.equal(zdata.batch(idx), array[idx])
    assert zdata.bytes_read == 2 * chunk and zdata.chunks_read == 2
    assert torch.equal(zdata.batch(idx.flip(0)), array[idx.flip(0)])
    assert zdata.bytes_read == 2 * chunk  # cache hits
    assert torch.equal(zdata.batch(torch.tensor([4000])), array[[4000]])
    assert zdata.bytes_read == 3 * chunk and zdata.peak_cache_bytes == 3 * chunk

    # a budget below one chunk: nothing is cached, results are still right
    tiny = ZarrData(path, memory_budget=1000)
    assert torch.equal(tiny.batch(idx), array[idx])
    assert torch.equal(tiny.batch(idx), array[idx])
    assert tiny.peak_cache_bytes == 0 and tiny.bytes_read == 4 * chunk


def test_zarr_same_seed_same_batches(big):
    array, path = big
    zdata = ZarrData(path, memory_budget="50kB")
    a = zdata.draw_indices(64, torch.Generator().manual_seed(3))
    b = zdata.draw_indices(64, torch.Generator().manual_seed(3))
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(zdata.batch(a), zdata.batch(b))
    assert torch.equal(zdata.batch(a), array[a])


def test_zarr_pairs_from_a_group(tmp_path):
    theta = torch.randn(300, 3)
    y = torch.randn(300, 2, 5)
    labels = torch.arange(300)
    path = write_zarr(tmp_path / "pairs.zarr", {"theta": theta, "y": y, "label": labels},
                      chunks=64)
    pairs = ZarrData(path, keys=("theta", "y"), memory_budget="10kB")
    assert pairs.state_shape == (3,) and len(pairs) == 300
    idx = torch.tensor([299, 0, 64, 64, 150])
    th, yy = pairs.batch(idx, dtype=torch.float64)
    assert th.dtype == yy.dtype == torch.float64
    assert torch.equal(th, theta[idx].double()) and torch.equal(yy, y[idx].double())
    assert pairs.peak_cache_bytes <= 10_000

    three = ZarrData(path, key=("theta", "y", "label"))
    out = three.batch(idx, dtype=torch.float64)
    assert out[2].dtype == torch.int64 and torch.equal(out[2], idx)  # integers are not cast
    assert torch.equal(ZarrData(path, key="y").batch(idx), y[idx])
    with pytest.raises(ValueError, match=r"arrays \['label', 'theta', 'y'\].*key="):
        ZarrData(path)
    with pytest.raises(KeyError, match="no array 'x'"):
        ZarrData(path, keys=("theta", "x"))
    with pytest.raises(ValueError, match="floating-point"):
        ZarrData(path, key=("label", "theta"))


def test_zarr_errors(tmp_path):
    missing = tmp_path / "missing.zarr"
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        ZarrData(missing)
    ints = write_zarr(tmp_path / "ints.zarr", torch.arange(20).reshape(10, 2))
    with pytest.raises(ValueError, match="floating-point.*int64"):
        ZarrData(ints)
    flat = write_zarr(tmp_path / "flat.zarr", torch.randn(10))
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got \(10,\)"):
        ZarrData(flat)
    ok = write_zarr(tmp_path / "ok.zarr", torch.randn(10, 2))
    with pytest.raises(IndexError, match="index 10 is out of range for 10 items"):
        ZarrData(ok).batch(torch.tensor([0, 10]))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_zarr(ok, torch.randn(10, 2))
    write_zarr(ok, torch.ones(4, 2), overwrite=True)
    assert len(ZarrData(ok)) == 4

    bad = torch.randn(40, 3)
    bad[7, 1] = float("nan")
    bad[33, 0] = float("inf")
    path = write_zarr(tmp_path / "bad.zarr", bad, chunks=8)
    checked = ZarrData(path, check_finite=True)
    assert torch.equal(checked.batch(torch.tensor([0, 8, 39])), bad[[0, 8, 39]])
    with pytest.raises(ValueError, match=r"NaN or infinity in rows \[7, 33\]"):
        checked.batch(torch.tensor([33, 1, 7, 7]))
    assert ZarrData(path).batch(torch.tensor([7])).isnan().any()  # unchecked by default


def test_write_zarr_default_chunks_are_a_few_megabytes(tmp_path):
    import zarr

    array = torch.randn(12_000, 64)  # 3 MB
    path = write_zarr(tmp_path / "x.zarr", array)
    stored = zarr.open(str(path), mode="r")
    assert stored.chunks[1:] == (64,)
    assert 1 << 20 <= stored.chunks[0] * 64 * 4 <= 4 << 20
    assert np.array_equal(stored[:], array.numpy())
    small = write_zarr(tmp_path / "s.zarr", np.ones((5, 3), dtype=np.float32))
    assert zarr.open(str(small), mode="r").chunks == (5, 3)
    assert write_zarr(tmp_path / "b.zarr", torch.ones(4, 2, dtype=torch.bfloat16)).exists()


def _check_windows(windows: Windows, source: torch.Tensor, index: torch.Tensor) -> None:
    out = windows.batch(index)
    traj, start = windows.locate(index)
    for i in range(len(index)):
        expected = source[traj[i], start[i]: start[i] + windows.length]
        if windows.flatten:
            expected = expected.reshape(windows.state_shape)
        assert torch.equal(out[i], expected), (int(traj[i]), int(start[i]))


def test_windows_of_a_tensor():
    source = torch.randn(5, 12, 2, 3)
    windows = Windows(source, length=4)
    assert len(windows) == 5 * 9 and windows.state_shape == (4, 2, 3)
    index = windows.draw_indices(2000, torch.Generator().manual_seed(0))
    assert torch.equal(index, windows.draw_indices(2000, torch.Generator().manual_seed(0)))
    assert windows.batch(index).shape == (2000, 4, 2, 3)
    _check_windows(windows, source, index[:300])
    traj, start = windows.locate(index)
    assert int(start.min()) == 0 and int(start.max()) == 8
    assert set(traj.tolist()) == set(range(5))
    assert len(set(index.tolist())) == len(windows)  # every window reachable
    assert torch.equal(windows.batch(index[:9]), windows.batch(index[:9]))

    flat = Windows(source, length=3, flatten=True)
    assert flat.state_shape == (6, 3)
    index = flat.draw_indices(100, torch.Generator().manual_seed(1))
    assert flat.batch(index, dtype=torch.float64).shape == (100, 6, 3)
    _check_windows(flat, source, index)

    whole = Windows(source, length=12)
    assert len(whole) == 5 and torch.equal(whole.batch(torch.arange(5)), source)
    scalar = Windows(torch.randn(3, 6), length=2, flatten=True)
    assert scalar.state_shape == (2,) and scalar.batch(torch.tensor([0, 14])).shape == (2, 2)


def test_windows_length_errors():
    source = torch.randn(3, 10, 2)
    for length in (0, -1, 11):
        with pytest.raises(ValueError, match=r"window length must be in \[1, L\] = \[1, 10\]"):
            Windows(source, length=length)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        Windows(torch.randn(10), length=2)
    with pytest.raises(ValueError, match="floating-point"):
        Windows(torch.ones(3, 10, dtype=torch.int64), length=2)
    with pytest.raises(IndexError, match="out of range"):
        Windows(source, length=10).batch(torch.tensor([3]))


def test_windows_of_zarr_trajectories_train(tmp_path):
    source = torch.randn(40, 16, 8)
    path = write_zarr(tmp_path / "traj.zarr", source, chunks=4)
    zdata = ZarrData(path, memory_budget=3 * 4 * 16 * 8 * 4)
    windows = Windows(zdata, length=5, flatten=True)
    assert windows.state_shape == (40,)
    index = windows.draw_indices(200, torch.Generator().manual_seed(2))
    _check_windows(windows, source, index)
    _check_windows(Windows(str(path), length=5), source, index[:50])
    history = plausible.fit(_model(40), windows, steps=5, batch_size=16, progress=False)
    assert all(math.isfinite(v) for v in history["loss"])
    assert zdata.peak_cache_bytes <= zdata.memory_budget
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        Windows(zdata, length=17)


def _prior(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 2, generator=generator)


def _simulator(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(theta.shape[0], 3, generator=generator)
    return torch.cat([theta, theta.sum(1, keepdim=True)], dim=1) + 0.1 * noise


def test_simulator_stream_is_deterministic_and_sliceable():
    stream = SimulatorStream(_prior, _simulator)
    assert stream.state_shape == (2,) and stream.observation_shape == (3,)
    index = stream.draw_indices(16, torch.Generator().manual_seed(0))
    assert index.dtype == torch.int64 and index.shape == (16,) and bool((index >= 0).all())
    assert torch.equal(index, stream.draw_indices(16, torch.Generator().manual_seed(0)))
    assert len(set(index.tolist())) == 16
    theta, y = stream.batch(index)
    assert theta.shape == (16, 2) and y.shape == (16, 3)
    assert torch.allclose(y[:, 2], theta.sum(1), atol=0.6)
    again = stream.batch(index)
    assert torch.equal(theta, again[0]) and torch.equal(y, again[1])
    # an item does not depend on the batch it is in (data-parallel slicing, resume)
    for a, b in ((0, 4), (4, 16), (7, 8)):
        th, yy = stream.batch(index[a:b])
        assert torch.equal(th, theta[a:b]) and torch.equal(yy, y[a:b])
    th, yy = stream.batch(index.flip(0), dtype=torch.float64)
    assert th.dtype == torch.float64 and torch.equal(th, theta.flip(0).double())
    assert not torch.equal(theta[0], theta[1])

    batched = SimulatorStream(_prior, _simulator, batched=True)
    b1, b2 = batched.batch(index), batched.batch(index)
    assert torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1])
    assert b1[0].shape == (16, 2) and not torch.equal(b1[0][0], b1[0][1])

    with pytest.raises(TypeError, match="infinite stream.*no length"):
        len(stream)
    assert stream  # truth does not ask for a length


def test_simulator_stream_errors():
    with pytest.raises(ValueError, match=r"batch of n = 1 items"):
        SimulatorStream(_prior, lambda theta, g: torch.randn(2, 3, generator=g))
    with pytest.raises(ValueError, match="NaN or infinity"):
        SimulatorStream(_prior, lambda theta, g: theta / 0.0)
    with pytest.raises(ValueError, match="must return a tensor"):
        SimulatorStream(lambda n, g: [0.0] * n, _simulator)

    def flaky(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        y = _simulator(theta, generator)
        return torch.where(theta[:, :1] > 1.5, float("nan"), y)

    stream = SimulatorStream(lambda n, g: torch.full((n, 2), -1.0) + 3 * torch.rand(
        n, 2, generator=g), flaky)
    with pytest.raises(ValueError, match=r"simulator\(theta, generator\) returned NaN"):
        stream.batch(torch.arange(64))


class _Regression(nn.Module):
    """A toy conditional model: predicts theta from y."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def loss(self, theta: torch.Tensor, y: torch.Tensor, **_: object) -> torch.Tensor:
        return (self.linear(y) - theta).square().mean()


def test_fit_on_a_simulator_stream():
    torch.manual_seed(0)
    stream = SimulatorStream(_prior, _simulator)
    model = _Regression()
    history = plausible.fit(model, stream, steps=60, batch_size=16, lr=3e-2, ema=0.0,
                            progress=False)
    assert all(math.isfinite(v) for v in history["loss"])
    assert sum(history["loss"][-10:]) < 0.5 * sum(history["loss"][:10])
    with pytest.raises(TypeError, match="no length"):
        plausible.fit(_Regression(), stream, steps=1, batch_size=4, validation=stream,
                      progress=False)


def test_as_dataset_opens_zarr_paths(tmp_path, big):
    array, path = big
    for data in (path, str(path), str(path) + "/"):
        dataset = as_dataset(data, shape=(64,))
        assert isinstance(dataset, ZarrData)
        assert torch.equal(dataset.batch(torch.tensor([3, 1])), array[[3, 1]])
    import zarr

    assert isinstance(as_dataset(zarr.open(str(path), mode="r")), ZarrData)
    with pytest.raises(ValueError, match=r"must have shape \(N, 32\), got states of shape "
                                         r"\(64,\)"):
        as_dataset(path, shape=(32,))
    with pytest.raises(FileNotFoundError, match="nothere.zarr"):
        as_dataset(tmp_path / "nothere.zarr")
    with pytest.raises(ValueError, match="must be a tensor"):
        as_dataset("data.npy")
    history = plausible.fit(_model(64), str(path), steps=2, batch_size=8, progress=False)
    assert len(history["loss"]) == 2
    # what as_dataset accepted before is unchanged
    assert isinstance(as_dataset(torch.randn(4, 2)), TensorData)


def test_random_split_is_a_disjoint_cover_and_reproducible():
    from plausible.data import Subset, TensorData, random_split

    data = TensorData(torch.arange(50.0)[:, None], torch.arange(50)[:, None])
    train, held = random_split(data, 0.2, torch.Generator().manual_seed(0))
    assert (len(train), len(held)) == (40, 10)
    a = train.batch(torch.arange(40))[0].flatten()
    b = held.batch(torch.arange(10))[0].flatten()
    assert sorted(torch.cat([a, b]).tolist()) == list(range(50))
    again = random_split(data, 0.2, torch.Generator().manual_seed(0))[1]
    assert torch.equal(again.batch(torch.arange(10))[0].flatten(), b)
    # pairs stay pairs
    pair = held.batch(torch.arange(10))
    assert torch.equal(pair[0].flatten().long(), pair[1].flatten())
    with pytest.raises(ValueError, match=r"must lie in \[0, 50\)"):
        Subset(data, [0, 50])
    with pytest.raises(ValueError, match="cannot hold out"):
        random_split(TensorData(torch.zeros(1, 2)), 0.5)
    with pytest.raises(ValueError, match="simulator stream"):
        random_split(SimulatorStream(_prior, _simulator), 0.1)
