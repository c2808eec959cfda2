r"""Kolmogorov-flow data assimilation (SDA, Rozet & Louppe 2023), scaled down for a CPU.

Three stages, each cached under ``results/kolmogorov/`` (``--fresh`` redoes them):

1. **data**: :class:`plausible.tasks.KolmogorovFlow` (Re = 1000, k_f = 4, drag 0.1, states
   0.2 apart, simulated at 128^2 and average-pooled to 64^2) gives training trajectories and
   held-out test trajectories (another seed), after a burn-in.
2. **train**: a window prior over ``2k + 1 = 5`` consecutive states (standardised vorticity,
   the 5 states flattened into the channels of a 64 x 64 field), a ``plausible.nets.UNet``
   with circular padding, trained by ``plausible.fit``.
3. **assimilate**: the prior composed into a trajectory prior
   (``plausible.TrajectoryDenoiser(window, order=2, length=L)``) and the SDA tasks: every 4th
   state observed through ``plausible.ops.Coarsen(8)`` and, separately, every state through
   ``plausible.ops.Subsample(f)``, f = 2, 4, 8, all with sigma_y = 0.1 (standardised units).
   MMPS and DPS posterior samples; the metric is the standard deviation of the residuals
   ``A(x) - y`` over the observed entries, to compare with sigma_y (SDA: 0.110 for
   sigma_y = 0.1, DPS 0.857). Target: within 5 % of sigma_y on every task.

Prints a table and writes ``results/assimilation_kolmogorov.json`` and figures
``results/assimilation_kolmogorov_<task>.png`` (truth / observation / posterior samples of the
first test trajectory; ``--name`` changes the prefix).

Run: ``nice -n 10 python benchmarks/assimilation_kolmogorov.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plausible  # noqa: E402
from _common import RESULTS, fmt, setup, table, write_json  # noqa: E402
from plausible.tasks.kolmogorov import KolmogorovFlow  # noqa: E402

__all__ = ["main", "parser", "run_kolmogorov", "simulate", "train", "assimilate"]

FOLDER = RESULTS / "kolmogorov"
ORDER = 2  # k: windows of 2k + 1 = 5 states


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("data", "train", "assimilate", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="a tiny smoke configuration")
    p.add_argument("--fresh", action="store_true", help="redo cached stages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    # data
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--coarsen", type=int, default=2)
    p.add_argument("--train-trajectories", type=int, default=32)
    p.add_argument("--train-length", type=int, default=64)
    p.add_argument("--burn-in", type=int, default=48)
    p.add_argument("--test-trajectories", type=int, default=4)
    p.add_argument("--length", type=int, default=9, help="assimilated trajectory length L")
    # training
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    # assimilation
    p.add_argument("--samples", type=int, default=2, help="posterior samples per trajectory")
    p.add_argument("--sampling-steps", type=int, default=64)
    p.add_argument("--maxiter", type=int, default=3, help="MMPS GMRES iterations")
    p.add_argument("--sampler", default="ddpm", help="plausible.sample's sampler")
    p.add_argument("--tau", type=float, default=0.5, help="Langevin factor of 'pc' (SDA: 0.5)")
    p.add_argument("--grid", default="logsnr", help="time grid of the sampler")
    p.add_argument("--zetas", type=float, nargs="+", default=[3.0, 10.0],
                   help="DPS guidance scales (Chung's normalised step); one row each")
    p.add_argument("--truths", type=int, default=3, help="test trajectories assimilated")
    p.add_argument("--first", type=int, default=0, help="index of the first of them")
    p.add_argument("--name", default="assimilation_kolmogorov",
                   help="results/<name>.json and the figures' prefix")
    p.add_argument("--tasks", nargs="+", default=["coarsen8", "subsample2", "subsample4",
                                                   "subsample8"])
    p.add_argument("--methods", nargs="+", default=["mmps", "dps"])
    return p


def _quick(args: argparse.Namespace) -> None:
    args.resolution, args.coarsen = 64, 1
    args.train_trajectories, args.train_length, args.burn_in = 8, 16, 8
    args.test_trajectories, args.length = 1, 9
    args.steps, args.batch_size, args.channels = 20, 8, [8, 16]
    args.samples, args.sampling_steps = 1, 8


# --------------------------------------------------------------------------------------------
# 1. data


def simulate(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Simulates (or reads) the training and test trajectories ``(N, L, 1, 64, 64)``."""
    path = folder / "data.safetensors"
    if path.exists() and not args.fresh:
        meta = json.loads((folder / "data.json").read_text())
        print(f"data: cached {path} ({meta['seconds']:.0f} s when made)")
        return meta
    torch.set_flush_denormal(True)
    sim = KolmogorovFlow(args.resolution, args.coarsen)
    t0 = time.perf_counter()
    train = sim.trajectories(args.train_trajectories, args.train_length, args.burn_in,
                             generator=torch.Generator().manual_seed(args.seed))
    t_train = time.perf_counter() - t0
    test = sim.trajectories(args.test_trajectories, args.length, args.burn_in,
                            generator=torch.Generator().manual_seed(args.seed + 10_000))
    seconds = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"train": train.contiguous(), "test": test.contiguous()}, str(path))
    meta = {
        "simulator": sim.config(), "state_shape": list(sim.state_shape),
        "train_shape": list(train.shape), "test_shape": list(test.shape),
        "burn_in": args.burn_in, "seconds": seconds, "seconds_train": t_train,
        "field_states_per_second": (train.shape[0] + test.shape[0]) and
        (args.train_trajectories * (args.burn_in + args.train_length)
         + args.test_trajectories * (args.burn_in + args.length)) / seconds,
        "vorticity_mean": float(train.mean()), "vorticity_std": float(train.std()),
        "threads": torch.get_num_threads(),
    }
    (folder / "data.json").write_text(json.dumps(meta, indent=1))
    print(f"data: {tuple(train.shape)} train + {tuple(test.shape)} test in {seconds:.0f} s; "
          f"vorticity std {meta['vorticity_std']:.3f}")
    return meta


def load_data(folder: Path) -> tuple[Tensor, Tensor, float]:
    """``(train, test, std)``: standardised trajectories and the vorticity scale."""
    tensors = load_file(str(folder / "data.safetensors"))
    meta = json.loads((folder / "data.json").read_text())
    std = float(meta["vorticity_std"])
    return tensors["train"] / std, tensors["test"] / std, std


# --------------------------------------------------------------------------------------------
# 2. training


def build_window(args: argparse.Namespace, size: int) -> plausible.Denoiser:
    net = plausible.nets.UNet(
        2 * ORDER + 1, hidden_channels=tuple(args.channels), hidden_blocks=1, spatial=2,
        padding="circular",
    )
    return plausible.Denoiser(net, plausible.VPSchedule(), shape=(2 * ORDER + 1, size, size))


def train(args: argparse.Namespace, folder: Path) -> tuple[plausible.Denoiser, dict]:
    """Trains (or reads) the window prior on standardised windows of 5 states."""
    run = folder / ("prior_quick" if args.quick else "prior")
    info_path = run / "benchmark.json"
    train_set, _, _ = load_data(folder)
    size = train_set.shape[-1]
    window = build_window(args, size)
    if info_path.exists() and not args.fresh:
        info = json.loads(info_path.read_text())
        model = plausible.load(run / "final")
        window.load_state_dict(model.state_dict())
        print(f"train: cached {run} ({info['seconds']:.0f} s when trained)")
        return window, info
    data = plausible.data.Windows(train_set, 2 * ORDER + 1, flatten=True)
    t0 = time.perf_counter()
    history = plausible.fit(window, data, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, ema=0.99, seed=args.seed, checkpoint=run,
                            checkpoint_every=max(100, args.steps // 4))
    seconds = time.perf_counter() - t0
    plausible.checkpoints.save_model(window, run / "final")
    losses = history.get("loss", [])
    info = {"seconds": seconds, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "channels": list(args.channels), "windows": len(data),
            "parameters": sum(p.numel() for p in window.parameters()),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None}
    info_path.write_text(json.dumps(info, indent=1))
    print(f"train: {args.steps} steps in {seconds:.0f} s, loss {fmt(info['loss_first'])} -> "
          f"{fmt(info['loss_last_10'])}")
    return window, info


# --------------------------------------------------------------------------------------------
# 3. assimilation


def every(stride: int) -> plausible.ops.Operator:
    """Selects every ``stride``-th state of trajectories ``(B, L, *S)`` (linear)."""
    return plausible.ops.Lambda(lambda x: x[:, ::stride], linear=True)


def operator(task: str) -> plausible.ops.Operator:
    """The observation operator of a task on trajectories ``(B, L, 1, 64, 64)``."""
    if task == "coarsen8":  # SDA: every 4th state, coarsened 8x
        return plausible.ops.Compose(every(4), plausible.ops.Coarsen(8, ndim=2))
    if task.startswith("subsample"):
        return plausible.ops.Subsample(int(task.removeprefix("subsample")), ndim=2)
    raise ValueError(f"unknown task {task!r}")


def upsample(y: Tensor, task: str, length: int, size: int) -> Tensor:
    """An observation ``y`` as ``(L, 1, size, size)`` images for plots (NaN where unseen)."""
    factor = size // y.shape[-1]
    img = y.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
    if task == "coarsen8":
        full = torch.full((length, *img.shape[1:]), math.nan)
        full[::4] = img
        return full
    return img


def methods(args: argparse.Namespace) -> list[str]:
    """``"mmps"`` and one ``"dps:<zeta>"`` per DPS guidance scale."""
    out = []
    for m in args.methods:
        out += [f"dps:{z:g}" for z in args.zetas] if m == "dps" else [m]
    return out


def posterior(method: str, prior: plausible.Denoiser, obs: plausible.Observation,
              args: argparse.Namespace) -> plausible.Denoiser:
    if method == "mmps":
        return plausible.MMPS(prior, obs, maxiter=args.maxiter)
    if method.startswith("dps:"):
        return plausible.DPS(prior, obs, zeta=float(method[4:]), normalize=True)
    raise ValueError(f"unknown method {method!r}")


def assimilate(args: argparse.Namespace, folder: Path, window: plausible.Denoiser,
               data: dict, training: dict, info: dict) -> dict[str, Any]:
    """Posterior samples for each task and method; residual standard deviations."""
    _, test, std = load_data(folder)
    L, size = args.length, test.shape[-1]
    test = test[args.first: args.first + args.truths, :L]
    window.eval().requires_grad_(False)
    prior = plausible.TrajectoryDenoiser(window, order=ORDER, length=L,
                                         state_shape=(1, size, size))
    sigma_y = 0.1
    rows, figures = [], {}
    for task in args.tasks:
        A = operator(task)
        gen = torch.Generator().manual_seed(args.seed + 1)
        ys = [plausible.Observation.simulate(x, A, sigma_y, generator=gen) for x in test]
        plots = {"truth": test[0, :, 0], "observation": upsample(ys[0], task, L, size)[:, 0]}
        for method in methods(args):
            residuals, seconds, vjps = [], 0.0, 0
            for i, y in enumerate(ys):
                obs = plausible.Observation(y, A=A, noise=sigma_y)
                post = posterior(method, prior, obs, args)
                t0 = time.perf_counter()
                samples = plausible.sample(post, args.samples, steps=args.sampling_steps,
                                           sampler=args.sampler, grid=args.grid, tau=args.tau,
                                           seed=args.seed + 100 + i, progress=False)
                seconds += time.perf_counter() - t0
                vjps += post.stats["vjps"]
                residuals.append((A(samples) - y).flatten(1))
                if i == 0 and (method == "mmps" or method == f"dps:{args.zetas[0]:g}"):
                    plots[method] = samples[:, :, 0]
            r = torch.cat(residuals)
            finite = bool(torch.isfinite(r).all())
            res_std = float(r.std()) if finite else math.nan
            row = {"task": task, "method": method, "sigma_y": sigma_y,
                   "residual_std": res_std, "residual_mean": float(r.mean()),
                   "ratio": res_std / sigma_y,
                   "within_5pct": bool(finite and abs(res_std / sigma_y - 1) <= 0.05),
                   "observed_per_trajectory": int(r.shape[1]),
                   "samples": int(r.shape[0]), "seconds": seconds,
                   "vjps_per_sample": vjps / r.shape[0]}
            rows.append(row)
            print(f"{task:>10} {method:>5}: residual std {fmt(res_std)} (sigma_y {sigma_y}) "
                  f"in {seconds:.0f} s", flush=True)
        figures[task] = _plot(f"{args.name}_{task}" + ("_quick" if args.quick else ""),
                              plots, L)
    columns = [("task", "task"), ("method", "method"), ("residual_std", "std(A(x) - y)"),
               ("ratio", "/ sigma_y"), ("within_5pct", "within 5 %"),
               ("observed_per_trajectory", "observed / traj."), ("samples", "samples"),
               ("seconds", "time (s)")]
    text = table(rows, columns)
    print(text)
    mmps = [r for r in rows if r["method"] == "mmps"]
    for task in args.tasks:  # the best DPS scale per task, by |std / sigma_y - 1|
        dps = [r for r in rows if r["task"] == task and r["method"].startswith("dps")]
        if dps:
            best = min(dps, key=lambda r: abs(r["ratio"] - 1) if math.isfinite(r["ratio"])
                       else math.inf)
            best["best_dps"] = True
    payload = {
        "machine": info, "data": data, "training": training,
        "settings": {"length": L, "order": ORDER, "samples_per_truth": args.samples,
                     "truths": int(test.shape[0]), "first_truth": args.first,
                     "sampler": args.sampler, "grid": args.grid, "tau": args.tau,
                     "sampling_steps": args.sampling_steps, "mmps_maxiter": args.maxiter,
                     "dps_zetas": args.zetas, "dps_normalize": True, "sigma_y": sigma_y,
                     "vorticity_std": std,
                     "units": "standardised vorticity (divided by vorticity_std)"},
        "rows": rows, "table": text, "figures": figures,
        "target": "MMPS residual std within 5 % of sigma_y on every task",
        "target_met": bool(mmps) and all(r["within_5pct"] for r in mmps),
    }
    write_json(args.name + ("_quick" if args.quick else ""), payload)
    return payload


def _plot(name: str, plots: dict[str, Tensor], L: int) -> str:
    """Truth / observation / posterior samples of the first test trajectory, one row each."""
    images, titles = [], []
    for label, fields in plots.items():
        fields = fields.reshape(-1, *fields.shape[-2:])
        images.append(fields)
        titles += [f"{label} t={i % L}" if i % L == 0 else "" for i in range(fields.shape[0])]
    grid = torch.cat(images)[:, None]
    path = RESULTS / f"{name}.png"
    vmax = float(plots["truth"].abs().max())
    fig = plausible.plots.image_grid(grid, nrow=L, path=path, titles=titles, vmin=-vmax,
                                     vmax=vmax, cmap="RdBu_r")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path.relative_to(RESULTS.parent))

# --------------------------------------------------------------------------------------------


def run_kolmogorov(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the stages selected by ``args.stage``; returns the JSON payload (or {})."""
    if args.quick:
        _quick(args)
    info = setup(args.threads, args.seed)
    folder = FOLDER / "quick" if args.quick else FOLDER
    data = simulate(args, folder)
    if args.stage == "data":
        return {"data": data}
    window, training = train(args, folder)
    if args.stage == "train":
        return {"data": data, "training": training}
    return assimilate(args, folder, window, data, training, info)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_kolmogorov(parser().parse_args(argv))


if __name__ == "__main__":
    main()
