"""Data-parallel training (2 gloo processes under torchrun) follows single-process training
with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

import plausible

SCRIPT = Path(__file__).parent / "scripts" / "train_ddp.py"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["loss"])


def test_ddp_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.safetensors"
    subprocess.run([sys.executable, str(SCRIPT), str(single)], check=True, env=env, timeout=300)
    double = tmp_path / "ddp.safetensors"
    # torchrun's standalone rendezvous can lose a race for its free port when other jobs start
    # processes at the same moment (seen once in a full CI run; the script itself passed every
    # rerun): one retry, and the launcher's output in the failure message
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", str(SCRIPT), str(double)],
            env=env, timeout=300, capture_output=True, text=True,
        )
        if run.returncode == 0:
            break
    assert run.returncode == 0, (f"torchrun failed twice:\n{run.stdout[-3000:]}\n"
                                 f"{run.stderr[-3000:]}")
    w1, loss1 = _read(single)
    w2, loss2 = _read(double)
    assert len(loss1) == len(loss2) == 20
    # same loss curve and weights up to float32 summation order (20 Adam steps of lr 1e-3)
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=1e-4, atol=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    # the comparison is not vacuous: training moved the weights far beyond the tolerance
    torch.manual_seed(0)
    init = plausible.Denoiser(plausible.nets.ResMLP(features=3, hidden=32, blocks=2)).state_dict()
    assert max(float((w1[k] - init[k]).abs().max()) for k in w1) > 1e-2
