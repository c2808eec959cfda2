"""Training script for the crash/resume test: python train_resumable.py RUN STEPS DELAY.

Trains a small prior with checkpoints every 10 steps; DELAY seconds of sleep per batch make
the run slow enough to be killed in the middle."""

import sys
import time

import torch

import plausible
from plausible.data import TensorData


class SlowData(TensorData):
    def __init__(self, x, delay):
        super().__init__(x)
        self.delay = delay

    def batch(self, index, device=None, dtype=None):
        time.sleep(self.delay)
        return super().batch(index, device, dtype)


def main() -> None:
    run, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = torch.randn(512, 3, generator=torch.Generator().manual_seed(1))
    prior = plausible.Denoiser(plausible.nets.ResMLP(features=3, hidden=32, blocks=2, dropout=0.1))
    plausible.fit(prior, SlowData(data, delay), steps=steps, batch_size=64, lr=1e-3,
                  checkpoint=run, checkpoint_every=10, resume=True, progress=False)


if __name__ == "__main__":
    main()
