"""Observed convergence order of the deterministic samplers on an exact probability-flow ODE.

For a Gaussian prior N(m, diag(c)) under a VP schedule the probability-flow ODE has the closed
form x_t = alpha_t m + sqrt(alpha_t^2 c + sigma_t^2) z, with z fixed along a trajectory, so
the error of a sampler at t = 0 is known exactly (no Monte-Carlo noise). Prints, per sampler
and order, the RMS error at 8 ... 128 log-SNR steps and the observed rates
log2(err(N) / err(2N)); writes ``results/sampler_order.json``.

    python benchmarks/sampler_order.py        # a few seconds
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plausible  # noqa: E402
from _common import setup, table, write_json  # noqa: E402

__all__ = ["main"]

PLANS = [("dpm++", 1), ("dpm++", 2), ("dpm++", 3), ("dpm", 2), ("dpm", 3), ("unipc", 1),
         ("unipc", 2), ("unipc", 3)]
STEPS = (8, 16, 32, 64, 128)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    env = setup(1, args.seed)
    f64 = torch.float64
    g = torch.Generator().manual_seed(args.seed)
    mean = torch.randn(args.dim, generator=g, dtype=f64)
    var = torch.rand(args.dim, generator=g, dtype=f64) * 2 + 0.05
    schedule = plausible.VPSchedule()
    prior = plausible.GaussianDenoiser(mean, var, schedule)
    x_1 = torch.randn(64, args.dim, generator=g, dtype=f64)
    a_1, s_1 = schedule(torch.tensor(1.0, dtype=f64))
    a_0, s_0 = schedule(torch.tensor(0.0, dtype=f64))
    z = (x_1 - a_1 * mean) / torch.sqrt(a_1**2 * var + s_1**2)
    exact = a_0 * mean + torch.sqrt(a_0**2 * var + s_0**2) * z
    rows = []
    for sampler, order in PLANS:
        errors = []
        for steps in STEPS:
            x = plausible.sample(prior, 64, steps=steps, sampler=sampler, order=order,
                                 grid="logsnr", x_1=x_1.clone(), dtype=f64, progress=False)
            errors.append(float((x - exact).square().mean().sqrt()))
        rates = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
        rows.append({"sampler": f"{sampler} {order}",
                     **{f"err {n}": e for n, e in zip(STEPS, errors, strict=True)},
                     **{f"rate {STEPS[i]}-{STEPS[i + 1]}": r for i, r in enumerate(rates)}})
    columns = [(k, k) for k in rows[0]]
    print(table(rows, columns))
    write_json("sampler_order", {"benchmark": "sampler_order", "dim": args.dim, "rows": rows,
                                 "env": env})


if __name__ == "__main__":
    main()
