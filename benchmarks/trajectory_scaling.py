"""Cost of one call of a TrajectoryDenoiser against the trajectory length L.

A small MLP window denoiser (ResMLP over flattened windows of W = 2k + 1 = 5 states of
dimension 3, as for Lorenz-63) is composed over trajectories of L = 65 ... 4096 states
(batch of 8 trajectories, float32, one thread). For each L, in a fresh process:

- window evaluations per call (the number of windows times the batch);
- wall time of a forward call and of a forward + vector-Jacobian product (what MMPS pays
  per solver iteration), median of repeats;
- peak resident memory added by a forward call (no graph) and by a forward + VJP over the
  process's state before them (``ru_maxrss``), with one batched call and with
  ``max_batch = 4096`` windows per call (chunks bound the forward's memory; a VJP keeps every
  chunk's activations for the backward pass, so chunking cannot bound it).

And the accuracy of the composition, on linear-Gaussian chains with exact answers
(``plausible.tasks.ARChain``):

- the prior: the largest root-mean-square error over t of the composed exact window
  denoisers against the exact trajectory denoiser (closed form: both are affine in x_t),
  for several window orders k and the three stitchings;
- the posterior: MMPS over the composed windows against the Kalman smoother's marginals
  (AR(1) with a = 0.9, L = 128, the state observed every 8th step with sigma_y = 0.1).

Usage::

    nice -n 10 .venv/bin/python benchmarks/trajectory_scaling.py [--quick] [--skip-accuracy]

Prints Markdown tables and writes ``results/trajectory_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import setup, table, write_json  # noqa: E402

LENGTHS = (65, 256, 1024, 4096)
K, D, B = 2, 3, 8


def worker(L: int, max_batch: int | None, repeats: int) -> dict:
    import torch

    import plausible
    from plausible.nets import ResMLP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    W = 2 * K + 1
    window = plausible.Denoiser(ResMLP(W * D, hidden=64, blocks=2), plausible.VPSchedule(),
                                shape=(W * D,))
    traj = plausible.TrajectoryDenoiser(window, order=K, length=L, max_batch=max_batch)
    x = torch.randn(B, L, D)
    t = torch.rand(B)
    v = torch.randn(B, L, D)

    def forward():
        with torch.no_grad():
            return traj(x, t)

    def forward_vjp():
        _, vjp = torch.func.vjp(lambda z: traj(z, t), x)
        return vjp(v)[0]

    # warm-up on one short trajectory (loads the kernels), then the peaks: the resident set's
    # high-water mark only grows, so the forward (no graph) is measured before the VJP
    _, vjp = torch.func.vjp(lambda z: traj(z, t[:1]), x[:1, : 2 * W])
    vjp(v[:1, : 2 * W])

    def maxrss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (KiB on Linux)

    rss0 = maxrss()
    forward()
    peak_forward = maxrss() - rss0
    forward_vjp()
    peak_vjp = maxrss() - rss0
    times = {}
    for name, fn in (("forward", forward), ("forward_vjp", forward_vjp)):
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
    return {
        "L": L,
        "max_batch": max_batch,
        "windows_per_call": B * traj.evaluations(L),
        "forward_s": times["forward"],
        "forward_vjp_s": times["forward_vjp"],
        "peak_rss_forward_mib": peak_forward,
        "peak_rss_forward_vjp_mib": peak_vjp,
    }


def composition_error(chain, k: int, L: int, stitching: str, times) -> dict:
    """Max over ``times`` of the exact rms error of the composition (data units and posterior
    standard deviations) and the time of the max."""
    import torch

    import plausible

    f64 = torch.float64
    schedule = plausible.VPSchedule()
    D = chain.dim
    exact = chain.trajectory_denoiser(L, schedule)
    comp = plausible.TrajectoryDenoiser(chain.window_denoiser(schedule, order=k), order=k,
                                        length=L, stitching=stitching)
    m, C = chain.trajectory_gaussian(L)
    E = torch.eye(L * D, dtype=f64).reshape(L * D, L, D)
    zero = torch.zeros(1, L, D, dtype=f64)
    worst = {"rms": 0.0, "rms_in_posterior_std": 0.0, "t_of_max": None}
    for t in times:
        t = torch.tensor(float(t), dtype=f64)
        bc, be = comp(zero, t).reshape(-1), exact(zero, t).reshape(-1)
        Jc = (comp(E, t).reshape(L * D, -1) - bc).T
        Je = (exact(E, t).reshape(L * D, -1) - be).T
        alpha, sigma = schedule(t)
        cov_t = alpha**2 * C + sigma**2 * torch.eye(L * D, dtype=f64)
        dJ = Jc - Je
        bias = bc - be + dJ @ (alpha * m.reshape(-1))
        mse = float((torch.trace(dJ @ cov_t @ dJ.T) + bias.square().sum()) / (L * D))
        post_var = float(torch.trace(sigma**2 / alpha * Je) / (L * D))
        if mse**0.5 > worst["rms"]:
            worst.update(rms=mse**0.5, t_of_max=float(t))
        worst["rms_in_posterior_std"] = max(worst["rms_in_posterior_std"],
                                            (mse / post_var) ** 0.5)
    return worst


def accuracy(quick: bool) -> tuple[list[dict], list[dict]]:
    import torch

    import plausible
    from plausible import MMPS, Observation, ops, sample
    from plausible.tasks import ARChain

    torch.set_num_threads(1)
    f64 = torch.float64
    ar1 = ARChain(torch.tensor([0.9], dtype=f64), 0.19)
    ar2 = ARChain(torch.tensor([[[0.5, 0.2], [-0.1, 0.4]], [[0.2, 0.0], [0.1, -0.3]]],
                               dtype=f64), torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=f64))
    times = torch.linspace(0, 1, 21 if quick else 41)
    prior_rows = []
    for name, chain, orders in (("AR(1) a=0.9", ar1, (1, 2, 4, 8)),
                                ("AR(2) 2-D", ar2, (2, 4, 6))):
        for k in orders:
            for stitching in ("symmetric", "causal", "average"):
                row = {"chain": name, "k": k, "stitching": stitching}
                row.update(composition_error(chain, k, 64, stitching, times))
                prior_rows.append(row)
                print(row, file=sys.stderr)
    # the posterior: MMPS over composed windows vs the Kalman smoother
    L, n = 128, 256 if quick else 512
    g = torch.Generator().manual_seed(0)
    x = ar1.sample(1, L, g)[0]
    mask = torch.zeros(L, 1, dtype=torch.bool)
    mask[::8] = True
    y = torch.where(mask, x + 0.1 * torch.randn(L, 1, generator=g, dtype=f64), torch.nan)
    obs = Observation(y, ops.Mask(mask), noise=0.1)
    means, covs, _ = ar1.smooth(y, torch.ones(1, 1, dtype=f64), 0.1**2)
    std = covs[:, :, 0].sqrt()
    posterior_rows = []
    priors = [("exact", ar1.trajectory_denoiser(L))] + [
        (f"k={k}", plausible.TrajectoryDenoiser(ar1.window_denoiser(order=k), order=k,
                                                length=L)) for k in (2, 4, 8, 16)]
    for name, prior in priors:
        for sampler, options in (("dpm++", dict(steps=32, order=2, grid="logsnr")),
                                 ("ddpm", dict(steps=64))):
            t0 = time.perf_counter()
            xs = sample(MMPS(prior, obs, tol=1e-8), n, sampler=sampler, dtype=f64, seed=1,
                        progress=False, **options)
            z = (xs.mean(0) - means) / std
            ratio = xs.var(0) / std**2
            posterior_rows.append({
                "prior": name, "sampler": f"{sampler} {options['steps']}", "samples": n,
                "mean_err_max": float(z.abs().max()),
                "mean_err_rms": float(z.square().mean().sqrt()),
                "mc_floor": n**-0.5,
                "var_ratio_mean": float(ratio.mean()),
                "var_ratio_min": float(ratio.min()), "var_ratio_max": float(ratio.max()),
                "seconds": time.perf_counter() - t0,
            })
            print(posterior_rows[-1], file=sys.stderr)
    return prior_rows, posterior_rows


def run(L: int, max_batch: int | None, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(L), "--repeats", str(repeats)]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="only the cost in L (no composition accuracy)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.max_batch, args.repeats)))
        return
    info = setup(threads=1, seed=0)
    repeats = 3 if args.quick else 7
    rows = []
    for L in LENGTHS:
        for max_batch in (None, 4096):
            row = run(L, max_batch, repeats)
            row["forward_us_per_state"] = 1e6 * row["forward_s"] / (B * L)
            row["forward_vjp_us_per_state"] = 1e6 * row["forward_vjp_s"] / (B * L)
            rows.append(row)
            print(f"L={L} max_batch={max_batch}: {row}", file=sys.stderr)
    columns = [("L", "L"), ("max_batch", "max_batch"), ("windows_per_call", "windows/call"),
               ("forward_s", "forward (s)"), ("forward_us_per_state", "fwd µs/state"),
               ("forward_vjp_s", "fwd+VJP (s)"),
               ("forward_vjp_us_per_state", "fwd+VJP µs/state"),
               ("peak_rss_forward_mib", "fwd peak (MiB)"),
               ("peak_rss_forward_vjp_mib", "fwd+VJP peak (MiB)")]
    print(table(rows, columns))
    prior_rows, posterior_rows = ([], []) if args.skip_accuracy else accuracy(args.quick)
    if prior_rows:
        print()
        print(table(prior_rows, [("chain", "chain"), ("k", "k"), ("stitching", "stitching"),
                                 ("rms", "max_t rms error"),
                                 ("rms_in_posterior_std", "max_t error / posterior std"),
                                 ("t_of_max", "t of max")]))
        print()
        print(table(posterior_rows, [("prior", "prior"), ("sampler", "sampler"),
                                     ("mean_err_max", "max abs mean err / std"),
                                     ("mean_err_rms", "rms mean err / std"),
                                     ("mc_floor", "MC floor"),
                                     ("var_ratio_mean", "var ratio (mean)"),
                                     ("var_ratio_min", "min"), ("var_ratio_max", "max"),
                                     ("seconds", "s")]))
    write_json("trajectory_scaling", {
        "benchmark": "trajectory_scaling",
        "settings": {"order": K, "window": 2 * K + 1, "state_dim": D, "batch": B,
                     "dtype": "float32", "net": "ResMLP(15, hidden=64, blocks=2)",
                     "repeats": repeats, "lengths": list(LENGTHS)},
        "machine": info,
        "note": "wall times on a shared 2-core machine (other jobs running); compare ratios "
                "within the run",
        "rows": rows,
        "composition_prior": prior_rows,
        "composition_posterior": posterior_rows,
    })


if __name__ == "__main__":
    main()
