"""Built-in problems with references: simulators, exact or reference posteriors.

Each application has its own module; the names below are imported on first use, so that
``import plausible.tasks`` stays light.

- ``filters``: Kalman smoother (linear-Gaussian state-space models), bootstrap particle
  filter/smoother, ensemble Kalman smoother.
- ``linear``: linear-Gaussian Markov chains (AR(k)) with their exact trajectory Gaussians.
- ``lorenz``: noisy Lorenz-63 (as SDA) and Lorenz-96 simulators.
- ``kolmogorov``: 2-D Kolmogorov flow (Navier-Stokes vorticity on the torus).
- ``sbi``: the sbi-benchmark tasks (sbibm 1.1.0 definitions) and their reference posteriors.
- ``manifold``: the toy 1-D manifold in 5-D of the empirical-Bayes experiments.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule that defines it. Each application adds its names in its own block.
_NAMES: dict[str, str] = {
    # --- linear (trajectories) ---
    "ARChain": "linear",
    "kalman_smoother": "linear",
    "companion_form": "linear",
    # --- end linear ---
    # --- filters ---
    "particle_filter": "filters",
    "particle_smoother": "filters",
    "backward_simulation": "filters",
    "ensemble_kalman_smoother": "filters",
    "ParticleFilterResult": "filters",
    "EnsembleSmootherResult": "filters",
    # --- end filters ---
    # --- lorenz ---
    "Lorenz63": "lorenz",
    "Lorenz96": "lorenz",
    "TrajectorySimulator": "lorenz",
    # --- end lorenz ---
    # --- kolmogorov ---
    "KolmogorovFlow": "kolmogorov",
    "vorticity_to_velocity": "kolmogorov",
    "velocity_to_vorticity": "kolmogorov",
    # --- end kolmogorov ---
    # --- sbi ---
    "SBI_TASKS": "sbi",
    "get_task": "sbi",
    "sbibm_wheel": "sbi",
    # --- end sbi ---
    # --- manifold / em ---
    "Manifold": "manifold",
    "random_projections": "manifold",
    "manifold_problem": "manifold",
    "ManifoldProblem": "manifold",
    # --- end manifold / em ---
}

_MODULES = ("filters", "linear", "lorenz", "kolmogorov", "sbi", "manifold", "mnist", "mri")

__all__ = [*_NAMES, *_MODULES]


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'plausible.tasks' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
