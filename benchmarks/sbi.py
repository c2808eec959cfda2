"""Amortized posteriors on the sbi benchmark: plausible's ConditionalDenoiser vs the peer
``sbi`` (NPSE and NPE at their defaults), side by side in one run.

For each task and simulation budget, every method trains on the same simulations (one seed),
then draws 10,000 samples for each reference observation; the metric is sbibm's C2ST
(``plausible.diagnostics.c2st``, MLP classifier, 5 folds) against sbibm's 10,000 reference
samples (0.5 is perfect). Wall times of training and sampling are measured in the same
process, one torch thread each.

    python benchmarks/sbi.py                               # the subset reported in BENCHMARKS.md
    python benchmarks/sbi.py --tasks two_moons gaussian_linear slcp gaussian_mixture \\
        gaussian_linear_uniform bernoulli_glm sir lotka_volterra \\
        --budgets 1000 10000 100000 --observations 1 2 3 4 5 6 7 8 9 10     # the full run

Needs the sbibm 1.1.0 wheel (``pip download --no-deps sbibm==1.1.0 -d
~/.cache/plausible/sbibm``) and, for the peers, ``pip install sbi==0.27.0``. Results go to
``results/sbi.json`` (rewritten after every cell, so an interrupted run keeps what it
measured) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import plausible  # noqa: E402
from _common import setup, table, write_json  # noqa: E402
from plausible.amortized import ConditionalDenoiser, network_width, training_steps  # noqa: E402
from plausible.diagnostics import c2st  # noqa: E402
from plausible.tasks.sbi import get_task  # noqa: E402

METHODS = ("plausible", "sbi-npse", "sbi-npe")
#: plausible's early stopping: 10 % of the simulations held out, validated every
#: ``VALIDATE_EVERY`` steps, stop after ``PATIENCE`` validations without improvement (sbi's
#: default is the same 10 % split and 20 epochs).
HOLD_OUT, VALIDATE_EVERY, PATIENCE = 0.1, 50, 10


def plausible_steps(budget: int) -> int:
    """Upper bound on the training steps of plausible's NPSE (batch 256), early stopping
    deciding: ``STEP_FACTOR`` times the old bound 2000 + 2000 log10(budget / 1000) (2000 /
    4000 / 6000 for 10^3 / 10^4 / 10^5 simulations; what the tables before the fourth session
    used); ``--max-steps default`` uses plausible's default bound
    ``plausible.amortized.training_steps`` (2000 / 20000 / 38000)."""
    if STEP_FACTOR is None:
        return training_steps(budget)
    return int(STEP_FACTOR * (2000 + 2000 * max(0.0, math.log10(budget / 1000))))


STEP_FACTOR: float | None = None  # None: plausible's default bound
DECAY = "cosine"  # plausible's learning-rate decay (--decay)
LOG_RHO: tuple[float, float] | None = None  # plausible's log-normal noise levels (--log-rho)
BASELINE: bool | str = "auto"  # plausible's linear-Gaussian preconditioning (--baseline)
SUPPORT = "auto"  # how plausible keeps samples in a box prior (--support)
HIDDEN: int | None = None  # plausible's ResMLP width (--hidden; None: network_width(budget))
BATCH_SIZE: int | None = None  # plausible's batch size (--batch-size; None: the default)
DEFAULT_SAMPLER = "ddpm128log"  # plausible's default (AmortizedPosterior.sample): row "plausible"

#: plausible's samplers (one trained model, several rows): name -> schedule -> options.
SAMPLERS: dict[str, Any] = {
    # the rows "plausible" of the tables before the seventh session: a uniform time grid
    "ddpm128": lambda schedule: {"steps": 128, "sampler": "ddpm", "grid": "uniform"},
    # the library's default since the seventh session (the rows "plausible" from then on)
    "ddpm128log": lambda schedule: {"steps": 128, "sampler": "ddpm", "grid": "logsnr"},
    # DDPM with Tweedie's covariance added to each step (exact on Gaussian posteriors; D + 1
    # evaluations a step)
    "ddpm-cov32": lambda schedule: {"steps": 32, "sampler": "ddpm-cov", "grid": "logsnr"},
    "ddpm-cov64": lambda schedule: {"steps": 64, "sampler": "ddpm-cov", "grid": "logsnr"},
    "dpm++32": lambda schedule: {"steps": 32, "sampler": "dpm++", "grid": "logsnr"},
    "unipc16": lambda schedule: {"steps": 16, "sampler": "unipc",
                                 "grid": plausible.time_grid(16, "logsnr", schedule, power=1.2)},
}


def whitened_moments(reference: torch.Tensor, samples: torch.Tensor) -> dict[str, float]:
    r"""First two moments of ``samples`` ``(N, D)`` against the ``reference`` ``(M, D)``, in
    the reference's whitened coordinates :math:`u = L^{-1}(\theta - m)` (:math:`L L^\top` the
    reference covariance): ``mean_error`` = :math:`\|L^{-1}(\bar\theta - m)\|` (the mean error
    in reference standard deviations; about :math:`\sqrt{D / N}` for exact samples) and the
    smallest, mean and largest eigenvalues of the whitened sample covariance (1 for exact
    samples; below 1: under-dispersed). Cheaper than a C2ST and says *what* is wrong."""
    ref, x = reference.double(), samples.double()
    chol = torch.linalg.cholesky(torch.cov(ref.T).reshape(ref.shape[1], ref.shape[1]))
    error = torch.linalg.solve_triangular(chol, (x.mean(0) - ref.mean(0))[:, None], upper=False)
    half = torch.linalg.solve_triangular(chol, torch.cov(x.T).reshape(chol.shape), upper=False)
    eig = torch.linalg.eigvalsh(torch.linalg.solve_triangular(chol, half.T, upper=False))
    return {"mean_error": float(error.norm()), "cov_eig_min": float(eig.min()),
            "cov_eig_mean": float(eig.mean()), "cov_eig_max": float(eig.max())}


def simulate(task: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` finite pairs ``(theta, y)`` (rows with a failed simulation are redrawn)."""
    g = torch.Generator().manual_seed(seed)
    thetas, ys, have = [], [], 0
    while have < n:
        theta = task.prior.sample(n - have, g)
        y = task.simulator(theta, g)
        ok = torch.isfinite(y).all(1)
        thetas.append(theta[ok])
        ys.append(y[ok])
        have += int(ok.sum())
    return torch.cat(thetas).float(), torch.cat(ys).float()


def sbi_prior(task: Any) -> Any:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    from sbi.utils import BoxUniform

    p = task.prior
    if type(p).__name__ == "UniformPrior":
        return BoxUniform(p.low.float(), p.high.float())
    if type(p).__name__ == "GaussianPrior":
        return torch.distributions.MultivariateNormal(p.loc.float(),
                                                      covariance_matrix=p.cov.float())
    if type(p).__name__ == "LogNormalPrior":
        return torch.distributions.Independent(torch.distributions.LogNormal(p.loc, p.scale), 1)
    raise TypeError(f"no sbi prior for {type(p).__name__}")


def _import_sbi() -> tuple[Any, Any, Any]:
    """The peer's classes (imported once, before any timing: the first import of sbi costs
    about 1.6 CPU s, which the first timed training would otherwise pay)."""
    # this file is named sbi.py: its folder must not shadow the peer package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    from sbi.inference import NPE, NPSE
    from torch.utils.tensorboard import SummaryWriter

    return NPE, NPSE, SummaryWriter


def _warm_imports(methods: list[str]) -> None:
    """Imports what the first timed training of each method would otherwise import inside its
    timing: torch's optimizers import ``torch._dynamo`` on first use (about 1.1 CPU s), and the
    peer package (about 1.6 CPU s)."""
    import torch._dynamo  # noqa: F401

    if any(m.startswith("sbi") for m in methods):
        _import_sbi()


def train(method: str, task: Any, theta: torch.Tensor, y: torch.Tensor, budget: int,
          seed: int) -> tuple[Any, dict[str, Any]]:
    """Trains ``method``; returns a sampler ``(y_obs, n) -> (n, D)`` and its settings."""
    torch.manual_seed(seed)
    if method == "plausible":
        npe = ConditionalDenoiser.mlp(task.dim_theta, task.dim_y, prior=task.prior,
                                      baseline=BASELINE, support=SUPPORT,
                                      hidden=HIDDEN or network_width(budget))
        steps = plausible_steps(budget)
        batch_size = BATCH_SIZE or 256
        npe.standardize_from(theta, y)
        history = plausible.fit(npe, (theta, y), steps=steps, batch_size=batch_size,
                                progress=False, decay=DECAY,
                                validation=HOLD_OUT if PATIENCE else None,
                                validate_every=VALIDATE_EVERY, log_every=VALIDATE_EVERY,
                                patience=PATIENCE or None,
                                **({"log_rho": LOG_RHO} if LOG_RHO is not None else {}))
        stopped = int(history["stopped"][0]) if "stopped" in history else steps

        def draw(y_obs: torch.Tensor, n: int, sampler: str = DEFAULT_SAMPLER) -> torch.Tensor:
            return npe.given(y_obs).sample(n, seed=seed, progress=False,
                                           **SAMPLERS[sampler](npe.schedule))

        net = npe.backbone.config
        settings = {"net": f"ResMLP {net['hidden']}x{net['blocks']}, "
                           f"MLP embedding -> {net['context']}", "steps": steps,
                    "steps_run": stopped, "hold_out": HOLD_OUT if PATIENCE else 0,
                    "patience": PATIENCE, "validate_every": VALIDATE_EVERY,
                    "batch_size": batch_size, "lr": 1e-3, "t_distribution": "lognormal",
                    "decay": DECAY, "baseline": npe.baseline, "support": npe.support,
                    "expected_acceptance": npe.expected_acceptance,
                    "log_rho": list(LOG_RHO) if LOG_RHO is not None else "default",
                    "samplers": {k: str(v(npe.schedule)) for k, v in SAMPLERS.items()},
                    "parameters": sum(p.numel() for p in npe.parameters())}
        return draw, settings
    import tempfile

    NPE, NPSE, SummaryWriter = _import_sbi()
    prior = sbi_prior(task)
    # sbi logs to ./sbi-logs by default: keep the repository clean
    writer = SummaryWriter(log_dir=tempfile.mkdtemp(prefix="sbi-logs-"))
    if method == "sbi-npse":
        inference = NPSE(prior=prior, show_progress_bars=False, summary_writer=writer)
    elif method == "sbi-npe":
        inference = NPE(prior=prior, show_progress_bars=False, summary_writer=writer)
    else:
        raise ValueError(method)
    estimator = inference.append_simulations(theta, y).train()
    posterior = inference.build_posterior()
    epochs = inference.summary.get("epochs_trained", [None])[-1] if hasattr(
        inference, "summary") else None

    def draw_sbi(y_obs: torch.Tensor, n: int) -> torch.Tensor:
        return posterior.sample((n,), x=y_obs[None], show_progress_bars=False)

    settings = {"defaults": True, "epochs": epochs,
                "parameters": sum(p.numel() for p in estimator.parameters())}
    return draw_sbi, settings


def main(argv: list[str] | None = None) -> int:
    global PATIENCE, STEP_FACTOR, DECAY, BASELINE, LOG_RHO, SUPPORT, HIDDEN, BATCH_SIZE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons", "gaussian_linear", "slcp"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--observations", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="sbi", help="results/<out>.json")
    parser.add_argument("--classifier", default="mlp", choices=("mlp", "rf", "none"),
                        help="C2ST classifier: sbibm's MLP (default; slow, up to ~40 CPU min "
                             "per observation when the two sets are close in 10-D) or a "
                             "random forest (fast, NOT sbibm's figure), or none (only the whitened "
                             "moments: mean error and covariance eigenvalues)")
    parser.add_argument("--plausible-samplers", nargs="+", default=[DEFAULT_SAMPLER],
                        choices=sorted(SAMPLERS),
                        help="samplers of plausible's model (one training, a row each)")
    parser.add_argument("--patience", type=int, default=PATIENCE,
                        help="plausible's early stopping, in validations of every "
                             f"{VALIDATE_EVERY} steps on {HOLD_OUT * 100:.0f}%% held out (0: off)")
    parser.add_argument("--max-steps", default="default",
                        help="plausible's step bound (early stopping decides): 'default' "
                             "(plausible.amortized.training_steps: 2000 / 20000 for 10^3 / "
                             "10^4), or a factor of the bound of the earlier tables, 2000 + "
                             "2000 log10(N / 1000) (e.g. 1 for those tables, 5 = 20000 at 10^4)")
    parser.add_argument("--log-rho", nargs=2, type=float, metavar=("MEAN", "STD"),
                        help="plausible's training noise levels: log(sigma/alpha) ~ N(MEAN, "
                             "STD^2) (default: the ConditionalDenoiser's)")
    parser.add_argument("--baseline", default="auto", choices=("auto", "on", "off"),
                        help="plausible's ConditionalDenoiser(baseline=...): a linear-Gaussian "
                             "posterior fitted to the simulations as the denoiser's "
                             "preconditioning; auto (the default): on for unbounded theta")
    parser.add_argument("--support", default="auto", choices=("auto", "reject", "bijection"),
                        help="plausible's ConditionalDenoiser(support=...) for box priors: "
                             "rejection of samples outside the box, the logit, or auto (the "
                             "default: rejection where the baseline's expected acceptance is "
                             ">= 0.9)")
    parser.add_argument("--decay", default="default", choices=("default", "cosine", "plateau"),
                        help="plausible's learning-rate decay: cosine over the step bound, or "
                             "halved on validation plateaus (needs --patience > 0); default: "
                             "as `plausible sbi train` (plateau with early stopping, else "
                             "cosine)")
    parser.add_argument("--hidden", type=int, default=None,
                        help="plausible's ResMLP width (default: "
                             "plausible.amortized.network_width: 64 below 3000 simulations, "
                             "else 128)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="plausible's training batch size (default: 256)")
    args = parser.parse_args(argv)
    PATIENCE = args.patience
    HIDDEN, BATCH_SIZE = args.hidden, args.batch_size
    LOG_RHO = tuple(args.log_rho) if args.log_rho else None
    BASELINE = {"auto": "auto", "on": True, "off": False}[args.baseline]
    SUPPORT = args.support
    DECAY = args.decay if args.decay != "default" else ("plateau" if PATIENCE else "cosine")
    STEP_FACTOR = None if args.max_steps == "default" else float(args.max_steps)

    info = setup(args.threads, args.seed)
    try:
        from importlib.metadata import version

        info["sbi"] = version("sbi")
    except ImportError:
        info["sbi"] = None
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "benchmark": "sbi", "machine": info, "args": vars(args), "rows": rows,
        "classifier": args.classifier,
        "note": "2-core machine shared with other jobs: wall times are noisy; compare ratios "
                "within one task and budget",
    }
    _warm_imports(args.methods)
    start = time.perf_counter()
    for name in args.tasks:
        task = get_task(name)
        refs = {i: task.reference_samples(i) for i in args.observations}
        obs = {i: task.observation(i) for i in args.observations}
        for budget in args.budgets:
            theta, y = simulate(task, budget, seed=args.seed + budget)
            jobs = [(m, s) for m in args.methods
                    for s in (args.plausible_samplers if m == "plausible" else [None])]
            trained: dict[str, Any] = {}
            for method, sampler in jobs:
                label = method if sampler in (None, DEFAULT_SAMPLER) else f"{method} ({sampler})"
                row: dict[str, Any] = {"task": name, "budget": budget, "method": label}
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    if method not in trained:  # plausible's samplers share one training
                        trained[method] = (*train(method, task, theta, y, budget, args.seed),
                                           time.perf_counter() - t0, time.process_time() - c0)
                    draw, settings, row["train_s"], row["train_cpu_s"] = trained[method]
                    row["settings"] = settings
                    row["c2st"], row["sample_s"], row["sample_cpu_s"] = {}, {}, {}
                    row["moments"] = {}
                    for i in args.observations:
                        t0, c0 = time.perf_counter(), time.process_time()
                        s = (draw(obs[i], args.samples, sampler) if sampler else
                             draw(obs[i], args.samples)).detach().float()
                        row["sample_s"][i] = time.perf_counter() - t0
                        row["sample_cpu_s"][i] = time.process_time() - c0
                        row["moments"][i] = m = whitened_moments(refs[i], s)
                        if args.classifier != "none":
                            row["c2st"][i] = c2st(refs[i][: args.samples], s,
                                                  classifier=args.classifier)
                        print(f"{name} {budget} {label} obs {i}: c2st "
                              f"{row['c2st'].get(i, float('nan')):.3f}, mean error "
                              f"{m['mean_error']:.3f} sd, covariance eigenvalues "
                              f"{m['cov_eig_min']:.3f} / {m['cov_eig_mean']:.3f} / "
                              f"{m['cov_eig_max']:.3f} "
                              f"(train {row['train_s']:.0f}s wall / {row['train_cpu_s']:.0f}s "
                              f"CPU, sample {row['sample_s'][i]:.1f}s wall / "
                              f"{row['sample_cpu_s'][i]:.1f}s CPU)", flush=True)
                except Exception as error:  # noqa: BLE001 - recorded and reported
                    row["error"] = f"{type(error).__name__}: {error}"
                    traceback.print_exc()
                rows.append(row)
                payload["elapsed_s"] = time.perf_counter() - start
                write_json(args.out, payload)
    summary = []
    for r in rows:
        c = list(r.get("c2st", {}).values())
        s = list(r.get("sample_s", {}).values())
        mo = list(r.get("moments", {}).values())
        summary.append({
            "task": r["task"], "budget": r["budget"], "method": r["method"],
            "c2st": sum(c) / len(c) if c else None,
            "per_obs": " ".join(f"{v:.3f}" for v in c) if c else r.get("error", "-")[:40],
            "train_s": r.get("train_s"),
            "train_cpu_s": r.get("train_cpu_s"),
            "sample_s": sum(s) / len(s) if s else None,
            "sample_cpu_s": (sum(r["sample_cpu_s"].values()) / len(s)) if s else None,
            "mean_error": sum(m["mean_error"] for m in mo) / len(mo) if mo else None,
            "cov_eig": (f"{min(m['cov_eig_min'] for m in mo):.2f} / "
                        f"{sum(m['cov_eig_mean'] for m in mo) / len(mo):.3f} / "
                        f"{max(m['cov_eig_max'] for m in mo):.2f}") if mo else "-",
        })
    payload["summary"] = summary
    write_json(args.out, payload)
    print(table(summary, [("task", "task"), ("budget", "simulations"), ("method", "method"),
                          ("c2st", "C2ST (mean)"), ("per_obs", "C2ST per observation"),
                          ("train_cpu_s", "train CPU s"), ("train_s", "train wall s"),
                          ("sample_cpu_s", f"sample CPU s / {args.samples}"),
                          ("sample_s", "sample wall s"),
                          ("mean_error", "mean error (sd)"),
                          ("cov_eig", "whitened cov. eigenvalues min / mean / max")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
