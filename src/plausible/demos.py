"""Demonstrations beyond the default one (see ``plausible demo --list``).

``mixture``: a Gaussian-mixture prior (8 components in 16-D) observed through two random
projections with noise 0.3. Its exact denoiser and exact posterior are closed-form; MMPS gets
the shape of each posterior mode right but not the modes' weights, and sequential Monte Carlo
with MMPS twists (:class:`plausible.SMC`) fixes them. Writes a figure (samples in two
informative coordinates, bar chart of mode weights) and a JSON of the figures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["mixture_problem", "mixture_demo", "mode_weights"]

F64 = torch.float64


def mixture_problem(
    seed: int = 0, K: int = 8, D: int = 16, noise: float = 0.3, M: int = 2
) -> dict[str, Any]:
    """The mixture oracle: a ``K``-component prior in ``D`` dimensions seen through ``M``
    random unit-norm projections; prior, observation and exact posterior (a mixture)."""
    from . import GaussianMixtureDenoiser, Observation, ops

    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(K, D, generator=g, dtype=F64)
    covs = []
    for _ in range(K):
        L = 0.5 * torch.randn(D, D, generator=g, dtype=F64) / D**0.5
        covs.append(L @ L.T + 0.05 * torch.eye(D, dtype=F64))
    weights = torch.rand(K, generator=g, dtype=F64) + 0.2
    prior = GaussianMixtureDenoiser(weights, means, torch.stack(covs))
    A = torch.randn(M, D, generator=g, dtype=F64)
    A = A / A.norm(dim=1, keepdim=True)
    x_true = prior.sample(1, generator=g)[0]
    y = A @ x_true + noise * torch.randn(M, generator=g, dtype=F64)
    return {
        "prior": prior,
        "observation": Observation(y, ops.Matrix(A), noise),
        "exact": prior.condition(A, y, noise**2),
        "x_true": x_true,
        "A": A,
        "noise": noise,
    }


def mode_weights(x: Tensor, exact: Any) -> Tensor:
    """Fraction of samples ``x`` ``(N, D)`` assigned to each component of the exact posterior
    mixture (by largest responsibility at t = 0)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("mode_weights: the samples contain NaN or infinity")
    labels = exact.responsibilities(x.to(F64), 0.0).argmax(1)
    return torch.bincount(labels, minlength=exact.weights.numel()).to(F64) / x.shape[0]


def _sliced_w1(x: Tensor, y: Tensor, projections: int = 128) -> float:
    u = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(0),
                    dtype=F64)
    u = u / u.norm(dim=0)
    return float((torch.sort(x.to(F64) @ u, 0)[0] - torch.sort(y.to(F64) @ u, 0)[0])
                 .abs().mean())


def mixture_demo(
    out: str | os.PathLike[str],
    samples: int = 2048,
    steps: int = 64,
    seed: int = 0,
    quiet: bool = False,
    stream: Any = None,
) -> dict[str, Any]:
    """Runs the ``mixture`` demo: MMPS (DDPM, ``4 * steps`` steps) and SMC (``steps`` steps,
    ``samples`` particles) against the exact mixture posterior. Writes ``out/posterior.png``
    and ``out/metrics.json``; returns the metrics."""
    from matplotlib.figure import Figure

    from . import MMPS, SMC, sample

    stream = stream if stream is not None else sys.stdout
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def say(*lines: str) -> None:
        if not quiet:
            print(*lines, sep="\n", file=stream, flush=True)

    problem = mixture_problem(seed)
    prior, obs, exact = problem["prior"], problem["observation"], problem["exact"]
    say(f"mixture demo (seed {seed}): 8-component Gaussian mixture in 16-D, y = A x + noise "
        f"with A a random 2 x 16 projection, noise std {problem['noise']}")
    reference = exact.sample(samples, generator=torch.Generator().manual_seed(seed + 1))
    rows: dict[str, dict[str, Any]] = {}
    draws: dict[str, Tensor] = {}

    mmps = MMPS(prior, obs, tol=1e-8)
    start = time.perf_counter()
    draws["MMPS"] = sample(mmps, samples, steps=4 * steps, sampler="ddpm", dtype=F64,
                           seed=seed + 2, progress=not quiet)
    rows["MMPS"] = {"sampler": f"ddpm, {4 * steps} steps", "evaluations": 4 * steps,
                    "wall_time_s": time.perf_counter() - start}

    smc = SMC(prior, obs, particles=samples, steps=steps, tol=1e-8)
    start = time.perf_counter()
    result = smc.run(1, seed=seed + 2, dtype=F64, progress=not quiet)
    draws["SMC"] = result.samples[0]
    rows["SMC"] = {"sampler": f"SMC, {steps} steps, {samples} particles",
                   "evaluations": steps, "wall_time_s": time.perf_counter() - start,
                   "log_evidence": float(result.log_evidence[0]),
                   "resamples": int(result.resamples[0]),
                   "min_ess": float(result.ess.min())}
    draws["exact"] = reference
    rows["exact"] = {"sampler": "closed form", "evaluations": 0, "wall_time_s": 0.0}

    order = torch.argsort(exact.weights, descending=True)
    for name, x in draws.items():
        w = mode_weights(x, exact)
        rows[name]["mode_weight_tv"] = float(0.5 * (w - exact.weights).abs().sum())
        rows[name]["sliced_w1"] = _sliced_w1(x, reference) if name != "exact" else \
            _sliced_w1(exact.sample(samples, generator=torch.Generator().manual_seed(seed + 3)),
                       reference)
        rows[name]["mode_weights"] = w[order].tolist()

    # the two coordinates along which the heaviest posterior modes differ most
    top = order[:2]
    dims = torch.argsort((exact.means[top[0]] - exact.means[top[1]]).abs(),
                         descending=True)[:2].tolist()
    fig = Figure(figsize=(11, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    colours = {"exact": "0.6", "MMPS": "tab:orange", "SMC": "tab:blue"}
    for name in ("exact", "MMPS", "SMC"):
        x = draws[name][:1000]
        ax1.scatter(x[:, dims[0]].numpy(), x[:, dims[1]].numpy(), s=4, alpha=0.4,
                    c=colours[name], label=name)
    ax1.set_xlabel(f"x[{dims[0]}]")
    ax1.set_ylabel(f"x[{dims[1]}]")
    ax1.legend(markerscale=4)
    ax1.set_title("posterior samples")
    k = min(5, exact.weights.numel())
    width = 0.27
    positions = torch.arange(k, dtype=F64).numpy()
    ax2.bar(positions - width, exact.weights[order][:k].tolist(), width, color=colours["exact"],
            label="exact")
    for shift, name in ((0.0, "MMPS"), (width, "SMC")):
        ax2.bar(positions + shift, rows[name]["mode_weights"][:k], width,
                color=colours[name], label=f"{name} (TV {rows[name]['mode_weight_tv']:.2f})")
    ax2.set_xticks(positions.tolist(), [f"mode {i + 1}" for i in range(k)])
    ax2.set_ylabel("posterior weight")
    ax2.legend()
    ax2.set_title("weights of the posterior modes")
    fig.tight_layout()
    figure_path, metrics_path = out / "posterior.png", out / "metrics.json"
    fig.savefig(figure_path, dpi=110)
    metrics = {
        "demo": "mixture",
        "settings": {"samples": samples, "steps": steps, "seed": seed},
        "exact_log_evidence": float(exact.log_evidence),
        "exact_mode_weights": exact.weights[order].tolist(),
        "methods": rows,
        "figure": str(figure_path),
    }
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{'method':6} {'evaluations':>11} {'mode TV':>8} {'sliced W1':>9} {'time [s]':>9}",
          file=stream)
    for name, row in rows.items():
        print(f"{name:6} {row['evaluations']:11d} {row['mode_weight_tv']:8.3f} "
              f"{row['sliced_w1']:9.3f} {row['wall_time_s']:9.2f}", file=stream)
    say(f"log p(y): SMC estimate {rows['SMC']['log_evidence']:.3f}, exact "
        f"{metrics['exact_log_evidence']:.3f}")
    print(f"wrote {figure_path} and {metrics_path}", file=stream, flush=True)
    return metrics
