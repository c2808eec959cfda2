"""Shared helpers of the benchmarks: azula adapters, timing, tables, JSON output and two-sample
distances (sliced Wasserstein, C2ST without scikit-learn)."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


# --------------------------------------------------------------------------------------------
# Environment, timing, output
# --------------------------------------------------------------------------------------------


def setup(threads: int, seed: int) -> dict[str, Any]:
    """Fixes the number of torch threads and the global seed; returns a description of the
    machine and the library versions for the JSON output."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "seed": seed,
    }
    try:
        import azula

        info["azula"] = getattr(azula, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        info["azula"] = None
    try:
        import plausible

        info["plausible"] = plausible.__version__
    except ImportError:  # pragma: no cover
        info["plausible"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Runs ``fn()`` and returns ``(result, wall seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Writes ``results/<name>.json`` (NaN and infinity as null) and returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"

    def clean(obj: Any) -> Any:
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else None
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if isinstance(obj, Tensor):
            return clean(obj.tolist())
        return obj

    path.write_text(json.dumps(clean(payload), indent=1))
    return path


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` given as ``(key, header)`` pairs."""
    head = [h for _, h in columns]
    body = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for b in body:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# azula adapters
# --------------------------------------------------------------------------------------------


class AzulaSchedule:
    """An azula schedule returning plausible's ``(alpha_t, sigma_t)``, so that both libraries
    diffuse with exactly the same perturbation kernel."""

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.schedule(t)


def azula_wrap(denoiser: nn.Module) -> nn.Module:
    """An azula ``Denoiser`` whose forward returns ``DiracPosterior(mean=denoiser(x_t, t))``
    for a plausible denoiser (e.g. a trained network), with plausible's schedule."""
    from azula.denoise import Denoiser, DiracPosterior

    class Wrapped(Denoiser):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.schedule = AzulaSchedule(inner.schedule)

        def forward(self, x_t: Tensor, t: Tensor, **kwargs: Any) -> DiracPosterior:
            return DiracPosterior(mean=self.inner(x_t, t))

    return Wrapped(denoiser)


class AzulaCounter(nn.Module):
    """Counts the calls of an azula denoiser (the guided denoiser evaluations)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    @property
    def schedule(self) -> Any:
        return self.inner.schedule

    def forward(self, x_t: Tensor, t: Tensor, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(x_t, t, **kwargs)


def azula_sample(
    kind: str,
    denoiser: nn.Module,
    x_1: Tensor,
    steps: int,
    grid: Tensor | None = None,
    seed: int = 0,
    **options: Any,
) -> Tensor:
    """Runs azula's sampler ``kind`` (``"ddpm"``, ``"ddim"``, ``"xeab"``, ``"heun"``, ``"pc"``)
    from ``x_1``. ``grid``: a decreasing tensor of ``steps + 1`` times (default azula's own
    uniform grid ``linspace(1, 0, steps + 1)``)."""
    from azula import sample as az

    classes = {"ddpm": az.DDPMSampler, "ddim": az.DDIMSampler, "xeab": az.xEABSampler,
               "heun": az.HeunSampler, "pc": az.PCSampler}
    cls = classes[kind]
    if grid is not None:
        ts = grid.to(x_1.dtype)
        cls = type(f"Grid{cls.__name__}", (cls,), {"timesteps": property(lambda self: ts)})
    sampler = cls(denoiser, steps=steps, silent=True, dtype=x_1.dtype, **options)
    torch.manual_seed(seed)
    return sampler(x_1.clone())


# --------------------------------------------------------------------------------------------
# Two-sample distances
# --------------------------------------------------------------------------------------------


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 128, seed: int = 0) -> float:
    r"""Sliced Wasserstein-1 distance between two sample sets ``(N, D)`` and ``(M, D)``:
    the average over ``projections`` random unit directions of the 1-D W1 between the
    projected samples (sorted projections; quantile-matched when ``N != M``)."""
    g = torch.Generator().manual_seed(seed)
    x, y = x.to(torch.float64).flatten(1), y.to(torch.float64).flatten(1)
    u = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=0)
    px, _ = torch.sort(x @ u, dim=0)
    py, _ = torch.sort(y @ u, dim=0)
    if px.shape[0] != py.shape[0]:
        n = max(px.shape[0], py.shape[0])
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        px = px[(q * px.shape[0]).long().clamp(max=px.shape[0] - 1)]
        py = py[(q * py.shape[0]).long().clamp(max=py.shape[0] - 1)]
    return float((px - py).abs().mean())


def _quadratic_features(x: Tensor) -> Tensor:
    i, j = torch.triu_indices(x.shape[1], x.shape[1])
    return torch.cat([x, x[:, i] * x[:, j]], dim=1)


def c2st(
    x: Tensor,
    y: Tensor,
    folds: int = 5,
    seed: int = 0,
    classifier: str = "mlp",
    epochs: int = 300,
) -> float:
    r"""Classifier two-sample test accuracy (0.5: indistinguishable, 1: disjoint).

    The two sample sets are standardised with the statistics of ``y`` (the reference), pooled,
    shuffled and split in ``folds`` folds; a classifier is trained on ``folds - 1`` folds and
    its accuracy measured on the held-out fold, averaged over the folds.

    ``classifier="mlp"``: a 2-hidden-layer MLP (64 SiLU units), full-batch Adam (lr 1e-3,
    ``epochs`` steps), early-stopped on the validation loss of an inner 80/20 split of the
    training folds. ``classifier="quadratic"``: L2-regularised logistic
    regression on linear + quadratic features (L-BFGS). Deterministic given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    x, y = x.to(torch.float32).flatten(1), y.to(torch.float32).flatten(1)
    mu, sd = y.mean(0), y.std(0).clamp(min=1e-6)
    data = torch.cat([(x - mu) / sd, (y - mu) / sd])
    labels = torch.cat([torch.ones(len(x)), torch.zeros(len(y))])
    perm = torch.randperm(len(data), generator=g)
    data, labels = data[perm], labels[perm]
    if classifier == "quadratic":
        data = _quadratic_features(data)
        data = (data - data.mean(0)) / data.std(0).clamp(min=1e-6)
    fold_of = torch.arange(len(data)) % folds
    accuracies = []
    for k in range(folds):
        train, test = fold_of != k, fold_of == k
        torch.manual_seed(seed + k)
        if classifier == "quadratic":
            model: nn.Module = nn.Linear(data.shape[1], 1)
            optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200,
                                          line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                optimizer.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(
                    model(data[train])[:, 0], labels[train]
                ) + 1e-3 * model.weight.square().sum()
                loss.backward()
                return loss

            optimizer.step(closure)
        elif classifier == "mlp":
            # early stopping on an inner validation split (the last 20 % of the training folds)
            idx = train.nonzero()[:, 0]
            cut = int(0.8 * len(idx))
            fit_idx, val_idx = idx[:cut], idx[cut:]
            model = nn.Sequential(nn.Linear(data.shape[1], 64), nn.SiLU(), nn.Linear(64, 64),
                                  nn.SiLU(), nn.Linear(64, 1))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            best_loss, best_state = math.inf, None
            for _ in range(epochs):
                optimizer.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(
                    model(data[fit_idx])[:, 0], labels[fit_idx])
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    val = float(nn.functional.binary_cross_entropy_with_logits(
                        model(data[val_idx])[:, 0], labels[val_idx]))
                if val < best_loss:
                    best_loss = val
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(best_state)
        else:
            raise ValueError(f"unknown classifier {classifier!r}")
        with torch.no_grad():
            pred = model(data[test])[:, 0] > 0
        accuracies.append(float((pred == labels[test].bool()).float().mean()))
    return sum(accuracies) / folds
