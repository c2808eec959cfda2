r"""The default demo: data assimilation on the noisy Lorenz-63 system (SDA's "lo" setting).

A trajectory of ``L = 65`` states of SDA's noisy Lorenz-63 (:class:`plausible.tasks.Lorenz63`,
standardised) is observed through its first variable only, every 8th state, with noise std
``sigma_y = 0.05`` (standardised units). The prior is a diffusion model of windows of
``2k + 1 = 9`` consecutive states (shipped with the package, trained by the recipe
``configs/lorenz63.toml``), composed into a prior over whole trajectories by
:class:`plausible.TrajectoryDenoiser`; :class:`plausible.MMPS` turns it into the posterior
``p(x_{1:L} | y)``, sampled with predictor-corrector steps.

The reference is a bootstrap particle filter with backward simulation (16384 particles, as
SDA) on the true model. The demo reports, for the diffusion posterior and the reference:

- coverage: the fraction of the true states inside the central 90% posterior band (about 0.9
  for a calibrated posterior);
- RMSE of the posterior mean against the truth (standardised units);
- the mean log-likelihood of the observations under the samples, ``log p(y | x)``, and of
  the samples under the true dynamics, ``log p(x_{2:L} | x_1)`` (physical units, SDA's
  metrics);
- W1: the 1-D Wasserstein distance between the samples and the reference at each time and
  variable, averaged, in units of the same distance between two independent particle-filter
  runs (1 is as good as the reference itself).

It writes ``posterior.png`` (posterior bands, truth, observations) and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["lorenz_demo", "lorenz_prior", "wasserstein_1d", "LORENZ_ASSET"]

F64 = torch.float64
LORENZ_ASSET = "assets/lorenz63"  # inside the package: model.safetensors, model.json
ORDER = 4  # windows of 2k + 1 = 9 states
LENGTH = 65
EVERY = 8
SIGMA_Y = 0.05


def lorenz_prior(length: int = LENGTH) -> Any:
    """The shipped Lorenz-63 prior over trajectories of ``length`` standardised states: the
    window denoiser of ``configs/lorenz63.toml`` composed by
    :class:`plausible.TrajectoryDenoiser` (order 4)."""
    from .checkpoints import load
    from .trajectories import TrajectoryDenoiser

    folder = resources.files("plausible").joinpath(LORENZ_ASSET)
    with resources.as_file(folder) as path:
        window = load(path)
    return TrajectoryDenoiser(window, order=ORDER, length=length, state_shape=(3,))


def wasserstein_1d(x: Tensor, y: Tensor) -> Tensor:
    r"""1-D Wasserstein-1 distance between the empirical distributions of ``x`` ``(N, ...)``
    and ``y`` ``(M, ...)`` along the first axis, for each remaining entry: the integral of
    :math:`|F_x^{-1}(q) - F_y^{-1}(q)|` over :math:`q`, computed on the merged quantile grid
    (exact for empirical distributions of different sizes). Returns shape ``x.shape[1:]``."""
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x and y must agree after the first axis, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    xs = torch.sort(x.to(F64).flatten(1), 0)[0]
    ys = torch.sort(y.to(F64).flatten(1), 0)[0]
    n, m = xs.shape[0], ys.shape[0]
    q = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=F64) / n,
                                torch.arange(1, m + 1, dtype=F64) / m]))
    dq = torch.diff(q, prepend=q.new_zeros(1))
    ix = torch.clamp(torch.ceil(q * n - 1e-9).long() - 1, 0, n - 1)
    iy = torch.clamp(torch.ceil(q * m - 1e-9).long() - 1, 0, m - 1)
    w = ((xs[ix] - ys[iy]).abs() * dq[:, None]).sum(0)
    return w.reshape(x.shape[1:])


def _summary(x: Tensor, truth: Tensor, y: Tensor, sim: Any, obs_index: Tensor) -> dict:
    """Coverage, RMSE, log p(y | x), log p(x_2:L | x_1) of samples ``x`` (N, L, 3)
    (standardised)."""
    lo, hi = torch.quantile(x, 0.05, dim=0), torch.quantile(x, 0.95, dim=0)
    coverage = ((truth >= lo) & (truth <= hi)).to(F64).mean()
    rmse = (x.mean(0) - truth).square().mean().sqrt()
    r = (x[:, obs_index, 0] - y) / SIGMA_Y
    log_py = (-0.5 * r.square() - math.log(SIGMA_Y) - 0.5 * math.log(2 * math.pi)).sum(1)
    log_px = sim.log_prob_trajectory(sim.unstandardize(x))
    return {"coverage_90": float(coverage), "rmse": float(rmse),
            "log_p_y_given_x": float(log_py.mean()), "log_p_x": float(log_px.mean())}


def lorenz_demo(
    out: str | os.PathLike[str],
    samples: int | None = None,
    steps: int = 64,
    seed: int = 0,
    quiet: bool = False,
    stream: Any = None,
    particles: int = 16384,
) -> dict[str, Any]:
    """Runs the ``lorenz`` demo (see the module docstring): writes ``out/posterior.png`` and
    ``out/metrics.json``, prints a table, and returns the metrics.

    Arguments:
        out: Output directory.
        samples: Posterior samples (default 256).
        steps: Predictor steps of the sampler (MMPS's default: each followed by one Langevin
            correction, except at the lowest noise levels).
        seed: Seed of the true trajectory, the observations and the samplers.
        quiet: No progress bars or explanations.
        stream: Where to print (default stdout).
        particles: Particles of the reference smoother (SDA: 16384).
    """
    from . import MMPS, Observation, ops, sample
    from .cli import DemoError, _version
    from .plots import trajectory_bands
    from .tasks.filters import particle_smoother
    from .tasks.lorenz import Lorenz63

    samples = 256 if samples is None else int(samples)
    stream = stream if stream is not None else sys.stdout
    out = Path(out)

    def say(*lines: str) -> None:
        if not quiet:
            print(*lines, sep="\n", file=stream, flush=True)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoError(f"cannot create the output directory {str(out)!r}: {error}") from error

    flush = torch.set_flush_denormal(True)
    sim = Lorenz63()
    g = torch.Generator().manual_seed(seed)
    truth_phys = sim.trajectories(1, LENGTH, burn_in=1024, generator=g, progress=False)[0]
    truth = sim.standardize(truth_phys)  # (L, 3)
    obs_index = torch.arange(0, LENGTH, EVERY)
    y = truth[obs_index, 0] + SIGMA_Y * torch.randn(len(obs_index), generator=g, dtype=F64)
    say(f"plausible {_version()}: Lorenz-63 data assimilation (seed {seed})",
        f"  truth:       {LENGTH} states of SDA's noisy Lorenz-63 (dt = {sim.dt}), standardised",
        f"  observation: the first variable at every {EVERY}th state ({len(obs_index)} "
        f"values), noise std {SIGMA_Y}",
        f"  prior:       diffusion model of windows of {2 * ORDER + 1} states (shipped; "
        "configs/lorenz63.toml), composed over the trajectory",
        f"  posterior:   MMPS, {steps} predictor-corrector steps, {samples} samples; "
        f"reference: particle smoother ({particles} particles)",
        "")

    prior = lorenz_prior(LENGTH)
    mask = torch.zeros(LENGTH, 3, dtype=torch.bool)
    mask[obs_index, 0] = True
    y_full = torch.full((LENGTH, 3), float("nan"), dtype=torch.float32)
    y_full[obs_index, 0] = y.float()
    posterior = MMPS(prior, Observation(y_full, ops.Mask(mask), noise=SIGMA_Y), maxiter=2)
    start = time.perf_counter()
    # MMPS's default sampler (MMPS.sampling): the ancestral predictor and one Langevin
    # correction per step above the noise ratio 0.2
    x = sample(posterior, samples, steps=steps, seed=seed + 1, progress=not quiet).to(F64)
    time_mmps = time.perf_counter() - start

    # reference: stationary initial particles (the training trajectories start on the
    # attractor), bootstrap filter + backward simulation on the true model
    def reference(offset: int) -> tuple[Tensor, float]:
        gen = torch.Generator().manual_seed(seed + offset)
        start = time.perf_counter()
        x0 = sim.trajectories(particles, 1, burn_in=1024, generator=gen, progress=False)[:, 0]
        traj, _ = particle_smoother(
            y[:, None], obs_index, LENGTH, x0, sim.step, sim.noise,
            lambda z: sim.standardize(z)[:, :1], SIGMA_Y, particles=particles,
            samples=max(samples, 1024), generator=gen)
        return sim.standardize(traj), time.perf_counter() - start

    say("particle smoother (reference) ...")
    ref, time_ref = reference(2)
    ref2, _ = reference(3)
    torch.set_flush_denormal(flush)

    # the floor: as many samples of a second reference run (same Monte-Carlo error as x)
    floor = float(wasserstein_1d(ref2[:samples], ref).mean())
    rows = {
        "MMPS": {"method": "MMPS (plausible)", "wall_time_s": time_mmps,
                 **_summary(x, truth, y, sim, obs_index),
                 "w1_over_floor": float(wasserstein_1d(x, ref).mean()) / floor},
        "reference": {"method": "particle smoother", "wall_time_s": time_ref,
                      **_summary(ref2[:samples], truth, y, sim, obs_index),
                      "w1_over_floor": 1.0},
    }
    metrics = {
        "demo": "lorenz",
        "version": _version(),
        "settings": {"samples": samples, "steps": steps, "seed": seed, "length": LENGTH,
                     "observed_every": EVERY, "sigma_y": SIGMA_Y, "order": ORDER,
                     "sampler": "MMPS's default: pc, ancestral predictor (eta 1), 1 correction "
                                "(tau 0.25) above sigma/alpha = 0.2", "mmps_maxiter": 2,
                     "particles": particles},
        "w1_floor": floor,
        "units": "states standardised as SDA ((x - (0, 0, 25)) / (8, 9, 8.6)); log p(x) in "
                 "physical units; w1_over_floor: mean 1-D W1 to the reference over (time, "
                 "variable), divided by that of a second particle-filter run",
        "methods": rows,
    }
    figure_path, metrics_path = out / "posterior.png", out / "metrics.json"
    try:
        t = torch.arange(LENGTH) * sim.dt
        obs_plot = torch.full((LENGTH, 3), float("nan"), dtype=F64)
        obs_plot[obs_index, 0] = y
        fig = trajectory_bands(t, x, truth=truth, observations=obs_plot,
                               names=["x (observed)", "y", "z"],
                               title=f"Lorenz-63 posterior: MMPS ({samples} samples), "
                                     f"reference 90% band dotted")
        band = torch.quantile(ref, torch.tensor([0.05, 0.95], dtype=F64), dim=0)
        for d, ax in enumerate(fig.axes[:3]):
            for q, label in ((band[0], "reference 90%"), (band[1], None)):
                ax.plot(t.numpy(), q[:, d].numpy(), color="0.35", linewidth=0.9,
                        linestyle=":", label=label)
        fig.axes[0].legend(fontsize=7, ncol=6, loc="upper left", frameon=False)
        fig.savefig(figure_path, dpi=110)
        metrics["figure"] = str(figure_path)
        metrics_path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise DemoError(f"cannot write the demo's output to {str(out)!r}: {error}") from error

    say("")
    header = (f"{'method':20} {'coverage 90%':>12} {'RMSE':>7} {'log p(y|x)':>11} "
              f"{'log p(x)':>9} {'W1/floor':>9} {'time [s]':>9}")
    print(header, file=stream)
    for row in rows.values():
        print(f"{row['method']:20} {row['coverage_90']:12.2f} {row['rmse']:7.3f} "
              f"{row['log_p_y_given_x']:11.1f} {row['log_p_x']:9.1f} "
              f"{row['w1_over_floor']:9.2f} {row['wall_time_s']:9.1f}", file=stream)
    say("", "coverage: fraction of the true states inside the central 90% band; W1/floor: "
        "distance to the reference posterior in units of the reference's own Monte-Carlo "
        "error (1 is as good as the reference).")
    print(f"wrote {figure_path} and {metrics_path}", file=stream, flush=True)
    return metrics
