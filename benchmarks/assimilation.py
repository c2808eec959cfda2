r"""Data assimilation benchmarks (SDA, Rozet & Louppe 2023): one function per experiment.

``--experiment lorenz`` (this file): SDA's Lorenz-63 evaluation, scaled down for a shared CPU.

1. **Data.** :class:`plausible.tasks.Lorenz63` (SDA's ``NoisyLorenz63``: RK4, dt = 0.025,
   N(0, dt) transition noise in physical units), 1024 chains x 1024 states after 1024 burn-in
   transitions (SDA's sizes), standardised by mean (0, 0, 25) and std (8, 9, 8.6), split
   80 / 10 / 10 % into train / valid / test chains (as SDA).
2. **Window prior.** ``plausible.Denoiser(plausible.nets.ResMLP(3 (2k + 1), ...),
   plausible.VPSchedule(eta=1e-3))`` over flattened windows of ``2k + 1`` states (SDA: k = 2,
   an MLP of width 256 and depth 5 trained for 4096 epochs; here a smaller ResMLP and fewer
   steps, see ``--hidden --blocks --train-steps``), trained by ``plausible.fit`` on
   ``plausible.data.Windows``; saved with ``plausible.checkpoints.save_model`` under
   ``results/lorenz63_window_prior_k<k>/`` and reused by later runs (``--fresh`` retrains).
3. **Posteriors.** The prior composed to L = 65 by ``plausible.TrajectoryDenoiser(window,
   order=k, length=65)``; the first variable observed in standardised units exactly as SDA
   (``y = x_std[::8, 0] + 0.05 eps`` for "lo", ``y = x_std[:, 0] + 0.25 eps`` for "hi"),
   on the first test trajectories. MMPS, SDA's diagonal likelihood (gamma = 3e-2) and DPS,
   all sampled by ``sampler="pc"`` (DDIM predictor + C Langevin corrections, tau = 0.25) with
   C in {0, 1, 2} (``--corrections``) and 64 predictor steps (``--steps``; several values run
   a sweep against one reference; ``--grid`` sets the time grid, SDA's is uniform in t).
4. **Reference.** :func:`plausible.tasks.particle_smoother`: bootstrap particle filter with
   16384 particles (SDA) in physical units, started from stationary states (1024 burn-in
   transitions; SDA: 64 from a Gaussian), then FFBSi (not SDA's genealogy, whose early states
   are degenerate). Two independent runs A and B.
5. **Metrics** (physical units, SDA's): the earth mover's distance W1 between the sample set
   and run B, *joint* over whole trajectories (the exact optimal assignment between two sets
   of M trajectories, Euclidean cost on the 65 x 3 values, as SDA's ``emd``), reported as a
   multiple of the floor W1(A, B) between the two particle-smoother runs; also the average
   over the 65 x 3 time-variable marginals of the 1-D W1 (more sensitive), as a multiple of
   its own floor; ``log p(x_2:L | x_1)`` under the true transition and ``log p(y | x)``
   (sample means). Target: "lo", joint W1 at most 1.25x the floor.

``--experiment kolmogorov`` runs ``benchmarks/assimilation_kolmogorov.py`` (its own options
follow ``--``); ``all`` runs both.

Run: ``nice -n 10 python benchmarks/assimilation.py --experiment lorenz`` (``--quick`` for a
smoke run). Prints a table, writes ``results/assimilation_lorenz.json`` and
``results/assimilation_lorenz_<regime>.png`` (posterior bands).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plausible  # noqa: E402
from _common import RESULTS, setup, table, write_json  # noqa: E402
from plausible import DPS, MMPS, SDA, Observation, ops, sample  # noqa: E402
from plausible.checkpoints import load, save_model  # noqa: E402
from plausible.data import Windows  # noqa: E402
from plausible.tasks.filters import particle_smoother  # noqa: E402
from plausible.tasks.lorenz import Lorenz63  # noqa: E402

L = 65
REGIMES = {"lo": {"step": 8, "sigma": 0.05}, "hi": {"step": 1, "sigma": 0.25}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=("lorenz", "kolmogorov", "all"), default="lorenz")
    p.add_argument("--quick", action="store_true", help="a tiny smoke configuration")
    p.add_argument("--fresh", action="store_true", help="retrain the cached window prior")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--regimes", nargs="*", choices=tuple(REGIMES), default=list(REGIMES),
                   help="observation regimes (none: only the prior and --prior-check)")
    p.add_argument("--prior-check", action="store_true",
                   help="also sample the composed trajectory prior unconditionally (64 "
                        "samples per C) and measure its transition residuals")
    p.add_argument("--instances", type=int, default=1,
                   help="test trajectories (observations) per regime")
    p.add_argument("--pad-start", type=int, default=0,
                   help="sample P unobserved states before the trajectory and drop them (so "
                        "that its first states come from window centres, not the first "
                        "window's edge); metrics on the last L states")
    p.add_argument("--first-instance", type=int, default=0,
                   help="index of the first test trajectory (to run more observations "
                        "in separate processes)")
    p.add_argument("--samples", type=int, default=256, help="posterior samples per method")
    p.add_argument("--steps", type=int, nargs="+", default=[64],
                   help="predictor steps of the pc sampler (several: a sweep, one reference)")
    p.add_argument("--corrections", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eta", type=float, default=0.0,
                   help="stochasticity of the predictor (0: DDIM, SDA's; 1: ancestral DDPM)")
    p.add_argument("--grid", choices=("uniform", "logsnr", "karras"), default="uniform",
                   help="time grid of the pc sampler (SDA: uniform in t)")
    p.add_argument("--methods", nargs="+", choices=("MMPS", "SDA", "DPS"),
                   default=["MMPS", "SDA", "DPS"])
    p.add_argument("--mmps-maxiter", type=int, default=2, help="GMRES iterations of MMPS")
    p.add_argument("--dps-zeta", type=float, default=1.0,
                   help="DPS step (normalised, Chung et al.)")
    p.add_argument("--particles", type=int, default=16384)
    p.add_argument("--order", type=int, default=2, help="window half-width k (SDA: 2)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--t-distribution", choices=("uniform", "lognormal"), default="uniform",
                   help="noise-level distribution of the training loss")
    p.add_argument("--prior-threads", type=int, default=None,
                   help="torch threads while training the prior (default: --threads)")
    p.add_argument("--train-only", action="store_true", help="stop after training the prior")
    p.add_argument("--tag", default="", help="suffix of the output names (keeps other runs)")
    return p


# --------------------------------------------------------------------------------------------
# metrics


def w1_joint(x: Tensor, y: Tensor) -> float:
    """Exact W1 between two empirical measures of ``M`` trajectories each (uniform weights):
    the optimal assignment of the Euclidean cost on flattened trajectories (SDA's ``emd``)."""
    cost = torch.cdist(x.flatten(1).double(), y.flatten(1).double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def w1_marginal(x: Tensor, y: Tensor) -> float:
    """Mean over time steps and variables of the 1-D W1 between the marginals (equal sizes:
    the mean absolute difference of the sorted values)."""
    xs = torch.sort(x.double(), dim=0).values
    ys = torch.sort(y.double(), dim=0).values
    return float((xs - ys).abs().mean())


def log_likelihood(x_phys: Tensor, y: Tensor, step: int, sigma: float) -> Tensor:
    """SDA's ``log p(y | x)``: ``sum log N(y; standardise(x)[::step, 0], sigma^2)``, ``(M,)``."""
    h = Lorenz63.standardize(x_phys)[:, ::step, 0]
    return torch.distributions.Normal(y.double(), sigma).log_prob(h.double()).sum(1)


def metrics(x_phys: Tensor, ref_b: Tensor, floor_joint: float, floor_marg: float,
            sim: Lorenz63, y: Tensor, step: int, sigma: float) -> dict[str, float]:
    w1j, w1m = w1_joint(x_phys, ref_b), w1_marginal(x_phys, ref_b)
    return {
        "w1": w1j, "w1_ratio": w1j / floor_joint,
        "w1_marginal": w1m, "w1_marginal_ratio": w1m / floor_marg,
        "log_px": float(sim.log_prob_trajectory(x_phys.double()).mean()),
        "log_py": float(log_likelihood(x_phys, y, step, sigma).mean()),
    }


# --------------------------------------------------------------------------------------------
# Lorenz-63


def _window_prior(args: argparse.Namespace, train: Tensor, valid: Tensor,
                  say: Any) -> tuple[plausible.Denoiser, dict[str, Any]]:
    W = 2 * args.order + 1
    settings = {"order": args.order, "window": W, "hidden": args.hidden, "blocks": args.blocks,
                "train_steps": args.train_steps, "batch_size": args.batch_size, "lr": 1e-3,
                "weight_decay": 1e-3, "ema": 0.999, "schedule": "VPSchedule(eta=1e-3)",
                "seed": args.seed, "data": "Lorenz63, 819 train chains x 1024 states"}
    if args.t_distribution != "uniform":
        settings["t_distribution"] = args.t_distribution
    # the default recipe keeps its historical folder; any other recipe gets its own folder
    # (named by what differs), so that a sweep never overwrites another cached prior
    name = f"lorenz63_window_prior_k{args.order}"
    default = {"hidden": 128, "blocks": 3, "train_steps": 8000, "batch_size": 256}
    if any(settings[k] != v for k, v in default.items()) or args.t_distribution != "uniform":
        name += (f"_h{args.hidden}_b{args.blocks}_s{args.train_steps}_bs{args.batch_size}"
                 + ("" if args.t_distribution == "uniform" else f"_{args.t_distribution}"))
    folder = RESULTS / (name + ("_quick" if args.quick else ""))
    if folder.exists() and not args.fresh:
        prior = load(folder)
        import json

        extra = json.loads((folder / "model.json").read_text()).get("extra", {})
        if {k: extra.get(k) for k in settings} == settings:
            say(f"window prior: reusing {folder} (trained in {extra.get('wall_time_s'):.0f} s)")
            return prior, extra
        say(f"window prior: {folder} has other settings, retraining")
    net = plausible.nets.ResMLP(3 * W, hidden=args.hidden, blocks=args.blocks)
    prior = plausible.Denoiser(net, plausible.VPSchedule(eta=1e-3))
    say(f"window prior: ResMLP({3 * W}, hidden={args.hidden}, blocks={args.blocks}), "
        f"{sum(p.numel() for p in net.parameters())} parameters, {args.train_steps} steps")
    threads = torch.get_num_threads()
    if args.prior_threads is not None:
        torch.set_num_threads(args.prior_threads)
    t0 = time.perf_counter()
    history = plausible.fit(
        prior, Windows(train, W, flatten=True), steps=args.train_steps,
        batch_size=args.batch_size, lr=1e-3, weight_decay=1e-3, ema=0.999,
        validation=Windows(valid, W, flatten=True),
        validate_every=max(1, args.train_steps // 4), seed=args.seed, progress=True,
        t_distribution=args.t_distribution)
    wall = time.perf_counter() - t0
    torch.set_num_threads(threads)
    tail = history["loss"][-max(1, len(history["loss"]) // 10):]
    extra = {**settings, "wall_time_s": wall, "train_threads": torch.get_num_threads()
             if args.prior_threads is None else args.prior_threads,
             "final_loss": float(np.mean(tail)),
             "val_loss": history["val_loss"][-1] if history["val_loss"] else None,
             "parameters": sum(p.numel() for p in net.parameters())}
    save_model(prior, folder, extra=extra)
    say(f"  trained in {wall:.0f} s: loss {extra['final_loss']:.4f}, validation "
        f"{extra['val_loss']}; saved to {folder}")
    return prior.eval(), extra


def lorenz(args: argparse.Namespace) -> dict[str, Any]:
    """SDA's Lorenz-63 evaluation (see the module docstring)."""
    info = setup(args.threads, args.seed)
    torch.set_flush_denormal(True)

    def say(*lines: str) -> None:
        print(*lines, sep="\n", flush=True)

    if args.quick:
        args.train_steps, args.samples, args.steps = 300, 32, [8]
        args.particles, args.hidden, args.blocks = 1024, 32, 1
        args.corrections = [0, 1]
    sim = Lorenz63()
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    chains = sim.trajectories(1024, 1024, burn_in=1024, generator=g, progress=False)
    z = Lorenz63.standardize(chains).float()
    train, valid, test = z[:819], z[819:921], z[921:]
    say(f"data: 1024 chains x 1024 states (burn-in 1024) in {time.perf_counter() - t0:.1f} s")
    prior, prior_info = _window_prior(args, train, valid, say)
    if args.train_only:
        return {"window_prior": prior_info}
    traj_prior = plausible.TrajectoryDenoiser(prior, order=args.order, length=L)
    P = args.pad_start
    padded_prior = plausible.TrajectoryDenoiser(prior, order=args.order, length=L + P) \
        if P else traj_prior

    prior_check = []
    if args.prior_check:
        for steps in args.steps:
            for C in args.corrections:
                t1 = time.perf_counter()
                x = sample(traj_prior, 64, steps=steps, sampler="pc", corrections=C, tau=0.25,
                           grid=args.grid, seed=args.seed + 11, progress=False)
                x_phys = Lorenz63.unstandardize(x.double())
                r = x_phys[:, 1:] - sim.step(x_phys[:, :-1])
                prior_check.append({"steps": steps, "C": C,
                                    "residual_rms": float(r.square().mean().sqrt()),
                                    "noise_std": sim.noise,
                                    "log_px": float(sim.log_prob_trajectory(x_phys).mean()),
                                    "wall_time_s": time.perf_counter() - t1})
                say(f"prior (k={args.order}, {steps} steps, C={C}): transition residual rms "
                    f"{prior_check[-1]['residual_rms']:.3f} (true noise {sim.noise:.3f}), "
                    f"log p(x) {prior_check[-1]['log_px']:.1f}, "
                    f"{prior_check[-1]['wall_time_s']:.0f} s")
    rows: list[dict[str, Any]] = []
    references: dict[str, Any] = {}
    figures: list[str] = []
    for regime in args.regimes:
        step, sigma = REGIMES[regime]["step"], REGIMES[regime]["sigma"]
        for instance in range(args.first_instance, args.first_instance + args.instances):
            gen = torch.Generator().manual_seed(args.seed + 1000 * (instance + 1)
                                                + (0 if regime == "lo" else 1))
            truth = test[instance, :L].double()  # standardised
            y = truth[::step, 0] + sigma * torch.randn(truth[::step, 0].shape, generator=gen,
                                                       dtype=torch.float64)
            observed = list(range(0, L, step))
            # reference: two independent particle smoothers (physical units)
            refs, ref_info = [], []
            for _run in range(2):
                t1 = time.perf_counter()
                init = sim.trajectories(args.particles, 1, burn_in=1024, generator=gen,
                                        progress=False)[:, 0]
                x_ref, res = particle_smoother(
                    y[:, None], observed, L, init, sim.step, sim.noise,
                    lambda x: Lorenz63.standardize(x)[:, :1], sigma,
                    particles=args.particles, samples=args.samples, generator=gen)
                refs.append(x_ref)
                ref_info.append({"log_evidence": float(res.log_evidence),
                                 "min_ess": float(res.ess.min()),
                                 "wall_time_s": time.perf_counter() - t1})
            ref_a, ref_b = refs
            floor_joint, floor_marg = w1_joint(ref_a, ref_b), w1_marginal(ref_a, ref_b)
            key = f"{regime}/{instance}"
            references[key] = {"runs": ref_info, "w1_floor": floor_joint,
                               "w1_marginal_floor": floor_marg}
            truth_phys = Lorenz63.unstandardize(truth)
            base = {"regime": regime, "instance": instance}
            rows.append({**base, "method": "particle smoother A", "C": None,
                         **metrics(ref_a, ref_b, floor_joint, floor_marg, sim, y, step, sigma),
                         "wall_time_s": ref_info[0]["wall_time_s"]})
            rows.append({**base, "method": "truth", "C": None,
                         "log_px": float(sim.log_prob_trajectory(truth_phys)),
                         "log_py": float(log_likelihood(truth_phys[None], y, step, sigma)[0])})
            say(f"[{key}] particle smoother: W1 floor {floor_joint:.3f} (joint), "
                f"{floor_marg:.4f} (marginal), min ESS {ref_info[0]['min_ess']:.0f}, "
                f"log p(y) {ref_info[0]['log_evidence']:.2f} / {ref_info[1]['log_evidence']:.2f}")

            mask = torch.zeros(L + P, 3, dtype=torch.bool)
            mask[P::step, 0] = True
            y_full = torch.full((L + P, 3), math.nan)
            y_full[P::step, 0] = y.float()
            obs = Observation(y_full, A=ops.Mask(mask), noise=sigma)
            band_samples = None
            for method in args.methods:
                for steps, C in [(s_, c_) for s_ in args.steps for c_ in args.corrections]:
                    if method == "MMPS":
                        post = MMPS(padded_prior, obs, maxiter=args.mmps_maxiter)
                    elif method == "SDA":
                        post = SDA(padded_prior, obs, gamma=3e-2)
                    else:
                        post = DPS(padded_prior, obs, zeta=args.dps_zeta, normalize=True)
                    t1 = time.perf_counter()
                    x = sample(post, args.samples, steps=steps, sampler="pc", grid=args.grid,
                               corrections=C, tau=0.25, eta=args.eta,
                               seed=args.seed + 7 * C + 1, progress=False)
                    wall = time.perf_counter() - t1
                    x = x[:, P:]
                    if not bool(torch.isfinite(x).all()):
                        rows.append({**base, "method": method, "steps": steps, "C": C,
                                     "diverged": True, "wall_time_s": wall})
                        say(f"[{key}] {method} {steps} steps C={C}: diverged")
                        continue
                    x_phys = Lorenz63.unstandardize(x.double())
                    row = {**base, "method": method, "steps": steps, "C": C,
                           "wall_time_s": wall,
                           "denoiser_calls": post.stats["calls"], "vjps": post.stats["vjps"],
                           **metrics(x_phys, ref_b, floor_joint, floor_marg, sim, y, step,
                                     sigma)}
                    rows.append(row)
                    say(f"[{key}] {method} {steps} steps C={C}: W1 {row['w1']:.3f} "
                        f"({row['w1_ratio']:.3f}x "
                        f"floor), marginal {row['w1_marginal_ratio']:.2f}x, log p(x) "
                        f"{row['log_px']:.1f}, log p(y|x) {row['log_py']:.1f}, {wall:.0f} s")
                    if (method == "MMPS" and C == max(args.corrections)
                            and steps == max(args.steps)):
                        band_samples = x_phys
            if instance == args.first_instance:
                sets = {"particle smoother": ref_a}
                if band_samples is not None:
                    sets[f"MMPS (C={max(args.corrections)})"] = band_samples
                for label, xs in sets.items():
                    name = "reference" if label == "particle smoother" else "mmps"
                    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
                    path = RESULTS / f"assimilation_lorenz_{regime}_{name}{suffix}.png"
                    obs_phys = 8.0 * y  # x = 8 * x_std (mean 0): first variable, physical
                    observations = (torch.arange(0, L, step).float(),
                                    torch.stack([obs_phys, torch.full_like(obs_phys, math.nan),
                                                 torch.full_like(obs_phys, math.nan)], 1))
                    plausible.plots.trajectory_bands(
                        torch.arange(L).float(), xs, truth=truth_phys, observations=observations,
                        path=path, names=["x", "y", "z"],
                        title=f"Lorenz-63 '{regime}' ({label}, {xs.shape[0]} samples)")
                    figures.append(str(path))

    # summary: per regime, method and C, the mean over instances
    summary = []
    def key_of(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["regime"], r["method"], r.get("steps"), r["C"])

    keys = sorted({key_of(r) for r in rows if "w1" in r},
                  key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2],
                                 -1 if k[3] is None else k[3]))
    for regime, method, steps, C in keys:
        group = [r for r in rows if key_of(r) == (regime, method, steps, C) and "w1" in r]
        mean = {m: float(np.mean([r[m] for r in group]))
                for m in ("w1", "w1_ratio", "w1_marginal_ratio", "log_px", "log_py",
                          "wall_time_s")}
        summary.append({"regime": regime, "method": method, "steps": steps, "C": C,
                        "n": len(group), **mean})
    for regime in args.regimes:
        truth_rows = [r for r in rows if r["regime"] == regime and r["method"] == "truth"]
        summary.append({"regime": regime, "method": "truth", "steps": None, "C": None,
                        "n": len(truth_rows),
                        "log_px": float(np.mean([r["log_px"] for r in truth_rows])),
                        "log_py": float(np.mean([r["log_py"] for r in truth_rows]))})
    columns = [("regime", "regime"), ("method", "method"), ("steps", "steps"), ("C", "C"),
               ("n", "obs."),
               ("w1", "W1"), ("w1_ratio", "W1 / floor"),
               ("w1_marginal_ratio", "marginal W1 / floor"), ("log_px", "log p(x)"),
               ("log_py", "log p(y|x)"), ("wall_time_s", "time [s]")]
    text = table(summary, columns)
    if summary:
        print()
        print(text)
    target = {}
    if "lo" in args.regimes:
        lo = [r for r in summary if r["regime"] == "lo" and "w1_ratio" in r
              and r["method"] in ("MMPS", "SDA", "DPS")]
        if lo:
            best = min(lo, key=lambda r: r["w1_ratio"])
            mmps = [r["w1_ratio"] for r in lo if r["method"] == "MMPS"]
            target = {"lo_best_w1_ratio": best["w1_ratio"], "lo_best_method": best["method"],
                      "lo_best_steps": best["steps"], "lo_best_C": best["C"],
                      "lo_mmps_best_w1_ratio": min(mmps) if mmps else None,
                      "threshold": 1.25, "met": best["w1_ratio"] <= 1.25}
            print(f"\ntarget 'lo': W1 <= 1.25x floor: best {best['w1_ratio']:.3f}x "
                  f"({best['method']}, {best['steps']} steps, C = {best['C']}) -> "
                  f"{'met' if target['met'] else 'missed'}")
    payload = {
        "experiment": "lorenz", "machine": info, "settings": vars(args),
        "window_prior": prior_info, "prior_check": prior_check, "references": references,
        "rows": rows,
        "summary": summary, "target": target, "table": text, "figures": figures,
        "notes": "W1 in physical units; joint = exact assignment over whole trajectories "
                 "(SDA's emd), floor = W1 between two independent particle-smoother runs with "
                 "the same number of samples; marginal = mean 1-D W1 over the 65 x 3 "
                 "marginals, in units of its own floor.",
    }
    path = write_json("assimilation_lorenz" + ("_quick" if args.quick else "")
                      + (f"_{args.tag}" if args.tag else ""), payload)
    print(f"wrote {path} and {len(figures)} figures")
    return payload


# --------------------------------------------------------------------------------------------
# Kolmogorov (benchmarks/assimilation_kolmogorov.py)


def kolmogorov(extra: list[str]) -> dict[str, Any]:
    """Runs the Kolmogorov-flow experiment of ``benchmarks/assimilation_kolmogorov.py``."""
    import assimilation_kolmogorov

    return assimilation_kolmogorov.main(extra)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    out: dict[str, Any] = {}
    if args.experiment in ("lorenz", "all"):
        out["lorenz"] = lorenz(args)
    if args.experiment in ("kolmogorov", "all"):
        out["kolmogorov"] = kolmogorov(extra + (["--quick"] if args.quick else []))
    return out


if __name__ == "__main__":
    main()
