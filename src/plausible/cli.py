r"""Command-line interface: ``plausible`` (or ``python -m plausible``).

Commands:

- ``plausible demo [NAME] [--out DIR] [--samples N] [--steps S] [--seed K] [--quiet]``
  runs a self-contained demonstration and writes its figure and metrics to ``DIR``;
  ``plausible demo --list`` lists the demonstrations;
- ``plausible train CONFIG [--resume]`` trains a prior described by a TOML/YAML file;
- ``plausible sample RUN -n N`` draws samples from a trained prior;
- ``plausible data lorenz63|lorenz96|kolmogorov --out X.zarr`` simulates a training set;
- ``plausible sbi train|sample|check`` trains and checks amortized posteriors on the
  sbi-benchmark tasks;
- ``plausible em CONFIG`` learns a prior from observations alone (empirical Bayes).

The ``lorenz`` demo (the default) assimilates 9 noisy observations of one variable of a
Lorenz-63 trajectory with MMPS over a composed window prior, against a particle smoother; the
``gaussian`` demo poses a random linear-Gaussian inverse problem whose posterior is known in
closed form and measures MMPS and DPS against it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoints import CheckpointError

__all__ = ["main", "build_parser", "gaussian_demo", "posterior_errors", "DEMOS", "DemoError"]

DEFAULT_OUT = "plausible-demo"


class DemoError(RuntimeError):
    """A demo could not run or write its output (reported without a traceback)."""


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# metrics


def posterior_errors(x: Tensor, mean: Tensor, cov: Tensor) -> dict[str, float]:
    r"""Errors of samples ``x`` ``(N, D)`` against a Gaussian ``N(mean, cov)``, raw and in
    units of the Monte-Carlo error of ``N`` exact samples.

    - mean error: the Mahalanobis distance :math:`\|\bar{x} - m\|_{C^{-1}}` of the sample mean,
      whose root-mean-square for ``N`` exact samples is :math:`\sqrt{D / N}`;
    - covariance error: :math:`\|C^{-1/2} \hat{C} C^{-1/2} - I\|_F` with :math:`\hat{C}` the
      unbiased sample covariance, whose root-mean-square for ``N`` exact samples is
      :math:`\sqrt{D (D + 1) / (N - 1)}` (Wishart).

    Both are invariant to linear changes of coordinates.
    """
    x = x.to(torch.float64).flatten(1)
    N, D = x.shape
    lam, Q = torch.linalg.eigh(cov.to(torch.float64))
    whiten = (Q * lam.rsqrt()) @ Q.T  # C^{-1/2}
    z = (x - mean.to(torch.float64)) @ whiten  # whitened samples: N(0, I) if exact
    mean_err = float(z.mean(0).norm())
    cov_err = float(torch.linalg.matrix_norm(torch.cov(z.T) - torch.eye(D, dtype=x.dtype)))
    mean_floor = math.sqrt(D / N)
    cov_floor = math.sqrt(D * (D + 1) / (N - 1))
    return {
        "mean_error": mean_err / mean_floor,
        "cov_error": cov_err / cov_floor,
        "mean_error_raw": mean_err,
        "cov_error_raw": cov_err,
    }


# ---------------------------------------------------------------------------------------------
# the gaussian demo


def _gaussian_problem(seed: int, D: int = 16) -> dict[str, Any]:
    """A random linear-Gaussian inverse problem with two observations (a dense 6 x D matrix
    and a mask of 3 coordinates), its ground truth and closed-form posterior."""
    from . import GaussianDenoiser, Observation, ops

    f64 = torch.float64
    g = torch.Generator().manual_seed(seed)
    # prior N(m, C): a random rotation of log-spaced variances (from 4 down to 0.02)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=f64))
    variances = torch.logspace(math.log10(4.0), math.log10(0.02), D, dtype=f64)
    C = (Q * variances) @ Q.T
    C = (C + C.T) / 2
    m = 0.5 * torch.randn(D, generator=g, dtype=f64)
    prior = GaussianDenoiser(m, C)
    x_true = prior.sample(1, generator=g)[0]

    # observation 1: y1 = A x + N(0, 0.1^2 I), A random 6 x D
    A = torch.randn(6, D, generator=g, dtype=f64) / math.sqrt(D)
    std1 = 0.1
    y1 = A @ x_true + std1 * torch.randn(6, generator=g, dtype=f64)
    # observation 2: 3 coordinates seen directly, noise std 0.05; NaN marks the unobserved
    coords = sorted(torch.randperm(D, generator=g)[:3].tolist())
    mask = torch.zeros(D, dtype=torch.bool)
    mask[coords] = True
    std2 = 0.05
    noisy = x_true + std2 * torch.randn(D, generator=g, dtype=f64)
    y2 = torch.where(mask, noisy, torch.full_like(noisy, math.nan))
    observations = [
        Observation(y1, A=ops.Matrix(A), noise=std1),
        Observation(y2, A=ops.Mask(mask), noise=std2),
    ]

    # the exact posterior: both observations stacked into one linear-Gaussian likelihood
    A_all = torch.cat([A, torch.eye(D, dtype=f64)[mask]])
    y_all = torch.cat([y1, y2[mask]])
    var_all = torch.cat([torch.full((6,), std1**2, dtype=f64),
                         torch.full((len(coords),), std2**2, dtype=f64)])
    exact = prior.condition(A_all, y_all, var_all)
    return {
        "prior": prior,
        "observations": observations,
        "exact": exact,
        "x_true": x_true,
        "masked": coords,
        "noise": (std1, std2),
        "dim": D,
    }


def _methods(steps: int) -> list[dict[str, Any]]:
    """The runs the demo compares: MMPS and DPS, and the same samplers driven by the exact
    posterior denoiser (which isolates the samplers' own discretisation error)."""
    fast = max(steps // 4, 2)
    dpm = {"sampler": "dpm++", "steps": fast, "options": {"order": 2, "grid": "logsnr"},
           "label": f"dpm++ 2M, logsnr grid, {fast} steps"}
    ddpm = {"sampler": "ddpm", "steps": steps, "options": {"grid": "uniform"},
            "label": f"ddpm, uniform grid, {steps} steps"}
    return [
        {"key": "mmps-dpm++", "method": "MMPS", **dpm},
        {"key": "mmps-ddpm", "method": "MMPS", **ddpm},
        {"key": "dps-ddpm", "method": "DPS", **ddpm},
        {"key": "exact-denoiser-dpm++", "method": "exact denoiser", **dpm},
        {"key": "exact-denoiser-ddpm", "method": "exact denoiser", **ddpm},
    ]


# DPS's step size: Chung et al.'s normalised step zeta / ||y - A(x_hat)||. The plain step
# (normalize=False) diverges on this problem from zeta = 0.2 on, and is biased below.
DPS_ZETA = 2.0
# MMPS's relative tolerance of the linear solve (converged: exact for a Gaussian prior)
MMPS_TOL = 1e-6


def gaussian_demo(
    out: str | os.PathLike[str],
    samples: int = 1024,
    steps: int = 64,
    seed: int = 0,
    quiet: bool = False,
    stream: Any = None,
) -> dict[str, Any]:
    """Runs the ``gaussian`` demo: writes ``out/posterior.png`` and ``out/metrics.json`` and
    prints a table of errors to ``stream`` (default stdout). Returns the metrics."""
    from . import DPS, MMPS, sample
    from .plots import pair_plot

    out = Path(out)
    stream = stream if stream is not None else sys.stdout

    def say(*lines: str) -> None:
        if not quiet:
            print(*lines, sep="\n", file=stream, flush=True)

    try:  # fail before the work if the output directory cannot be made
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoError(f"cannot create the output directory {str(out)!r}: {error}") from error

    problem = _gaussian_problem(seed)
    prior, observations, exact = problem["prior"], problem["observations"], problem["exact"]
    D, (std1, std2), masked = problem["dim"], problem["noise"], problem["masked"]
    say(
        f"plausible {_version()}: gaussian demo (seed {seed})",
        f"  prior:        N(m, C) on a {D}-dimensional state, dense random C",
        f"  observation1: y1 = A x + noise, A a random 6 x {D} matrix, noise std {std1}",
        f"  observation2: y2 = x[{masked}] + noise (ops.Mask), noise std {std2}",
        f"  exact posterior in closed form; {samples} samples per method",
        "",
    )

    rows: list[dict[str, Any]] = []
    draws: dict[str, Tensor] = {}
    for spec in _methods(steps):
        if spec["method"] == "MMPS":
            denoiser = MMPS(prior, observations, tol=MMPS_TOL)
        elif spec["method"] == "DPS":
            denoiser = DPS(prior, observations, zeta=DPS_ZETA, normalize=True)
        else:
            denoiser = exact
        stats = getattr(denoiser, "stats", None)
        say(f"sampling {spec['method']} ({spec['label']})")
        # warm-up (first-call overheads of torch.func), then timed and counted from zero
        with contextlib.suppress(FloatingPointError):
            sample(denoiser, 2, steps=2, sampler=spec["sampler"], dtype=torch.float64, seed=0,
                   progress=False)
        if stats is not None:
            denoiser.reset_stats()
        start = time.perf_counter()
        try:
            # the same seed for every run: common random numbers make the rows comparable
            x = sample(denoiser, samples, steps=spec["steps"], sampler=spec["sampler"],
                       dtype=torch.float64, seed=seed + 1, progress=not quiet,
                       **spec["options"])
            diverged = not bool(torch.isfinite(x).all())
        except FloatingPointError:
            x, diverged = None, True
        elapsed = time.perf_counter() - start
        stats = getattr(denoiser, "stats", None)
        row = {
            "key": spec["key"],
            "method": spec["method"],
            "sampler": spec["sampler"],
            "steps": spec["steps"],
            **spec["options"],
            "diverged": diverged,
            "wall_time_s": elapsed,
            "denoiser_calls": stats["calls"] if stats else None,
            "vjps": stats["vjps"] if stats else None,
            "solver_iterations": stats["solver_iterations"] if stats else None,
        }
        if spec["method"] == "DPS":
            row.update(zeta=DPS_ZETA, normalize=True)
        elif spec["method"] == "MMPS":
            row.update(tol=MMPS_TOL)
        if x is None or diverged:
            row.update(mean_error=None, cov_error=None, mean_error_raw=None, cov_error_raw=None)
        else:
            row.update(posterior_errors(x, exact.mean, exact.covariance))
            draws[spec["key"]] = x
        rows.append(row)

    start = time.perf_counter()
    x_exact = exact.sample(samples, generator=torch.Generator().manual_seed(seed + 2))
    elapsed = time.perf_counter() - start
    rows.append({
        "key": "exact", "method": "exact samples", "sampler": "closed form", "steps": None,
        "diverged": False, "wall_time_s": elapsed, "denoiser_calls": None, "vjps": None,
        "solver_iterations": None,
        **posterior_errors(x_exact, exact.mean, exact.covariance),
    })

    # figure: the three coordinates of largest posterior variance and one masked coordinate
    var = torch.diagonal(exact.covariance).clone()
    var[masked] = -1.0
    dims = sorted(var.argsort(descending=True)[:3].tolist() + [masked[0]])
    names = [f"x[{d}]" + (" (obs.)" if d in masked else "") for d in dims]
    sets = {}
    for row in rows:
        if row["key"] in ("mmps-dpm++", "dps-ddpm") and row["key"] in draws:
            label = f"{row['method']} ({row['sampler']}, {row['steps']} steps)"
            sets[label] = draws[row["key"]]
    sets["exact"] = x_exact
    figure_path, metrics_path = out / "posterior.png", out / "metrics.json"
    table = format_table(rows)
    metrics = {
        "demo": "gaussian",
        "version": _version(),
        "settings": {"samples": samples, "steps": steps, "seed": seed},
        "problem": {
            "dim": D,
            "observations": [
                {"operator": "Matrix", "shape": [6, D], "noise_std": std1},
                {"operator": "Mask", "coordinates": masked, "noise_std": std2},
            ],
        },
        "mc_floor": {
            "mean_error_raw": math.sqrt(D / samples),
            "cov_error_raw": math.sqrt(D * (D + 1) / (samples - 1)),
        },
        "units": "mean_error and cov_error are in units of mc_floor, the root-mean-square "
                 "error of as many exact posterior samples; *_raw are unscaled",
        "methods": {row.pop("key"): row for row in rows},
        "figure": str(figure_path),
    }
    try:  # the files first: they are the demo's result, whatever happens to the terminal
        pair_plot(sets, dims=dims, reference="exact", path=figure_path, names=names,
                  truth=problem["x_true"],
                  title=f"Gaussian demo: posterior samples ({samples} per set)")
        metrics_path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise DemoError(f"cannot write the demo's output to {str(out)!r}: {error}") from error

    if not quiet:
        print(file=stream)
    print(table, file=stream)
    say(
        "",
        f"errors in units of the Monte-Carlo error of {samples} exact posterior samples",
        "('exact samples' is one such draw: about 1 is as good as exact sampling;",
        "'exact denoiser' drives the same sampler with the true posterior denoiser, so it",
        "shows the sampler's own discretisation error).",
    )
    print(f"wrote {figure_path} and {metrics_path}", file=stream, flush=True)
    return metrics


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's table of errors, times and evaluation counts."""

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = ("method", "sampler", "steps", "mean err", "cov err", "time [s]", "calls", "VJPs")
    lines = []
    for r in rows:
        sampler = r["sampler"]
        if sampler == "dpm++":
            sampler = f"dpm++ {r.get('order', 2)}M"
        if r.get("grid"):
            sampler = f"{sampler}, {r['grid']}"
        err = ("diverged", "diverged") if r["diverged"] else (
            num(r["mean_error"], ".2f"), num(r["cov_error"], ".2f"))
        lines.append((r["method"], sampler, num(r["steps"], "d"), *err,
                      num(r["wall_time_s"], ".2f"), num(r["denoiser_calls"], "d"),
                      num(r["vjps"], "d")))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    left = {0, 1}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def _lorenz(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from .lorenz_demo import lorenz_demo

    return lorenz_demo(*args, **kwargs)


DEMOS: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
    "lorenz": (
        lambda *args, **kwargs: _lorenz(*args, **kwargs),
        "data assimilation: a Lorenz-63 trajectory (65 states) from 9 noisy observations of "
        "one variable; MMPS with the shipped window prior against a particle smoother "
        "(about a minute on 2 cores)",
    ),
    "gaussian": (
        gaussian_demo,
        "random linear-Gaussian inverse problem (16-D, two observations): MMPS and DPS "
        "against the closed-form posterior",
    ),
    "mixture": (
        lambda *args, **kwargs: _mixture(*args, **kwargs),
        "Gaussian-mixture prior (8 modes, 16-D), two projections: MMPS gets the modes' "
        "weights wrong, SMC with MMPS twists gets them right (and the evidence p(y))",
    ),
}


def _mixture(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from .demos import mixture_demo

    return mixture_demo(*args, **kwargs)
DEFAULT_DEMO = "lorenz"


# ---------------------------------------------------------------------------------------------
# argument parsing


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``plausible`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="plausible",
        description="plausible: Bayesian inverse problems with diffusion models.",
        epilog="Run 'plausible demo' for a quick tour; 'plausible demo --help' for its "
               "options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a demonstration and write its figure and metrics",
        description="Run a demonstration: sample a posterior with several methods, print a "
                    "table of their errors and costs, write DIR/posterior.png and "
                    "DIR/metrics.json.",
    )
    demo.add_argument("name", nargs="?", default=DEFAULT_DEMO, metavar="NAME",
                      help=f"the demo to run (default: {DEFAULT_DEMO}; see --list)")
    demo.add_argument("--list", action="store_true", help="list the demos and exit")
    demo.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                      help=f"output directory (default: {DEFAULT_OUT}/)")
    demo.add_argument("--samples", metavar="N", type=_int_at_least(32), default=None,
                      help="samples per method (default: 256 for lorenz, 1024 for gaussian, "
                           "2048 for mixture; at least 32)")
    demo.add_argument("--steps", metavar="S", type=_int_at_least(4), default=64,
                      help="sampler steps (lorenz: predictor-corrector steps; gaussian: DDPM "
                           "steps, the second-order DPM-Solver++ takes S/4; mixture: SMC "
                           "steps, MMPS takes 4S) (default: 64, at least 4)")
    demo.add_argument("--seed", metavar="K", type=int, default=0,
                      help="random seed of the problem and the samplers (default: 0)")
    demo.add_argument("--quiet", action="store_true",
                      help="no progress bars or explanations: only the table and the paths")
    demo.set_defaults(handler=_demo, subparser=demo)

    train = commands.add_parser(
        "train",
        help="train a prior from a configuration file",
        description="Train a diffusion prior described by a TOML or YAML configuration "
                    "([model], [data], [training]; see docs/guide.md). Checkpoints go to "
                    "training.out; run it again with --resume after a crash. Works under "
                    "'torchrun --nproc_per_node=N -m plausible train CONFIG'.",
    )
    train.add_argument("config", metavar="CONFIG", help="a .toml, .yaml or .yml file")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in training.out")
    train.add_argument("--check", action="store_true",
                       help="only validate the configuration and exit")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train, subparser=train)

    draw = commands.add_parser(
        "sample",
        help="draw samples from a trained prior",
        description="Draw samples from a checkpoint (a run folder or a step folder) and write "
                    "them as a safetensors file (tensor 'x'), with a PNG of them.",
    )
    draw.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder of 'plausible train'")
    draw.add_argument("-n", "--samples", metavar="N", type=_int_at_least(1), default=64,
                      help="number of samples (default: 64)")
    draw.add_argument("--steps", metavar="S", type=_int_at_least(1), default=64,
                      help="sampler steps (default: 64)")
    draw.add_argument("--sampler", default="ddpm",
                      choices=["ddpm", "ddpm-cov", "ddim", "heun", "pc", "dpm", "dpm++"],
                      help="sampler (default: ddpm; ddpm-cov: states of at most 64 values)")
    draw.add_argument("--grid", default="uniform", choices=["uniform", "logsnr", "karras"],
                      help="time grid (default: uniform)")
    draw.add_argument("--seed", metavar="K", type=int, default=0, help="random seed")
    draw.add_argument("--device", default="cpu", help="device (default: cpu)")
    draw.add_argument("--out", metavar="FILE", default="samples.safetensors",
                      help="output file (default: samples.safetensors; a PNG is written beside)")
    draw.add_argument("--quiet", action="store_true", help="no progress bar")
    draw.set_defaults(handler=_sample, subparser=draw)

    # Each application registers its commands in its own block (handlers below).
    # --- data: parser ---
    data = commands.add_parser(
        "data",
        help="simulate a training set of trajectories into a zarr store",
        description="Simulate trajectories of a built-in dynamical system and write them to a "
                    "zarr store (group with the array 'x' of shape (N, L, *S), float32 by "
                    "default, and attributes describing the simulator), ready for "
                    "plausible.data.Windows. lorenz63 is SDA's noisy Lorenz-63, standardised "
                    "as SDA; lorenz96 is Lorenz-96 (40 variables, F = 8, dt = 0.05), in "
                    "physical units; kolmogorov is the 2-D Kolmogorov flow (vorticity).",
    )
    data.add_argument("system", choices=sorted(_DATA_SYSTEMS), metavar="SYSTEM",
                      help="one of: " + ", ".join(sorted(_DATA_SYSTEMS)))
    data.add_argument("--out", metavar="PATH.zarr", required=True,
                      help="the zarr store to write (a path ending in .zarr)")
    data.add_argument("--trajectories", metavar="N", type=_int_at_least(1), default=None,
                      help="number of trajectories (default: per system, see below)")
    data.add_argument("--length", metavar="L", type=_int_at_least(1), default=None,
                      help="states per trajectory (default: per system)")
    data.add_argument("--burn-in", metavar="B", type=_int_at_least(0), default=None,
                      help="states discarded first, to reach the attractor (default: per "
                           "system)")
    data.add_argument("--batch", metavar="K", type=_int_at_least(1), default=None,
                      help="trajectories simulated at once, written as they are done "
                           "(default: per system)")
    data.add_argument("--seed", metavar="K", type=int, default=0,
                      help="random seed (default: 0)")
    data.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                      help="dtype of the stored array (default: float32)")
    data.add_argument("--overwrite", action="store_true", help="replace an existing store")
    data.add_argument("--quiet", action="store_true", help="no progress bar")
    data.epilog = "defaults: " + "; ".join(
        f"{name}: N={spec['trajectories']}, L={spec['length']}, burn-in={spec['burn_in']}"
        for name, spec in sorted(_DATA_SYSTEMS.items()))
    data.set_defaults(handler=_data, subparser=data)
    # --- end data: parser ---
    # --- sbi: parser ---
    sbi = commands.add_parser(
        "sbi",
        help="amortized posteriors on the sbi-benchmark tasks (train, sample, check)",
        description="Neural posterior estimation with a conditional diffusion model on the "
                    "sbi-benchmark tasks (plausible.tasks.sbi): 'train' simulates and trains, "
                    "'sample' draws posterior samples for a reference observation, 'check' "
                    "measures calibration (SBC, TARP, marginal coverage) on fresh simulations.",
    )
    sbi_commands = sbi.add_subparsers(dest="sbi_command", metavar="SUBCOMMAND")
    sbi.set_defaults(handler=_sbi_help, subparser=sbi)
    sbi_train = sbi_commands.add_parser(
        "train", help="simulate a task and train a ConditionalDenoiser",
        description="Simulate --simulations pairs (theta, y) of --task and train a "
                    "ConditionalDenoiser on them; checkpoints and sbi.json go to --out.")
    sbi_train.add_argument("--task", required=True, help="sbi-benchmark task, e.g. two_moons")
    sbi_train.add_argument("--simulations", metavar="N", type=_int_at_least(10), default=10_000,
                           help="simulation budget (default: 10000)")
    sbi_train.add_argument("--out", metavar="DIR", required=True, help="run folder")
    sbi_train.add_argument("--steps", metavar="S", type=_int_at_least(1), default=None,
                           help="upper bound on the training steps, early stopping decides "
                                "(default: 2000 + 18000 log10(N / 1000): 20000 for N = 10^4)")
    sbi_train.add_argument("--batch-size", metavar="B", type=_int_at_least(2), default=256,
                           help="batch size (default: 256)")
    sbi_train.add_argument("--hidden", metavar="H", type=_int_at_least(1), default=None,
                           help="hidden width of the ResMLP (default: 64 below 3000 "
                                "simulations, else 128; plausible.amortized.network_width)")
    sbi_train.add_argument("--seed", metavar="K", type=int, default=0, help="random seed")
    sbi_train.add_argument("--patience", metavar="P", type=_int_at_least(0), default=10,
                           help="early stopping: hold out 10%% of the simulations, validate "
                                "every 50 steps, halve the learning rate after every P // 3 "
                                "validations without improvement, stop after P and keep the "
                                "best weights (0: train all steps, cosine decay; default 10)")
    sbi_train.add_argument("--support", choices=("auto", "reject", "bijection"), default="auto",
                           help="box priors: reject samples outside the box, or sample "
                                "through the logit; auto (default) decides from the "
                                "simulations (ConditionalDenoiser's support=)")
    sbi_train.add_argument("--resume", action="store_true", help="continue a crashed run")
    sbi_train.add_argument("--quiet", action="store_true", help="no progress bar")
    sbi_train.set_defaults(handler=_sbi_train, subparser=sbi_train)
    sbi_sample = sbi_commands.add_parser(
        "sample", help="posterior samples for a reference observation (+ a pair plot)",
        description="Draw posterior samples of a trained run for sbibm's reference "
                    "observation --observation (or --y); writes a safetensors file (tensor "
                    "'theta') and a pair plot beside it (with sbibm's reference posterior "
                    "when the sbibm wheel is available).")
    sbi_sample.add_argument("run", metavar="RUN", help="run folder of 'plausible sbi train'")
    sbi_sample.add_argument("--observation", metavar="I", type=int, default=1,
                            help="sbibm reference observation 1..10 (default: 1)")
    sbi_sample.add_argument("--y", metavar="Y", default=None,
                            help="an observation given as comma-separated numbers instead")
    sbi_sample.add_argument("-n", "--samples", metavar="N", type=_int_at_least(1),
                            default=10_000, help="number of samples (default: 10000)")
    sbi_sample.add_argument("--steps", metavar="S", type=_int_at_least(1), default=128,
                            help="sampler steps (default: 128)")
    sbi_sample.add_argument("--sampler", default="ddpm",
                            choices=["ddpm", "ddpm-cov", "ddim", "heun", "dpm++", "unipc"],
                            help="sampler (default: ddpm; ddpm-cov: DDPM with Tweedie's "
                                 "covariance in each step, exact on Gaussian posteriors, "
                                 "D + 1 evaluations a step: use fewer steps, e.g. 32)")
    sbi_sample.add_argument("--seed", metavar="K", type=int, default=0, help="random seed")
    sbi_sample.add_argument("--out", metavar="FILE", default=None,
                            help="output file (default: RUN/samples-obs<I>.safetensors)")
    sbi_sample.add_argument("--c2st", action="store_true",
                            help="also report C2ST against sbibm's reference samples")
    sbi_sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sbi_sample.set_defaults(handler=_sbi_sample, subparser=sbi_sample)
    sbi_check = sbi_commands.add_parser(
        "check", help="calibration report: SBC, TARP and marginal coverage with plots",
        description="Simulate --simulations fresh pairs (theta, y) from the prior, draw "
                    "--samples posterior samples for each y in one batched call, and report "
                    "SBC ranks, TARP and marginal coverage (plausible.diagnostics) with their "
                    "uniformity p-values; writes check.json and PNG plots to --out.")
    sbi_check.add_argument("run", metavar="RUN", help="run folder of 'plausible sbi train'")
    sbi_check.add_argument("--simulations", metavar="B", type=_int_at_least(10), default=200,
                           help="fresh simulations (default: 200)")
    sbi_check.add_argument("--samples", metavar="N", type=_int_at_least(10), default=500,
                           help="posterior samples per simulation (default: 500)")
    sbi_check.add_argument("--steps", metavar="S", type=_int_at_least(1), default=64,
                           help="sampler steps (default: 64)")
    sbi_check.add_argument("--seed", metavar="K", type=int, default=1, help="random seed")
    sbi_check.add_argument("--out", metavar="DIR", default=None,
                           help="report folder (default: RUN/check)")
    sbi_check.add_argument("--quiet", action="store_true", help="no progress bar")
    sbi_check.set_defaults(handler=_sbi_check, subparser=sbi_check)
    # --- end sbi: parser ---
    # --- em: parser ---
    em_cmd = commands.add_parser(
        "em",
        help="learn a prior from observations only (empirical Bayes by EM)",
        description="Learn a diffusion prior from noisy observations only, by expectation-"
                    "maximisation (Rozet et al. 2024): lap 0 fits a Gaussian prior in closed "
                    "form, each lap draws one MMPS posterior sample per observation and keeps "
                    "training the network on them. The TOML/YAML configuration has [model] (as "
                    "'plausible train'), [observations] (path of a file written by "
                    "plausible.em.Observations.save), [em] (out, laps, seed, "
                    "gaussian_iterations, gaussian_rank), [sampling] and [training]; see "
                    "docs/em.md. Per-lap checkpoints go to em.out; run it again with --resume "
                    "after an interruption.",
    )
    em_cmd.add_argument("config", metavar="CONFIG", help="a .toml, .yaml or .yml file")
    em_cmd.add_argument("--resume", action="store_true",
                        help="continue from the last completed lap in em.out")
    em_cmd.add_argument("--check", action="store_true",
                        help="only validate the configuration and exit")
    em_cmd.add_argument("--quiet", action="store_true", help="no progress bars")
    em_cmd.set_defaults(handler=_em, subparser=em_cmd)
    # --- end em: parser ---
    return parser


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import ConfigError, read_config, train

    try:
        config = read_config(args.config)
    except ConfigError as error:
        print(f"plausible train: error: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: valid")
        return 0
    try:
        history = train(config, resume=args.resume, progress=not args.quiet)
    except (ConfigError, CheckpointError) as error:
        print(f"plausible train: error: {error}", file=sys.stderr)
        return 1
    if not history["loss"]:
        print(f"{config.training.out} is already trained to step {config.training.steps}")
    else:
        print(f"trained to step {history['step'][-1]}: loss {history['loss'][-1]:.4f}"
              + (f", validation loss {history['val_loss'][-1]:.4f}" if history["val_loss"]
                 else "") + f"; checkpoints in {config.training.out}")
    return 0


def _sample(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from safetensors.torch import save_file

    from .checkpoints import load
    from .sampling import sample

    try:
        model = load(args.checkpoint, map_location=args.device)
    except CheckpointError as error:
        print(f"plausible sample: error: {error}", file=sys.stderr)
        return 1
    x = sample(model, args.samples, steps=args.steps, sampler=args.sampler, grid=args.grid,
               seed=args.seed, device=args.device, progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": x.detach().cpu().contiguous()}, str(out),
              metadata={"checkpoint": str(args.checkpoint), "sampler": args.sampler,
                        "steps": str(args.steps), "seed": str(args.seed)})
    png = out.with_suffix(".png")
    from . import plots

    if x.dim() == 2:
        plots.pair_plot({"samples": x}, dims=list(range(min(4, x.shape[1]))), path=png)
    elif x.dim() >= 3:
        images = x if x.dim() == 4 else x.unsqueeze(1) if x.dim() == 3 else x.flatten(1, -3)
        plots.image_grid(images[:64], nrow=8, path=png)
    print(f"wrote {out} ({tuple(x.shape)}) and {png}")
    return 0


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list:
        width = max(len(name) for name in DEMOS)
        for name, (_, description) in DEMOS.items():
            tag = " (default)" if name == DEFAULT_DEMO else ""
            print(f"{name.ljust(width)}  {description}{tag}")
        return 0
    if args.name not in DEMOS:
        parser.error(f"unknown demo {args.name!r}; available: {', '.join(DEMOS)} "
                     "(see 'plausible demo --list')")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} exists and is not a directory")
    run, _ = DEMOS[args.name]
    # small demos: one thread is fastest, and kind to a busy machine; lorenz uses them all
    threads = torch.get_num_threads()
    if args.name != "lorenz":
        torch.set_num_threads(1)
    options = {} if args.samples is None else {"samples": args.samples}
    try:
        run(out, steps=args.steps, seed=args.seed, quiet=args.quiet, **options)
    except DemoError as error:
        print(f"plausible demo: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `plausible demo | head`: the files are written already
        _silence_stdout()
        return 1
    finally:
        torch.set_num_threads(threads)
    return 0


# --- data: handlers ---
class DataError(RuntimeError):
    """``plausible data`` could not run (reported without a traceback)."""


def _lorenz63() -> Any:
    from .tasks.lorenz import Lorenz63

    return Lorenz63()


def _lorenz96() -> Any:
    from .tasks.lorenz import Lorenz96

    return Lorenz96()


def _kolmogorov() -> Any:
    try:
        from .tasks.kolmogorov import KolmogorovFlow
    except ImportError as error:
        raise DataError(f"the Kolmogorov simulator (plausible.tasks.kolmogorov) is not "
                        f"available in this installation: {error}") from error
    return KolmogorovFlow()


# name -> simulator factory and defaults (SDA's sizes for Lorenz-63; Kolmogorov is small by
# default because it is costly on a CPU)
_DATA_SYSTEMS: dict[str, dict[str, Any]] = {
    "lorenz63": {"make": _lorenz63, "trajectories": 1024, "length": 1024, "burn_in": 1024,
                 "batch": 1024, "standardize": True},
    "lorenz96": {"make": _lorenz96, "trajectories": 1024, "length": 1024, "burn_in": 1024,
                 "batch": 1024, "standardize": False},
    "kolmogorov": {"make": _kolmogorov, "trajectories": 16, "length": 64, "burn_in": 64,
                   "batch": 4, "standardize": False},
}


def _data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    spec = _DATA_SYSTEMS[args.system]
    out = Path(args.out)
    if out.suffix != ".zarr":
        parser.error(f"--out must be a path ending in .zarr, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        print(f"plausible data: error: {out} already exists (pass --overwrite to replace it)",
              file=sys.stderr)
        return 1
    n = args.trajectories if args.trajectories is not None else spec["trajectories"]
    length = args.length if args.length is not None else spec["length"]
    burn_in = args.burn_in if args.burn_in is not None else spec["burn_in"]
    batch = min(n, args.batch if args.batch is not None else spec["batch"])
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    try:
        simulator = spec["make"]()
    except DataError as error:
        print(f"plausible data: error: {error}", file=sys.stderr)
        return 1
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"plausible data: error: cannot create {str(out.parent)!r}: {error}",
              file=sys.stderr)
        return 1

    import zarr
    from tqdm.auto import tqdm

    from .data import write_zarr

    state_shape = tuple(int(s) for s in simulator.state_shape)
    generator = torch.Generator().manual_seed(args.seed)
    flush = torch.is_flush_denormal() if hasattr(torch, "is_flush_denormal") else False
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    bar = tqdm(total=n, desc=f"{args.system} trajectories", unit="traj",
               disable=args.quiet or batch == n, leave=False)
    try:
        done = 0
        while done < n:
            k = min(batch, n - done)
            x = simulator.trajectories(k, length, burn_in=burn_in, generator=generator,
                                       progress=not args.quiet)
            if spec["standardize"]:
                x = simulator.standardize(x.to(torch.float64))
            x = x.to(dtype)
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(f"the {args.system} simulation produced NaN or "
                                         "infinity")
            if done == 0:
                write_zarr(out, {"x": x}, overwrite=True)
                array = zarr.open_group(str(out), mode="r+")["x"]
            else:
                array.append(x.numpy(), axis=0)
            done += k
            bar.update(k)
    except (FloatingPointError, ValueError, OSError) as error:
        print(f"plausible data: error: {error}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        torch.set_flush_denormal(flush)
    config = getattr(simulator, "config", None)
    config = dict((config() if callable(config) else config) or {})
    config = json.loads(json.dumps({"simulator": type(simulator).__name__, **config},
                                   default=str))
    attrs = {
        "system": args.system,
        "simulator": config,
        "dt": float(simulator.dt),
        "state_shape": list(state_shape),
        "trajectories": n,
        "length": length,
        "burn_in": burn_in,
        "batch": batch,
        "seed": args.seed,
        "dtype": args.dtype,
        "standardized": bool(spec["standardize"]),
        "layout": "x[i, t] is state t of trajectory i: (N, L, *state_shape)",
        "plausible": _version(),
    }
    if spec["standardize"]:
        attrs["standardization"] = {"mean": list(simulator.MEAN), "std": list(simulator.STD),
                                    "formula": "(x - mean) / std"}
    group = zarr.open_group(str(out), mode="r+")
    group.attrs.update(attrs)
    group["x"].attrs.update(attrs)
    elapsed = time.perf_counter() - start
    print(f"wrote {out}: x {(n, length, *state_shape)} {args.dtype} "
          f"({'standardised' if spec['standardize'] else 'physical units'}) in {elapsed:.1f} s")
    return 0
# --- end data: handlers ---

# --- sbi: handlers ---


def _sbi_help(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0 if args.sbi_command is None else 2


def _sbi_error(command: str, error: Exception) -> int:
    print(f"plausible sbi {command}: error: {error}", file=sys.stderr)
    return 1


def _sbi_run(run: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, task, run info) of a run folder of 'plausible sbi train'."""
    from .checkpoints import load
    from .tasks.sbi import get_task

    info_path = Path(run) / "sbi.json"
    if not info_path.is_file():
        raise CheckpointError(f"{run} is not a run of 'plausible sbi train' (no sbi.json)")
    info = json.loads(info_path.read_text())
    return load(run), get_task(info["task"]), info


def _sbi_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .amortized import ConditionalDenoiser, network_width, training_steps
    from .tasks.sbi import TASKS, get_task
    from .training import fit

    if args.task not in TASKS:
        parser.error(f"unknown task {args.task!r}; available: {', '.join(TASKS)}")
    task = get_task(args.task)
    n = args.simulations
    steps = args.steps or training_steps(n)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    thetas, ys, have = [], [], 0
    tick = time.perf_counter()
    while have < n:  # rows whose simulation failed (NaN) are redrawn
        theta = task.prior.sample(n - have, g)
        y = task.simulator(theta, g)
        ok = torch.isfinite(y).all(1)
        thetas.append(theta[ok].float())
        ys.append(y[ok].float())
        have += int(ok.sum())
    theta, y = torch.cat(thetas), torch.cat(ys)
    simulate_s = time.perf_counter() - tick
    out = Path(args.out)
    hidden = args.hidden or network_width(n)
    npe = ConditionalDenoiser.mlp(task.dim_theta, task.dim_y, prior=task.prior,
                                  support=args.support, hidden=hidden)
    npe.standardize_from(theta, y)
    tick = time.perf_counter()
    # with early stopping the learning rate halves on validation plateaus, so that the rate at
    # the stop does not depend on the step bound (measured better than a cosine decay over the
    # bound on 3 of 4 sbi benchmark tasks at 10^4 simulations: BENCHMARKS.md, section 6)
    decay = "plateau" if args.patience else "cosine"
    try:
        every = min(50, steps)
        history = fit(npe, (theta, y), steps=steps, batch_size=args.batch_size,
                      checkpoint=out, checkpoint_every=max(100, steps // 10),
                      resume=args.resume, seed=args.seed, progress=not args.quiet,
                      validation=0.1 if args.patience else None, decay=decay,
                      validate_every=every, log_every=every, patience=args.patience or None)
    except CheckpointError as error:
        return _sbi_error("train", error)
    info = {"task": args.task, "simulations": n, "steps": steps, "seed": args.seed,
            "batch_size": args.batch_size, "hidden": hidden, "simulate_s": simulate_s,
            "patience": args.patience, "decay": decay, "support": npe.support,
            "baseline": npe.baseline, "expected_acceptance": npe.expected_acceptance,
            "steps_run": int(history["stopped"][0]) if "stopped" in history else steps,
            "train_s": time.perf_counter() - tick}
    (out / "sbi.json").write_text(json.dumps(info, indent=1))
    last = f": loss {history['loss'][-1]:.4f}" if history["loss"] else ""
    print(f"trained on {n} simulations of {args.task} for {steps} steps{last}; run in {out}")
    return 0


def _sbi_sample(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from safetensors.torch import save_file

    from . import plots

    try:
        model, task, _ = _sbi_run(args.run)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as error:
        return _sbi_error("sample", error)
    reference = truth = None
    if args.y is not None:
        try:
            y = torch.tensor([float(v) for v in args.y.split(",")])
        except ValueError:
            parser.error(f"--y must be comma-separated numbers, got {args.y!r}")
        if y.numel() != task.dim_y:
            parser.error(f"--y must have {task.dim_y} numbers for {task.name}, got {y.numel()}")
        tag = "y"
    else:
        if not 1 <= args.observation <= 10:
            parser.error(f"--observation must be in 1..10, got {args.observation}")
        try:
            y = task.observation(args.observation)
            reference = task.reference_samples(args.observation)
            truth = task.true_parameters(args.observation)
        except FileNotFoundError as error:
            return _sbi_error("sample", error)
        tag = f"obs{args.observation}"
    tick = time.perf_counter()
    theta = model.given(y).sample(args.samples, steps=args.steps, sampler=args.sampler,
                                  seed=args.seed, progress=not args.quiet)
    elapsed = time.perf_counter() - tick
    out = Path(args.out) if args.out else Path(args.run) / f"samples-{tag}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"theta": theta.detach().cpu().contiguous(), "y": y.contiguous()}, str(out),
              metadata={"run": str(args.run), "task": task.name, "sampler": args.sampler,
                        "steps": str(args.steps), "seed": str(args.seed)})
    sets = {"plausible": theta}
    if reference is not None:
        sets["reference"] = reference
    png = out.with_suffix(".png")
    plots.pair_plot(sets, dims=list(range(min(task.dim_theta, 5))),
                    reference="reference" if reference is not None else None, path=png,
                    truth=truth, title=f"{task.name}: posterior ({tag})")
    print(f"wrote {out} ({tuple(theta.shape)}, {elapsed:.1f} s) and {png}")
    if args.c2st and reference is not None:
        from .diagnostics import c2st

        m = min(len(reference), args.samples)
        print(f"C2ST against the reference: {c2st(reference[:m], theta[:m].float()):.3f} "
              "(0.5 is perfect)")
    return 0


def _sbi_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import diagnostics as dg
    from . import plots

    try:
        model, task, _ = _sbi_run(args.run)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as error:
        return _sbi_error("check", error)
    g = torch.Generator().manual_seed(args.seed)
    theta = task.prior.sample(args.simulations, g).float()
    y = task.simulator(theta, g).float()
    ok = torch.isfinite(y).all(1)
    theta, y = theta[ok], y[ok]
    tick = time.perf_counter()
    samples = model.given(y).sample(args.samples, steps=args.steps, seed=args.seed,
                                    progress=not args.quiet)  # (N, B, D)
    samples = samples.transpose(0, 1).contiguous().float()  # (B, N, D)
    elapsed = time.perf_counter() - tick
    bounds = task.prior.bounds
    finite = bounds is not None and all(bool(torch.isfinite(b).all()) for b in bounds)
    ranks = dg.sbc(theta, samples, seed=args.seed)
    tarp = dg.tarp(theta, samples, bounds=bounds if finite else None, seed=args.seed)
    cover = dg.marginal_coverage(theta, samples, seed=args.seed)
    out = Path(args.out) if args.out else Path(args.run) / "check"
    out.mkdir(parents=True, exist_ok=True)
    names = [f"theta[{d}]" for d in range(task.dim_theta)]
    plots.sbc_histogram(ranks, out / "sbc.png", names=names, title=f"{task.name}: SBC ranks")
    plots.sbc_ecdf(ranks, out / "sbc_ecdf.png", names=names, title=f"{task.name}: SBC ECDF")
    plots.tarp_plot(tarp, out / "tarp.png", title=f"{task.name}: TARP")
    plots.coverage_plot(cover, out / "coverage.png", names=names,
                        title=f"{task.name}: marginal coverage")
    report = {
        "task": task.name, "simulations": int(theta.shape[0]), "samples": args.samples,
        "steps": args.steps, "seed": args.seed, "sampling_s": elapsed,
        "sbc_chi2_pvalues": ranks.pvalues.tolist(), "sbc_ks_pvalues": ranks.ks_pvalues.tolist(),
        "tarp_atc": tarp.atc, "tarp_distance": tarp.distance, "tarp_pvalue": tarp.pvalue,
        "marginal_coverage_pvalues": torch.as_tensor(cover.pvalue).tolist(),
    }
    (out / "check.json").write_text(json.dumps(report, indent=1))
    print(f"{task.name}: {report['simulations']} simulations x {args.samples} samples "
          f"({elapsed:.1f} s)")
    print("  SBC rank uniformity (KS p-value per dimension): "
          + ", ".join(f"{p:.3f}" for p in report["sbc_ks_pvalues"]))
    print(f"  TARP: ATC {tarp.atc:+.3f}, max |ECP - alpha| {tarp.distance:.3f}, "
          f"p-value {tarp.pvalue:.3f}")
    print("  marginal coverage (KS p-value per dimension): "
          + ", ".join(f"{p:.3f}" for p in report["marginal_coverage_pvalues"]))
    print(f"  (p-values well above 0.01 are consistent with calibration); plots in {out}")
    return 0


# --- end sbi: handlers ---

# --- em: handlers ---
def _em(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import ConfigError
    from .em import read_em_config, run_config

    try:
        config = read_em_config(args.config)
    except ConfigError as error:
        print(f"plausible em: error: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: valid")
        return 0
    try:
        result = run_config(config, resume=args.resume, progress=not args.quiet)
    except (ConfigError, CheckpointError) as error:
        print(f"plausible em: error: {error}", file=sys.stderr)
        return 1
    for record in result.laps:
        if record["lap"] == 0:
            ll = record.get("log_likelihood") or [float("nan")]
            print(f"lap 0: Gaussian prior, log-likelihood {ll[-1]:.4f} per observation")
        else:
            loss = record.get("loss")
            print(f"lap {record['lap']}: training loss "
                  + (f"{loss:.4f}" if loss is not None else "-"))
    print(f"prior after lap {config.em.laps} in {Path(config.em.out) / f'lap-{config.em.laps:04d}'}"
          f"/model (plausible sample works on it); metrics in "
          f"{Path(config.em.out) / 'metrics.jsonl'}")
    return 0
# --- end em: handlers ---


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's final flush of a closed pipe
    does not print another error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plausible`` command; returns the exit status.

    Raises:
        SystemExit: On bad arguments (status 2, with a message on stderr), ``--help`` and
            ``--version`` (status 0).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args, args.subparser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
