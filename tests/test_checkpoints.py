"""Checkpoints: crash-safe writes, exact resume after kill -9, load without unpickling, and
clear errors for damaged checkpoints or checkpoints of another model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import plausible
from plausible.checkpoints import CheckpointError, latest_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "train_resumable.py"
STEPS = 60


def _run(run: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run), str(STEPS), str(delay)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    folder = latest_checkpoint(run)
    assert folder is not None and folder.name == f"step-{STEPS:08d}"
    return load_file(str(folder / "state.safetensors"))


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    p = _run(straight, 0.0)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()

    crashed = tmp_path / "crashed"
    p = _run(crashed, 0.05)
    deadline = time.time() + 300
    while time.time() < deadline:
        folder = latest_checkpoint(crashed) if (crashed / "latest.json").exists() else None
        if folder is not None and int(folder.name.split("-")[1]) >= 30:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = json.loads((crashed / "latest.json").read_text())["step"]
    assert 30 <= killed_at < STEPS
    # whatever moment the kill came, the latest checkpoint is complete and loads
    plausible.load(crashed)

    p = _run(crashed, 0.0)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    a, b = _final_state(straight), _final_state(crashed)
    weights = [k for k in a if k.startswith(("model/", "ema/", "optim/"))]
    assert weights and set(a) == set(b)
    for k in weights:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # metrics have one line per step, no duplicates from the crashed attempt
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps))


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    prior = plausible.Denoiser(plausible.nets.ResMLP(features=2, hidden=16, blocks=1))
    plausible.fit(prior, torch.randn(128, 2), steps=10, batch_size=16, checkpoint=tmp_path / "r",
                  checkpoint_every=5, progress=False)
    return prior, tmp_path / "r"


def test_load_round_trip_for_each_model_kind(tmp_path, trained):
    prior, run = trained
    loaded = plausible.load(run)
    x_t = torch.randn(4, 2)
    torch.testing.assert_close(loaded(x_t, 0.3), prior(x_t, 0.3), rtol=0, atol=0)

    unet = plausible.Denoiser(plausible.nets.UNet(1, hidden_channels=(8, 16), hidden_blocks=1,
                                                  spatial=1), shape=(1, 8))
    gauss = plausible.GaussianDenoiser(torch.randn(3), torch.tensor([1.0, 2.0, 0.5]),
                                       plausible.VESchedule())
    lowrank = plausible.GaussianDenoiser(torch.zeros(4), (torch.randn(4, 2), torch.ones(4)))
    mix = plausible.GaussianMixtureDenoiser(torch.ones(2), torch.randn(2, 3), torch.ones(2, 3))
    from plausible.checkpoints import save_model
    for i, model in enumerate([unet, gauss, lowrank, mix]):
        folder = save_model(model, tmp_path / f"m{i}")
        loaded = plausible.load(folder)
        assert type(loaded) is type(model) and loaded.schedule == model.schedule
        x_t = torch.randn(2, *model.shape)
        torch.testing.assert_close(loaded(x_t, 0.5), model(x_t, 0.5), rtol=1e-6, atol=1e-6)


def test_flipped_byte_truncation_and_missing_files_are_reported(trained):
    _, run = trained
    folder = latest_checkpoint(run)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        plausible.load(run)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="truncated"):
        plausible.load(run)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        plausible.load(run)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        plausible.load(run / "nowhere")


def test_resume_refuses_another_model_and_overwrite(trained):
    _, run = trained
    other = plausible.Denoiser(plausible.nets.ResMLP(features=2, hidden=8, blocks=1))
    with pytest.raises(CheckpointError, match="another model"):
        plausible.fit(other, torch.randn(64, 2), steps=20, batch_size=16, checkpoint=run,
                      resume=True, progress=False)
    with pytest.raises(CheckpointError, match="resume=True"):
        plausible.fit(other, torch.randn(64, 2), steps=20, batch_size=16, checkpoint=run,
                      progress=False)


def test_loading_never_unpickles(trained, monkeypatch):
    import pickle
    _, run = trained

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    plausible.load(run)


def test_load_a_conditional_denoiser_in_a_fresh_process(tmp_path):
    """plausible.amortized is imported lazily; load() must import it for its classes (the
    `plausible sbi sample` and `check` commands run in a process that never imported it)."""
    from plausible.amortized import ConditionalDenoiser
    from plausible.checkpoints import save_model

    npe = ConditionalDenoiser.mlp(2, 3, hidden=16, blocks=1, context=4)
    npe.standardize_from(torch.randn(50, 2), torch.randn(50, 3))
    save_model(npe, tmp_path / "npe")
    code = ("import sys, plausible; m = plausible.load(sys.argv[1]); "
            "print(type(m).__name__, m.is_fitted, 'plausible.amortized' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "npe")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ConditionalDenoiser", "True", "True"]
