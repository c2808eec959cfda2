"""Benchmark: asymptotically exact zero-shot posteriors, sequential Monte Carlo with MMPS twists
(plausible ``SMC``) against guided diffusion (plausible MMPS / DPS) and azula (MMPS, TDS, DPS)
on Gaussian-mixture priors whose denoiser and posterior are exact.

Problems (prior, observation and exact posterior built like ``plausible.demos.mixture_problem``:
means ``2 randn``, covariances ``L L^T + 0.05 I`` with ``L = 0.5 randn / sqrt(D)``, weights
``U(0, 1) + 0.2``, ``A`` with random unit-norm rows, ``y = A x_true + 0.3 eps``):

* ``oracle``: the mixture oracle of the issue, ``mixture_problem(seed)`` (8 components in 16-D,
  A 2x16, sigma_y 0.3), with the first seed (from 0) whose exact posterior has >= 3 modes of
  weight > 0.02;
* ``hard``: 16 components in 16-D observed through ONE random projection (A 1x16, sigma_y 0.3),
  first seed whose exact posterior has >= 6 modes of weight > 0.02 (one budget, 128, to keep
  the full run near 10 minutes on 2 cores).

Methods, at each budget of denoiser evaluations per particle / sample, 4096 samples each:
plausible ``SMC`` (one population of 4096 particles; 4 populations x 1024 at two budgets), plausible
``MMPS`` (ddpm, GMRES tol 1e-8), plausible ``DPS`` (ddpm, zeta tuned), azula ``MMPSDenoiser``
(GMRES, k = M iterations: the exact solve of the M x M system) with azula's ``DDPMSampler``,
azula ``TDSSampler`` with the diagonal Gaussian twist ``log N(y; A x_hat, sigma_y^2 I +
gamma (sigma_t / alpha_t)^2 I)`` (gamma tuned) and azula ``DPSSampler`` (zeta tuned). azula
runs on plausible's exact mixture denoiser through ``_common.azula_wrap`` (azula ``Denoiser``
returning ``DiracPosterior(mean=prior(x_t, t))`` with plausible's ``(alpha_t, sigma_t)``); the
wrapper is checked to reproduce the prior (same outputs, right mode weights when sampled).

Tuning (per problem, before the evaluation, other seeds and another exact reference set):
zeta of both DPS and gamma of TDS minimise the sliced Wasserstein distance to exact posterior
samples at 128 evaluations with 4096 samples (azula's DPS normalises by the norm of the residual
of the WHOLE batch, so its zeta depends on the batch size and is tuned at 4096).

Metrics against 4096 exact posterior samples: C2ST accuracy of a random forest (scikit-learn,
100 trees, 5-fold cross-validated accuracy on data z-scored with the reference's statistics;
0.5 = indistinguishable; the ``exact`` row is an independent exact sample set: the floor), the
total variation between the empirical mode weights (each sample assigned to its most
responsible exact-posterior component, ``plausible.demos.mode_weights``) and the exact weights,
the sliced Wasserstein-1 distance, the evidence error ``|log p_hat(y) - log p(y)|`` of SMC,
the fraction of distinct samples (resampling duplicates), wall time and NaN count. For SMC,
``C2ST exact resampled`` calibrates the C2ST: independent exact samples given the SMC's final
weights and resampled like it, i.e. the accuracy that the copies alone cause.

Run ``nice python benchmarks/smc_mixture.py`` (646 s on a shared 2-core CPU) or ``--quick``
(smaller; prints only, unless ``--output`` is given).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    azula_wrap,
    fmt,
    setup,
    sliced_wasserstein,
    table,
    write_json,
)
from plausible import (  # noqa: E402
    DPS,
    MMPS,
    SMC,
    GaussianMixtureDenoiser,
    sample,
)
from plausible.demos import mixture_problem, mode_weights  # noqa: E402
from plausible.smc import systematic_resample  # noqa: E402

F64 = torch.float64
NOISE = 0.3


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def build_problem(seed: int, K: int, D: int, M: int, noise: float = NOISE) -> dict[str, Any]:
    """``plausible.demos.mixture_problem`` with ``M`` projections."""
    return mixture_problem(seed, K=K, D=D, noise=noise, M=M)


PROBLEMS: dict[str, dict[str, Any]] = {
    "oracle": {"K": 8, "D": 16, "M": 2, "min_modes": 3,
               "title": "mixture oracle: 8 components in 16-D, A 2x16 (unit rows), sigma_y 0.3"},
    "hard": {"K": 16, "D": 16, "M": 1, "min_modes": 6,
             "title": "16 components in 16-D, A 1x16 (one unit row), sigma_y 0.3"},
}


def make_problem(name: str, seed: int | None) -> dict[str, Any]:
    spec = PROBLEMS[name]
    K, D, M = spec["K"], spec["D"], spec["M"]

    def get(s: int) -> dict[str, Any]:
        if name == "oracle":
            pb = mixture_problem(s)
            # the generalised recipe reproduces the demo's problem exactly
            mine = build_problem(s, K, D, M)
            assert torch.equal(mine["A"], pb["A"]) and torch.equal(
                mine["exact"].weights, pb["exact"].weights)
            return pb
        return build_problem(s, K, D, M)

    if seed is None:
        seed = 0
        while int((get(seed)["exact"].weights > 0.02).sum()) < spec["min_modes"]:
            seed += 1
    pb = get(seed)
    pb.update(name=name, seed=seed, K=K, D=D, M=M, title=spec["title"])
    return pb


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def rf_c2st(x: Tensor, ref: Tensor, seed: int = 0, folds: int = 5, trees: int = 100) -> float:
    """C2ST accuracy of a random forest (``trees`` trees, scikit-learn defaults otherwise),
    ``folds``-fold cross-validated (shuffled K-fold), on data z-scored with the statistics of
    the reference ``ref`` (as sbi's ``c2st``)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import KFold, cross_val_score

    x = x.to(F64).numpy()
    ref = ref.to(F64).numpy()
    mu, sd = ref.mean(0), ref.std(0)
    data = np.concatenate([(x - mu) / sd, (ref - mu) / sd]).astype(np.float32)
    labels = np.concatenate([np.ones(len(x)), np.zeros(len(ref))])
    clf = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, data, labels, cv=cv, scoring="accuracy")))


def mode_tv(x: Tensor, exact: GaussianMixtureDenoiser) -> float:
    w = mode_weights(x, exact)
    return float(0.5 * (w - exact.weights).abs().sum())


def near_duplicates(x: Tensor, radius: float = 1e-2) -> float:
    """Fraction of samples with another sample closer than ``radius`` (Euclidean; exact copies
    included): the loss of diversity of resampled particle systems."""
    if len(x) < 2:
        return math.nan
    hits = 0
    for chunk in x.split(1024):
        d = torch.cdist(chunk, x)
        hits += int(((d < radius).sum(1) > 1).sum())  # itself at distance 0
    return hits / len(x)


def metrics(x: Tensor, ref: Tensor, exact: GaussianMixtureDenoiser, trees: int,
            c2st: bool = True) -> dict[str, Any]:
    finite = torch.isfinite(x).all(1)
    nan = int((~finite).sum())
    xf = x[finite].to(F64)
    out: dict[str, Any] = {"nan": nan, "distinct": len(torch.unique(xf, dim=0)) / max(len(x), 1),
                           "near_dup": near_duplicates(xf)}
    if len(xf) < 50:
        out.update(c2st=math.nan, tv=math.nan, sw=math.nan)
        return out
    out["tv"] = mode_tv(xf, exact)
    out["sw"] = sliced_wasserstein(xf, ref, 128, seed=0)
    out["c2st"] = rf_c2st(xf, ref, trees=trees) if c2st else math.nan
    return out


# --------------------------------------------------------------------------------------------
# Methods: run(budget, n, seed) -> (samples (n, D), info)
# --------------------------------------------------------------------------------------------


def nan_samples(n: int, D: int) -> Tensor:
    return torch.full((n, D), math.nan, dtype=F64)


def run_smc(pb: dict[str, Any], budget: int, n: int, seed: int, populations: int
            ) -> tuple[Tensor, dict[str, Any]]:
    N = n // populations
    smc = SMC(pb["prior"], pb["observation"], particles=N, steps=budget, tol=1e-8)
    smc.posterior.reset_stats()
    try:
        res = smc.run(populations, seed=seed, dtype=F64, progress=False)
    except FloatingPointError as error:
        return nan_samples(n, pb["D"]), {"error": str(error)}
    log_z = res.log_evidence
    exact_log_z = float(pb["exact"].log_evidence)
    pooled = float(torch.logsumexp(log_z, 0) - math.log(populations))
    info = {
        "log_evidence": log_z.tolist(),
        "evidence_err": float((log_z - exact_log_z).abs().mean()),  # mean over populations
        "evidence_err_pooled": abs(pooled - exact_log_z),  # log of the mean estimate of p(y)
        "resamples": float(res.resamples.double().mean()),
        "min_ess_frac": float(res.ess.min() / N),
        "final_ess_frac": float(res.ess[-1].min() / N),
        "vjps": smc.posterior.stats["vjps"],
        "_log_weights": res.log_weights,  # final normalised log-weights (P, N), not saved
    }
    return res.samples.reshape(-1, pb["D"]), info


Method = Callable[[int, int, int], tuple[Tensor, dict[str, Any]]]


def make_methods(pb: dict[str, Any], zeta_dps: float, zeta_az: float, gamma_tds: float,
                 n: int = 4096) -> dict[str, Method]:
    from azula.guidance import DPSSampler, MMPSDenoiser, TDSSampler
    from azula.linalg.covariance import DiagonalCovariance
    from azula.sample import DDPMSampler

    prior, obs, M, D = pb["prior"], pb["observation"], pb["M"], pb["D"]
    A, y, noise = pb["A"], obs.y, pb["noise"]
    az_prior = azula_wrap(prior)

    def az_A(v: Tensor) -> Tensor:
        return v @ A.T.to(v.dtype)

    cov_y = DiagonalCovariance(torch.full((M,), noise**2, dtype=F64))

    def x_1(n: int, seed: int) -> Tensor:  # sigma_1 = 1 in plausible's VP schedule
        return torch.randn(n, D, generator=torch.Generator().manual_seed(seed + 31), dtype=F64)

    def guarded(fn: Callable[[], Tensor], n: int) -> tuple[Tensor, dict[str, Any]]:
        try:
            return fn(), {}
        except FloatingPointError as error:  # plausible's samplers raise on NaN
            return nan_samples(n, D), {"error": str(error)}

    def p_mmps(budget: int, n: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
        post = MMPS(prior, obs, tol=1e-8)
        x, info = guarded(lambda: sample(post, n, steps=budget, sampler="ddpm", seed=seed,
                                         dtype=F64, progress=False), n)
        return x, {**info, "vjps": post.stats["vjps"]}

    def p_dps(budget: int, n: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
        post = DPS(prior, obs, zeta=zeta_dps)
        x, info = guarded(lambda: sample(post, n, steps=budget, sampler="ddpm", seed=seed,
                                         dtype=F64, progress=False), n)
        return x, {**info, "vjps": post.stats["vjps"]}

    def a_mmps(budget: int, n: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
        den = MMPSDenoiser(az_prior, y, az_A, cov_y, solver="gmres", iterations=M)
        sampler = DDPMSampler(den, steps=budget, silent=True, dtype=F64)
        torch.manual_seed(seed)
        return sampler(x_1(n, seed)), {"vjps": budget * (M + 1)}

    def twist(x_hat: Tensor, rho: Tensor) -> Tensor:
        var = noise**2 + gamma_tds * rho**2
        r = y.to(x_hat.dtype) - az_A(x_hat)
        return -0.5 * (r**2 / var + torch.log(2 * math.pi * var))

    def a_tds(budget: int, n: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
        sampler = TDSSampler(az_prior, twist, steps=budget, silent=True, dtype=F64)
        torch.manual_seed(seed)
        return sampler(x_1(n, seed)), {"vjps": budget}

    def a_dps(budget: int, n: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
        sampler = DPSSampler(az_prior, y=y, A=az_A, zeta=zeta_az, steps=budget, silent=True,
                             dtype=F64)
        torch.manual_seed(seed)
        return sampler(x_1(n, seed)), {"vjps": budget}

    return {
        f"plausible SMC 1x{n}": lambda b, n, s: run_smc(pb, b, n, s, 1),
        f"plausible SMC 4x{n // 4}": lambda b, n, s: run_smc(pb, b, n, s, 4),
        "plausible MMPS ddpm": p_mmps,
        f"plausible DPS ddpm zeta={zeta_dps:g}": p_dps,
        f"azula MMPS ddpm gmres k={M}": a_mmps,
        f"azula TDS gamma={gamma_tds:g}": a_tds,
        f"azula DPS zeta={zeta_az:g}": a_dps,
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Checks and tuning
# --------------------------------------------------------------------------------------------


def check_wrapper(pb: dict[str, Any], n: int, steps: int) -> dict[str, Any]:
    """The azula adapter reproduces plausible's prior: identical outputs and schedule, and
    azula's DDPM on it gives the prior's mode weights (like plausible's DDPM, and exact
    samples)."""
    from azula.sample import DDPMSampler

    prior, D = pb["prior"], pb["D"]
    az = azula_wrap(prior)
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(256, D, generator=g, dtype=F64)
    diff, sdiff = 0.0, 0.0
    for t in (0.05, 0.3, 0.7, 0.99):
        tt = torch.tensor(t, dtype=F64)
        diff = max(diff, float((az(x_t, tt).mean - prior(x_t, tt)).abs().max()))
        a1, s1 = az.schedule(tt)
        a2, s2 = prior.schedule(tt)
        sdiff = max(sdiff, abs(float(a1 - a2)), abs(float(s1 - s2)))
    sampler = DDPMSampler(az, steps=steps, silent=True, dtype=F64)
    torch.manual_seed(0)
    x_az = sampler(torch.randn(n, D, generator=torch.Generator().manual_seed(1), dtype=F64))
    x_pl = sample(prior, n, steps=steps, sampler="ddpm", seed=1, dtype=F64, progress=False)
    x_ex = prior.sample(n, generator=torch.Generator().manual_seed(2))
    return {"max_abs_output_diff": diff, "max_abs_schedule_diff": sdiff, "steps": steps,
            "n": n, "tv_azula_ddpm": mode_tv(x_az, prior),
            "tv_plausible_ddpm": mode_tv(x_pl, prior), "tv_exact_samples": mode_tv(x_ex, prior),
            "prior_weights": prior.weights.tolist(),
            "azula_weights": mode_weights(x_az, prior).tolist()}


def tune(pb: dict[str, Any], n: int, budget: int, grids: dict[str, list[float]], log: Any
         ) -> dict[str, Any]:
    ref = pb["exact"].sample(n, generator=torch.Generator().manual_seed(5_000))
    out: dict[str, Any] = {"budget": budget, "n": n, "criterion": "sliced W1"}
    keys = {"zeta_dps": "plausible DPS", "zeta_az": "azula DPS", "gamma_tds": "azula TDS"}
    defaults = {"zeta_dps": 1.0, "zeta_az": 1.0, "gamma_tds": 1.0}
    for key, prefix in keys.items():
        scores = {}
        for value in grids[key]:
            methods = make_methods(pb, **{**defaults, key: value})
            name = next(k for k in methods if k.startswith(prefix))
            x, _ = methods[name](budget, n, 999)
            finite = x[torch.isfinite(x).all(1)]
            sw = sliced_wasserstein(finite, ref, 128, seed=0) if len(finite) > 50 else math.inf
            tv = mode_tv(finite, pb["exact"]) if len(finite) > 50 else math.nan
            scores[value] = {"sw": sw, "tv": tv, "nan": int(len(x) - len(finite))}
        best = min(scores, key=lambda v: scores[v]["sw"])
        out[key] = best
        out[key + "_scores"] = scores
        log(f"  tuning {prefix}: " + ", ".join(
            f"{v:g}: SW {s['sw']:.3g} TV {s['tv']:.3g}" for v, s in scores.items())
            + f" -> {best:g}")
    return out


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def bench(pb: dict[str, Any], budgets: list[int], args: argparse.Namespace, log: Any
          ) -> dict[str, Any]:
    exact, n, D = pb["exact"], args.n, pb["D"]
    order = torch.argsort(exact.weights, descending=True)
    w_sorted = exact.weights[order]
    log(f"\n## {pb['name']} (seed {pb['seed']}): {pb['title']}")
    log("  exact posterior mode weights (sorted): "
        + " ".join(f"{w:.4f}" for w in w_sorted.tolist() if w > 1e-4)
        + f"; log p(y) = {float(exact.log_evidence):.4f}")

    wrapper = check_wrapper(pb, n, args.wrapper_steps)
    log(f"  azula wrapper: max |output diff| {wrapper['max_abs_output_diff']:.1e}, schedule diff "
        f"{wrapper['max_abs_schedule_diff']:.1e}; prior mode-weight TV with {n} samples: azula "
        f"ddpm {wrapper['tv_azula_ddpm']:.3f}, plausible ddpm {wrapper['tv_plausible_ddpm']:.3f},"
        f" exact samples {wrapper['tv_exact_samples']:.3f} ({args.wrapper_steps} steps)")

    tuning = tune(pb, n, args.tune_budget, args.grids, log)
    methods = make_methods(pb, tuning["zeta_dps"], tuning["zeta_az"], tuning["gamma_tds"], n)

    ref = exact.sample(n, generator=torch.Generator().manual_seed(1_000))
    floor_x = exact.sample(n, generator=torch.Generator().manual_seed(2_000))
    floor = metrics(floor_x, ref, exact, args.trees)
    rows: list[dict[str, Any]] = [{"method": "exact samples (floor)", "budget": None, **floor}]
    log(f"  exact vs exact (floor): C2ST {floor['c2st']:.3f}, TV {floor['tv']:.3f}, SW "
        f"{floor['sw']:.3f}")

    for budget in budgets:
        for name, run in methods.items():
            if "SMC 4x" in name and budget not in args.pop_budgets(pb["name"], budgets):
                continue
            (x, info), seconds = timed(lambda: run(budget, n, 0))
            m = metrics(x, ref, exact, args.trees)
            lw = info.pop("_log_weights", None)
            if lw is not None and lw.shape[0] == 1:
                # the same final resampling applied to exact samples: the C2ST that the
                # copies alone cause (the exact samples carry the SMC's final weights)
                idx = systematic_resample(lw, torch.Generator().manual_seed(3))[0]
                xr = floor_x[idx]
                info["c2st_exact_resampled"] = rf_c2st(xr, ref, trees=args.trees)
                info["distinct_exact_resampled"] = len(torch.unique(xr, dim=0)) / n
            row = {"method": name, "budget": budget, "time": seconds, **m, **info}
            row["weights"] = mode_weights(x[torch.isfinite(x).all(1)], exact)[order].tolist() \
                if m["nan"] < n else None
            rows.append(row)
            extra = ""
            if "evidence_err" in info:
                extra = (f" |dlog Z| {info['evidence_err']:.3f} resamples "
                         f"{info['resamples']:.0f} final ESS {info['final_ess_frac']:.2f}")
            if "c2st_exact_resampled" in info:
                extra += f" C2ST of exact samples so resampled {info['c2st_exact_resampled']:.3f}"
            log(f"  {name:30s} {budget:4d} evals: C2ST {m['c2st']:.3f} TV {m['tv']:.3f} SW "
                f"{m['sw']:.3f} NaN {m['nan']} distinct {m['distinct']:.2f} near-dup "
                f"{m['near_dup']:.2f} ({seconds:.1f}s){extra}"
                f"{'  ' + info['error'] if 'error' in info else ''}")

    return {"name": pb["name"], "seed": pb["seed"], "title": pb["title"], "K": pb["K"],
            "D": D, "M": pb["M"], "noise": pb["noise"], "n": n, "budgets": budgets,
            "exact_weights_sorted": w_sorted.tolist(),
            "exact_log_evidence": float(exact.log_evidence), "wrapper_check": wrapper,
            "tuning": tuning, "rows": rows}


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """SMC (one population) C2ST <= 0.60 and TV <= 0.10 at <= 256 evaluations per particle,
    where every azula method has C2ST >= 0.65 or TV >= 0.10 (at the same budget)."""
    per_budget = []
    for b in res["budgets"]:
        if b > 256:
            continue
        rows = [r for r in res["rows"] if r["budget"] == b]
        smc = next(r for r in rows if r["method"].startswith("plausible SMC 1x"))
        smc_ok = smc["c2st"] <= 0.60 and smc["tv"] <= 0.10
        az = {r["method"]: (r["c2st"] >= 0.65 or r["tv"] >= 0.10 or r["nan"] > 0)
              for r in rows if r["method"].startswith("azula")}
        per_budget.append({"budget": b, "smc_c2st": smc["c2st"], "smc_tv": smc["tv"],
                           "smc_ok": smc_ok, "azula_worse": az,
                           "met": smc_ok and all(az.values())})
    return {"per_budget": per_budget, "met_any": any(p["met"] for p in per_budget),
            "met_all": all(p["met"] for p in per_budget)}


COLUMNS = [
    ("method", "method"), ("budget", "evals/particle"), ("c2st", "C2ST (RF)"),
    ("c2st_exact_resampled", "C2ST exact resampled"), ("tv", "mode-weight TV"),
    ("sw", "sliced W1"), ("evidence_err", "evidence err"),
    ("evidence_err_pooled", "evidence err pooled"), ("resamples", "resamples"),
    ("final_ess_frac", "final ESS/N"), ("distinct", "distinct frac"),
    ("near_dup", "near-dup frac"), ("vjps", "VJPs/sample"), ("nan", "NaN"), ("time", "time (s)"),
]


def summary(results: list[dict[str, Any]], command: str, env: dict[str, Any]) -> str:
    n = results[0]["n"] if results else 0
    out = ["# smc_mixture: SMC with MMPS twists vs guided diffusion (plausible, azula)", "",
           f"Command: `{command}`", "",
           f"Machine: 2-core CPU ({env['processor']}, shared with other jobs: wall times are "
           f"indicative only), torch {env['torch']} CPU ({env['torch_threads']} thread), azula "
           f"{env['azula']}, plausible {env['plausible']}, float64.", "",
           "C2ST: random forest (scikit-learn, 100 trees), 5-fold cross-validated accuracy, data "
           f"z-scored with the exact reference's statistics, {n} samples vs {n} exact posterior "
           "samples (0.5 = indistinguishable). Mode-weight TV: samples assigned to their most "
           "responsible exact-posterior component. Evidence err (SMC): mean over populations of "
           "abs(log p_hat(y) - log p(y)); pooled: the same for the log of the populations' mean "
           "estimate of p(y). "
           "`distinct frac`: fraction of distinct samples (resampling duplicates); "
           "`near-dup frac`: fraction of samples with another sample within Euclidean distance "
           "0.01 (exact posterior samples: 0). `C2ST exact resampled` (SMC, one population): "
           "the C2ST of the independent exact sample set (the floor row) given the SMC's final "
           "normalised weights and resampled the same way (systematic): the accuracy that the "
           "copies of the final resampling alone cause, with no error in the distribution. "
           "`final ESS/N`: effective sample size before the final resampling. VJPs/sample: "
           "vector-Jacobian products through the prior per sample (SMC and MMPS: solver + "
           "twist log-determinant; azula MMPS: k + 1 per step; TDS, DPS: 1 per step).", "",
           "Notes on the methods (from their code): plausible SMC resamples (systematic) when "
           "the ESS falls below N/2 and once more at the end to return equally weighted "
           "samples, so its samples contain copies (`distinct frac` < 1) and near-copies (copies "
           "resampled late that the small remaining noise barely separates); a random forest "
           "memorises such copies across folds, which raises the C2ST accuracy of any resampled "
           "particle set. azula's `TDSSampler` resamples (multinomial) at every step and "
           "discards the last incremental weight (the final samples are never reweighted by "
           "p(y | x_0) / twist), hence its many near-copies. azula's `DPSSampler` "
           "differentiates the norm of the residual of the whole batch, so its effective step "
           "per sample shrinks like 1/sqrt(batch size): its zeta is tuned at the evaluated batch "
           "size.", ""]
    for res in results:
        t = res["tuning"]
        w = res["wrapper_check"]
        out += [f"## {res['name']}: {res['title']} (seed {res['seed']})", "",
                "Exact posterior mode weights (sorted, > 1e-4): "
                + ", ".join(f"{x:.4f}" for x in res["exact_weights_sorted"] if x > 1e-4)
                + f"; log p(y) = {res['exact_log_evidence']:.4f}.", "",
                f"azula wrapper check: max |azula output - plausible prior| = "
                f"{w['max_abs_output_diff']:.1e}, schedule difference "
                f"{w['max_abs_schedule_diff']:.1e}; prior mode-weight TV ({w['n']} samples, "
                f"{w['steps']} DDPM steps): azula {w['tv_azula_ddpm']:.3f}, plausible "
                f"{w['tv_plausible_ddpm']:.3f}, exact prior samples {w['tv_exact_samples']:.3f}.",
                "",
                f"Tuned on other seeds and another exact reference set (sliced W1 at "
                f"{t['budget']} evaluations, {t['n']} samples): plausible DPS zeta = "
                f"{t['zeta_dps']:g} (grid "
                + ", ".join(f"{v:g}: {s['sw']:.3g}" for v, s in t["zeta_dps_scores"].items())
                + f"), azula DPS zeta = {t['zeta_az']:g} (grid "
                + ", ".join(f"{v:g}: {s['sw']:.3g}" for v, s in t["zeta_az_scores"].items())
                + f"), azula TDS gamma = {t['gamma_tds']:g} (grid "
                + ", ".join(f"{v:g}: {s['sw']:.3g}" for v, s in t["gamma_tds_scores"].items())
                + ").", ""]
        out.append(table(res["rows"], COLUMNS))
        out.append("")
        out.append("Mode weights (sorted like the exact weights, first 6):")
        out.append("")
        wrows = [{"method": "exact", "budget": None,
                  "w": " ".join(f"{x:.3f}" for x in res["exact_weights_sorted"][:6])}]
        for r in res["rows"][1:]:
            wrows.append({"method": r["method"], "budget": r["budget"],
                          "w": "-" if r["weights"] is None else
                          " ".join(f"{x:.3f}" for x in r["weights"][:6])})
        out.append(table(wrows, [("method", "method"), ("budget", "evals/particle"),
                                 ("w", "mode weights")]))
        out.append("")
        tg = res["targets"]
        out.append("Targets (SMC, one population: C2ST <= 0.60 and TV <= 0.10 at <= 256 "
                   "evaluations per particle, where every azula method has C2ST >= 0.65 or "
                   "TV >= 0.10)"
                   + (":" if res["name"] == "oracle" else
                      " -- informational here, the issue's target is on the oracle:"))
        out.append("")
        for p in tg["per_budget"]:
            worse = ", ".join(f"{k.removeprefix('azula ')}: {'yes' if v else 'NO'}"
                              for k, v in p["azula_worse"].items())
            out.append(f"- {p['budget']} evals: SMC C2ST {fmt(p['smc_c2st'])}, TV "
                       f"{fmt(p['smc_tv'])} -> {'ok' if p['smc_ok'] else 'NOT ok'}; azula "
                       f"C2ST >= 0.65 or TV >= 0.10: {worse} -> "
                       f"{'MET' if p['met'] else 'MISSED'}")
        out.append(f"- overall: {'MET' if tg['met_any'] else 'MISSED'} (at some budget <= 256"
                   f"), {'met' if tg['met_all'] else 'not met'} at every budget")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller configuration")
    parser.add_argument("--problems", default="oracle,hard", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=None,
                        help="problem seed (default: the first that is multimodal enough)")
    parser.add_argument("--n", type=int, default=4096, help="samples per method")
    parser.add_argument("--trees", type=int, default=100, help="trees of the C2ST forest")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None,
                        help="results/<output>.{json,md} (default smc_mixture; none with --quick)")
    args = parser.parse_args()
    env = setup(args.threads, 0)
    names = args.problems.split(",")
    if args.quick:
        args.n = min(args.n, 2048)
        budgets = {"oracle": [32, 128], "hard": [64]}
        args.grids = {"zeta_dps": [0.3, 1.0], "zeta_az": [3.0, 10.0, 30.0],
                      "gamma_tds": [0.1, 1.0]}
        args.tune_budget = 64
        args.wrapper_steps = 32
    else:
        budgets = {"oracle": [32, 64, 128, 256], "hard": [128]}
        args.grids = {"zeta_dps": [0.03, 0.1, 0.3, 1.0], "zeta_az": [3.0, 10.0, 30.0, 100.0],
                      "gamma_tds": [0.3, 1.0, 3.0, 10.0]}
        args.tune_budget = 128
        args.wrapper_steps = 64
    # SMC with 4 populations x 1024 at the 2nd and last budgets (all of them with --quick)
    args.pop_budgets = lambda name, bs: bs if args.quick or len(bs) < 3 else [bs[1], bs[-1]]
    command = "nice python benchmarks/smc_mixture.py" + " ".join(
        [""] + [a for a in sys.argv[1:]])

    def log(s: str) -> None:
        print(s, flush=True)

    log(f"# smc_mixture (torch {env['torch']}, azula {env['azula']}, {env['torch_threads']} "
        f"thread(s), {env['processor']}); {args.n} samples per method")
    results = []
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        pb = make_problem(name, args.seed)
        res = bench(pb, budgets[name], args, log)
        res["targets"] = targets(res)
        res["wall_seconds"] = time.perf_counter() - t0
        results.append(res)
        log(f"  ({name}: {res['wall_seconds']:.0f}s)")
    total = time.perf_counter() - start
    text = summary(results, command, env) + f"\nTotal wall time: {total:.0f} s.\n"
    print("\n\n" + text)
    out = args.output or (None if args.quick else "smc_mixture")
    if out is not None:
        grids = args.grids
        path = write_json(out, {"benchmark": "smc_mixture", "command": command, "env": env,
                                "settings": {"n": args.n, "trees": args.trees,
                                             "budgets": budgets, "grids": grids,
                                             "tune_budget": args.tune_budget},
                                "total_seconds": total, "problems": results})
        (RESULTS / f"{out}.md").write_text(text)
        print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
