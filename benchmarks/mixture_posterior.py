"""Benchmark 2: zero-shot posterior sampling with a Gaussian-mixture prior, where MMPS is not
exact, against the exact mixture posterior (plausible vs azula).

Prior: 8 components in 16-D (random means, covariances and weights), whose exact denoiser is
``plausible.GaussianMixtureDenoiser`` (azula gets the same exact denoiser through an adapter and
the same VP schedule). Observation: a random 2x16 (``proj2``, multimodal posterior) or 4x16
(``proj4``) projection with noise std 0.3. The exact posterior (``prior.condition``) is a
mixture in closed form.

Methods, each at a budget of 32 / 64 / 128 / 256 denoiser evaluations (one evaluation = one
call of the guided denoiser), on ``N`` samples:

* plausible ``MMPS`` (GMRES, tol 1e-6: the exact solve) with its default sampler (since the
  fifth session: ``pc`` with the ancestral DDPM predictor and 1 Langevin correction of tau
  0.25 per step, ``steps = budget // 2``), with ``ddpm`` (the default before), and with ``pc``
  (DDIM predictor + 1, 2 or 4 Langevin corrections per step, ``steps = budget // (1 +
  corrections)``);
* plausible ``DPS`` (zeta tuned on a grid by sliced Wasserstein at 128 evaluations, on other
  random draws) and ``SDA`` (gamma = 1e-2), with ``ddpm``;
* azula ``MMPSDenoiser`` (GMRES, k = M iterations: the exact solve) with ``DDPMSampler``, and
  azula ``DPSSampler`` (zeta tuned the same way).

Distances to exact posterior samples (the ``exact`` row: an independent exact sample set of the
same size, i.e. the Monte-Carlo floor): sliced Wasserstein-1 (128 random directions), C2ST
accuracy (5-fold, a 2-hidden-layer MLP classifier written in torch; 0.5 = indistinguishable),
and the total variation between the mode weights and the exact posterior weights: ``TV
(argmax)`` assigns each sample to its most responsible posterior component, ``TV (soft)``
averages the responsibilities (unbiased for exact samples). Each configuration is repeated
with ``--repeats`` seeds; tables show the mean (and the standard deviation over repeats).

A second table sweeps the Langevin corrections (0, 1, 2, 4, 8) at a fixed number of predictor
steps, with the DDIM (``pc``) and the ancestral (``pc-ddpm``) predictor, to see whether MMPS
converges toward the exact posterior as corrections are added.

Run ``python benchmarks/mixture_posterior.py`` (``--quick`` for a smaller configuration).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    AzulaCounter,
    azula_sample,
    azula_wrap,
    c2st,
    setup,
    sliced_wasserstein,
    table,
    timed,
    write_json,
)
from plausible import (  # noqa: E402
    DPS,
    MMPS,
    SDA,
    GaussianMixtureDenoiser,
    Observation,
    ops,
    sample,
)
from plausible.sampling import evaluations  # noqa: E402

F64 = torch.float64
SIGMA_Y = 0.3


def make_problem(M: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    K, D = 8, 16
    means = 2.0 * torch.randn(K, D, generator=g, dtype=F64)
    covs = []
    for _ in range(K):
        L = torch.randn(D, D, generator=g, dtype=F64)
        covs.append(0.5 * L @ L.T / D + 0.1 * torch.eye(D, dtype=F64))
    weights = torch.rand(K, generator=g, dtype=F64) + 0.5
    prior = GaussianMixtureDenoiser(weights, means, torch.stack(covs))
    A = torch.randn(M, D, generator=g, dtype=F64) / math.sqrt(D)
    x_true = prior.sample(1, generator=g)[0]
    y = A @ x_true + SIGMA_Y * torch.randn(M, generator=g, dtype=F64)
    exact = prior.condition(A, y, SIGMA_Y**2)
    obs = Observation(y, ops.Matrix(A), noise=SIGMA_Y)
    return {"name": f"proj{M}", "M": M, "D": D, "K": K, "prior": prior, "A": A, "y": y,
            "obs": obs, "exact": exact}


def mode_tv(x: Tensor, exact: GaussianMixtureDenoiser) -> tuple[float, float]:
    """TV between mode weights and the exact posterior weights: (argmax, soft)."""
    x = x[torch.isfinite(x).all(1)]
    if len(x) == 0:
        return math.nan, math.nan
    r = exact.responsibilities(x.to(F64), 0.0)
    w = exact.weights
    hard = torch.bincount(r.argmax(1), minlength=len(w)).to(F64) / len(x)
    soft = r.mean(0)
    return float(0.5 * (hard - w).abs().sum()), float(0.5 * (soft - w).abs().sum())


def distances(x: Tensor, ref: Tensor, exact: GaussianMixtureDenoiser, seed: int,
              classifier: str) -> dict[str, float]:
    nan = int((~torch.isfinite(x).all(1)).sum())
    xf = x[torch.isfinite(x).all(1)].to(F64)
    if len(xf) < 10:
        return {"sw": math.nan, "c2st": math.nan, "tv_hard": math.nan, "tv_soft": math.nan,
                "nan": nan}
    tv_hard, tv_soft = mode_tv(xf, exact)
    return {"sw": sliced_wasserstein(xf, ref, 128, seed=seed),
            "c2st": c2st(xf, ref, folds=5, seed=seed, classifier=classifier),
            "tv_hard": tv_hard, "tv_soft": tv_soft, "nan": nan}


# --------------------------------------------------------------------------------------------
# Samplers of every method, all returning (samples (N, D), guided evaluations)
# --------------------------------------------------------------------------------------------


#: plausible's default posterior sampler: ``sample(MMPS(...), n, steps)`` without ``sampler``
DEFAULT = "plausible MMPS default (pc-ddpm c=1)"


def plausible_run(post: Any, n: int, steps: int, sampler: str | None, seed: int, **kw: Any
                  ) -> tuple[Tensor, int]:
    post.reset_stats()
    x = sample(post, n, steps=steps, sampler=sampler, seed=seed, dtype=F64, progress=False,
               **kw)
    return x, post.stats["calls"]


def make_methods(pb: dict[str, Any], zeta_dps: float, zeta_az: float
                 ) -> dict[str, Callable[[int, int, int], tuple[Tensor, int]]]:
    """name -> run(budget, n, seed)."""
    from azula.guidance.dps import DPSSampler
    from azula.guidance.mmps import MMPSDenoiser
    from azula.linalg.covariance import DiagonalCovariance

    prior, obs, M = pb["prior"], pb["obs"], pb["M"]
    A, y = pb["A"], pb["y"]
    az_prior = azula_wrap(prior)
    az_A = (lambda A_: lambda v: v @ A_.T.to(v.dtype))(A)
    cov_y = DiagonalCovariance(torch.full((M,), SIGMA_Y**2, dtype=F64))

    def mmps_default(budget: int, n: int, seed: int) -> tuple[Tensor, int]:
        post = MMPS(prior, obs)  # sample() without sampler=: MMPS.sampling
        steps = budget // evaluations(MMPS.sampling["sampler"], 1,
                                      MMPS.sampling.get("corrections", 1))
        return plausible_run(post, n, steps, None, seed)

    def mmps_ddpm(budget: int, n: int, seed: int) -> tuple[Tensor, int]:
        return plausible_run(MMPS(prior, obs), n, budget, "ddpm", seed)

    def mmps_pc(c: int) -> Callable[[int, int, int], tuple[Tensor, int]]:
        def run(budget: int, n: int, seed: int) -> tuple[Tensor, int]:
            return plausible_run(MMPS(prior, obs), n, budget // (1 + c), "pc", seed,
                                 corrections=c)
        return run

    def dps(budget: int, n: int, seed: int) -> tuple[Tensor, int]:
        return plausible_run(DPS(prior, obs, zeta=zeta_dps), n, budget, "ddpm", seed)

    def sda(budget: int, n: int, seed: int) -> tuple[Tensor, int]:
        return plausible_run(SDA(prior, obs, gamma=1e-2), n, budget, "ddpm", seed)

    def x_1(n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed + 31)
        return torch.randn(n, pb["D"], generator=g, dtype=F64)  # sigma_1 = 1 (VP)

    def az_mmps(budget: int, n: int, seed: int) -> tuple[Tensor, int]:
        den = AzulaCounter(MMPSDenoiser(az_prior, y, az_A, cov_y, solver="gmres",
                                        iterations=M))
        x = azula_sample("ddpm", den, x_1(n, seed), budget, seed=seed)
        return x, den.calls

    def az_dps(budget: int, n: int, seed: int) -> tuple[Tensor, int]:
        den = AzulaCounter(az_prior)
        sampler = DPSSampler(den, y=y, A=az_A, zeta=zeta_az, steps=budget, silent=True,
                             dtype=F64)
        torch.manual_seed(seed)
        x = sampler(x_1(n, seed))
        return x, den.calls

    return {
        DEFAULT: mmps_default,
        "plausible MMPS ddpm (default before)": mmps_ddpm,
        "plausible MMPS pc c=1": mmps_pc(1),
        "plausible MMPS pc c=2": mmps_pc(2),
        "plausible MMPS pc c=4": mmps_pc(4),
        f"plausible DPS ddpm zeta={zeta_dps:g}": dps,
        "plausible SDA ddpm gamma=1e-2": sda,
        "azula MMPS ddpm gmres k=M": az_mmps,
        f"azula DPS zeta={zeta_az:g}": az_dps,
    }


def tune_zeta(pb: dict[str, Any], ref: Tensor, n: int, seed: int, grid: list[float],
              log: Any) -> tuple[float, float, dict[str, Any]]:
    """zeta of plausible's DPS and azula's DPS minimising the sliced Wasserstein distance at
    128 evaluations (seed different from the evaluation seeds)."""
    out: dict[str, Any] = {"plausible": {}, "azula": {}}
    for zeta in grid:
        for lib in ("plausible", "azula"):
            methods = make_methods(pb, zeta, zeta)
            key = [k for k in methods if k.startswith(f"{lib} DPS")][0]
            try:
                x, _ = methods[key](128, n, seed)
                finite = x[torch.isfinite(x).all(1)]
                sw = sliced_wasserstein(finite, ref, 128, seed=seed) if len(finite) > 10 \
                    else math.inf
            except FloatingPointError:  # plausible raises on NaN
                sw = math.inf
            out[lib][zeta] = sw
    best_p = min(out["plausible"], key=out["plausible"].get)
    best_a = min(out["azula"], key=out["azula"].get)
    log("  DPS zeta tuning (SW at 128 evals): plausible "
        + ", ".join(f"{z:g}: {v:.3g}" for z, v in out["plausible"].items())
        + f" -> {best_p:g}; azula " + ", ".join(f"{z:g}: {v:.3g}" for z, v in out["azula"].items())
        + f" -> {best_a:g}")
    return best_p, best_a, out


def aggregate(values: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in values[0]:
        xs = [v[key] for v in values]
        finite = [x for x in xs if x is not None and math.isfinite(x)]
        out[key] = statistics.fmean(finite) if finite else math.nan
        out[key + "_std"] = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return out


def bench(pb: dict[str, Any], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    n, repeats = args.n, args.repeats
    budgets = [32, 128] if args.quick else [32, 64, 128, 256]
    exact = pb["exact"]
    log(f"\n## {pb['name']}: 8-component mixture in 16-D, A {pb['M']}x16, sigma_y {SIGMA_Y}; "
        f"exact posterior weights " + " ".join(f"{w:.2f}" for w in exact.weights.tolist()))

    def reference(r: int) -> Tensor:
        return exact.sample(n, generator=torch.Generator().manual_seed(10_000 + r))

    # Monte-Carlo floor: an independent exact sample set against the reference
    floor_runs = []
    for r in range(repeats):
        x = exact.sample(n, generator=torch.Generator().manual_seed(20_000 + r))
        floor_runs.append(distances(x, reference(r), exact, r, args.classifier))
    floor = aggregate(floor_runs)
    log(f"  exact (floor): SW {floor['sw']:.3g}, C2ST {floor['c2st']:.3g}, TV argmax "
        f"{floor['tv_hard']:.3g}, TV soft {floor['tv_soft']:.3g}")

    grid = [0.3, 1.0, 3.0, 10.0] if args.quick else [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
    zeta_p, zeta_a, tuning = tune_zeta(pb, reference(99), n, 999, grid, log)
    methods = make_methods(pb, zeta_p, zeta_a)
    if args.quick:
        methods = {k: v for k, v in methods.items() if "c=2" not in k}

    rows = [{"method": "exact samples (MC floor)", "budget": None, "evals": 0, **floor}]
    for budget in budgets:
        for name, run in methods.items():
            per, evals, seconds = [], 0, 0.0
            for r in range(repeats):
                try:
                    (x, evals), dt = timed(lambda: run(budget, n, 100 + r))
                except FloatingPointError as error:
                    log(f"  {name} @ {budget}: {error}")
                    x, dt = torch.full((n, pb["D"]), math.nan, dtype=F64), math.nan
                seconds += dt / repeats
                per.append(distances(x, reference(r), exact, r, args.classifier))
            row = {"method": name, "budget": budget, "evals": evals, "time": seconds,
                   **aggregate(per)}
            rows.append(row)
            log(f"  {name:34s} budget {budget:3d} evals {evals:3d} SW {row['sw']:.3g}"
                f"±{row['sw_std']:.2g} C2ST {row['c2st']:.3g}±{row['c2st_std']:.2g} TV "
                f"{row['tv_hard']:.3g}/{row['tv_soft']:.3g} NaN {row['nan']:.0f} "
                f"({seconds:.1f}s)")

    # corrections sweep at fixed predictor steps
    sweep = []
    steps = 32
    prior, obs = pb["prior"], pb["obs"]
    for eta, c in [(eta, c) for eta in (0.0, 1.0)
                   for c in ([0, 1, 4] if args.quick else [0, 1, 2, 4, 8])]:
        per = []
        for r in range(repeats):
            x, evals = plausible_run(MMPS(prior, obs), n, steps, "pc", 100 + r, corrections=c,
                                     eta=eta)
            per.append(distances(x, reference(r), exact, r, args.classifier))
        predictor = "pc" if eta == 0 else "pc-ddpm"
        row = {"method": f"plausible MMPS {predictor} {steps} steps c={c}", "corrections": c,
               "eta": eta, "evals": evals, **aggregate(per)}
        sweep.append(row)
        log(f"  {row['method']:34s} evals {evals:3d} SW {row['sw']:.3g}±{row['sw_std']:.2g} "
            f"C2ST {row['c2st']:.3g}±{row['c2st_std']:.2g} TV {row['tv_hard']:.3g}/"
            f"{row['tv_soft']:.3g}")

    # targets
    default = DEFAULT
    azula_mmps = "azula MMPS ddpm gmres k=M"
    cmp = []
    for budget in budgets:
        a = next(r for r in rows if r["method"] == default and r["budget"] == budget)
        b = next(r for r in rows if r["method"] == azula_mmps and r["budget"] == budget)
        best_pl = min((r for r in rows if r["budget"] == budget
                       and r["method"].startswith("plausible")), key=lambda r: r["sw"])
        cmp.append({"budget": budget, "plausible_default_sw": a["sw"],
                    "plausible_default_c2st": a["c2st"], "azula_mmps_sw": b["sw"],
                    "azula_mmps_c2st": b["c2st"],
                    "default_closer_sw": a["sw"] < b["sw"],
                    "default_closer_c2st": a["c2st"] < b["c2st"],
                    "sw_diff_in_std": (b["sw"] - a["sw"]) / max(
                        math.hypot(a["sw_std"], b["sw_std"]) / math.sqrt(repeats), 1e-12),
                    "best_plausible": best_pl["method"], "best_plausible_sw": best_pl["sw"],
                    "best_plausible_c2st": best_pl["c2st"]})
    monotone = True
    for eta in (0.0, 1.0):
        sws = [r["sw"] for r in sweep if r["eta"] == eta]
        monotone &= all(b <= a + 1e-12 for a, b in zip(sws, sws[1:]))
    return {"name": pb["name"], "M": pb["M"], "N": n, "repeats": repeats,
            "exact_weights": exact.weights.tolist(), "zeta_tuning": tuning,
            "zeta_plausible_dps": zeta_p, "zeta_azula_dps": zeta_a, "rows": rows,
            "corrections_sweep": sweep, "comparison": cmp,
            "corrections_monotone_sw": monotone}


def convergence(pb: dict[str, Any], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """MMPS's default sampler (``MMPS.sampling``) at 32 predictor steps with 1 / 8 / 32 / 128
    corrections per step: does it converge to the exact posterior as corrections are added?"""
    n, repeats, exact = args.n, args.repeats, pb["exact"]
    rows = []
    floor = aggregate([distances(exact.sample(n, generator=torch.Generator().manual_seed(
        20_000 + r)), exact.sample(n, generator=torch.Generator().manual_seed(10_000 + r)),
        exact, r, args.classifier) for r in range(repeats)])
    rows.append({"method": "exact samples (MC floor)", "corrections": None, "evals": 0,
                 **floor})
    for c in ([1, 8] if args.quick else [1, 8, 32, 128]):
        per = []
        for r in range(repeats):
            ref = exact.sample(n, generator=torch.Generator().manual_seed(10_000 + r))
            x, evals = plausible_run(MMPS(pb["prior"], pb["obs"]), n, 32, None, 100 + r,
                                     corrections=c)
            per.append(distances(x, ref, exact, r, args.classifier))
        row = {"method": f"plausible MMPS default, 32 steps c={c}", "corrections": c,
               "evals": evals, **aggregate(per)}
        rows.append(row)
        log(f"  {row['method']:34s} evals {evals:4d} SW {row['sw']:.3g}±{row['sw_std']:.2g} "
            f"C2ST {row['c2st']:.3g}±{row['c2st_std']:.2g} TV {row['tv_hard']:.3g}")
    return {"name": pb["name"], "M": pb["M"], "N": n, "repeats": repeats, "rows": rows,
            "settings": dict(MMPS.sampling)}


COLUMNS = [("method", "method"), ("budget", "budget"), ("evals", "evals"),
           ("sw", "sliced W1"), ("sw_std", "±"), ("c2st", "C2ST acc"), ("c2st_std", "±"),
           ("tv_hard", "TV modes (argmax)"), ("tv_soft", "TV modes (soft)"), ("nan", "NaN"),
           ("time", "time (s)")]


def summary(results: list[dict[str, Any]], classifier: str) -> str:
    out = []
    for res in results:
        out.append(f"\n### {res['name']} (A {res['M']}x16, N = {res['N']}, {res['repeats']} "
                   f"repeats; C2ST classifier: {classifier})\n")
        out.append("exact posterior weights: "
                   + " ".join(f"{w:.3f}" for w in res["exact_weights"]) + "\n")
        out.append(table(res["rows"], COLUMNS))
        out.append("\nCorrections sweep (MMPS + pc with the DDIM or the ancestral predictor, "
                   "32 predictor steps):\n")
        out.append(table(res["corrections_sweep"], [c for c in COLUMNS if c[0] not in (
            "budget", "time")]))
        out.append("")
        for c in res["comparison"]:
            out.append(
                f"- budget {c['budget']}: plausible default SW {c['plausible_default_sw']:.3g} "
                f"/ C2ST {c['plausible_default_c2st']:.3g} vs azula MMPS SW "
                f"{c['azula_mmps_sw']:.3g} / C2ST {c['azula_mmps_c2st']:.3g} -> default closer: "
                f"SW {'yes' if c['default_closer_sw'] else 'no'}, C2ST "
                f"{'yes' if c['default_closer_c2st'] else 'no'} (SW difference "
                f"{c['sw_diff_in_std']:.1f} standard errors); best plausible method: "
                f"{c['best_plausible']} (SW {c['best_plausible_sw']:.3g}, C2ST "
                f"{c['best_plausible_c2st']:.3g})")
        out.append(f"- SW decreases monotonically with corrections (both predictors): "
                   f"{'yes' if res['corrections_monotone_sw'] else 'no'}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller configuration")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems")
    parser.add_argument("--problems", default=None, help="comma-separated subset of proj2,proj4")
    parser.add_argument("--n", type=int, default=None, help="samples per run (default 1024)")
    parser.add_argument("--repeats", type=int, default=None, help="seeds per configuration")
    parser.add_argument("--classifier", default="mlp", choices=["mlp", "quadratic"],
                        help="C2ST classifier")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    parser.add_argument("--convergence", action="store_true",
                        help="only the default sampler with 1 / 8 / 32 / 128 corrections per "
                             "step (results/mixture_convergence.json)")
    args = parser.parse_args()
    env = setup(args.threads, args.seed)
    args.n = args.n or (512 if args.quick else 1024)
    args.repeats = args.repeats or (2 if args.quick else 3)
    names = args.problems.split(",") if args.problems else (
        ["proj2"] if args.quick else ["proj2", "proj4"])

    def log(s: str) -> None:
        print(s, flush=True)

    log(f"# mixture_posterior  (torch {env['torch']}, azula {env['azula']}, "
        f"{env['torch_threads']} thread(s), {env['processor']}); N = {args.n}, "
        f"{args.repeats} repeats, C2ST classifier {args.classifier}")
    if args.convergence:
        conv = []
        for name in names:
            log(f"\n## {name}: MMPS's default sampler, more corrections per step")
            conv.append(convergence(make_problem(int(name.removeprefix("proj")), args.seed),
                                    args, log))
        text = "\n".join(f"\n### {c['name']} (N = {c['N']}, {c['repeats']} repeats)\n\n"
                         + table(c["rows"], [("method", "method"), ("evals", "evals"),
                                             ("sw", "sliced W1"), ("sw_std", "±"),
                                             ("c2st", "C2ST acc"), ("c2st_std", "±"),
                                             ("tv_hard", "TV modes (argmax)")])
                         for c in conv)
        print(text)
        out = args.output or "mixture_convergence" + ("_quick" if args.quick else "")
        path = write_json(out, {"benchmark": "mixture_posterior --convergence", "env": env,
                                "args": vars(args), "problems": conv})
        (RESULTS / f"{out}.md").write_text("# mixture_posterior --convergence\n" + text + "\n")
        print(f"\nwrote {path}")
        return
    results = []
    for name in names:
        start = time.perf_counter()
        pb = make_problem(int(name.removeprefix("proj")), args.seed)
        res = bench(pb, args, log)
        res["wall_seconds"] = time.perf_counter() - start
        results.append(res)
        log(f"  ({name}: {res['wall_seconds']:.0f}s)")
    print("\n\n# Summary\n" + summary(results, args.classifier))
    out = args.output or ("mixture_posterior_quick" if args.quick else "mixture_posterior")
    path = RESULTS / f"{out}.json"
    previous = []
    if path.exists():
        try:
            previous = json.loads(path.read_text()).get("problems", [])
        except (json.JSONDecodeError, OSError):
            previous = []
    for res in results:
        res["args"], res["env"] = vars(args), env
    merged = sorted([r for r in previous if r.get("name") not in names] + results,
                    key=lambda r: r["name"])
    path = write_json(out, {"benchmark": "mixture_posterior", "problems": merged})
    (RESULTS / f"{out}.md").write_text("# mixture_posterior\n"
                                       + summary(merged, args.classifier) + "\n")
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
