"""DDP test script: python train_ddp.py OUT.safetensors (run alone or under torchrun).

Trains a small prior for 20 steps with a global batch of 64 and writes its final raw weights
and the loss history (rank 0 only)."""

import json
import sys

import torch
from safetensors.torch import save_file

import plausible


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = torch.randn(512, 3, generator=torch.Generator().manual_seed(1))
    prior = plausible.Denoiser(plausible.nets.ResMLP(features=3, hidden=32, blocks=2))
    history = plausible.fit(prior, data, steps=20, batch_size=64, lr=1e-3, ema=0.0,
                            progress=False, log_every=1)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in prior.state_dict().items()}, out,
                  metadata={"loss": json.dumps(history["loss"])})


if __name__ == "__main__":
    main()
