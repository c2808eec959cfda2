"""plausible: Bayesian inverse problems with diffusion models.

Draw all plausible states ``x`` (or parameters ``theta``) that explain noisy, incomplete
observations ``y``: diffusion priors, zero-shot posterior sampling (MMPS, DPS, SDA) with any
observation model, and the samplers that consume them.

Typical use::

    import plausible
    from plausible import MMPS, Observation, sample

    prior = plausible.Denoiser(plausible.nets.ResMLP(features=3), plausible.VPSchedule())
    plausible.fit(prior, data, steps=10_000)
    obs = Observation(y, A=plausible.ops.Mask(mask), noise=0.05)
    x = sample(MMPS(prior, obs), 64, steps=64)
"""

from . import data, nets, ops
from .checkpoints import CheckpointError, load
from .denoisers import (
    Denoiser,
    GaussianDenoiser,
    GaussianMixtureDenoiser,
    Preconditioned,
    gaussian_condition,
)
from .langevin import langevin
from .linalg import Solution, cg, gmres
from .observations import Observation, Operator
from .posterior import DPS, MMPS, SDA, ZeroShotPosterior
from .sampling import SAMPLERS, sample
from .schedules import RectifiedSchedule, Schedule, VESchedule, VPSchedule, time_grid
from .smc import SMC, SMCResult
from .training import fit

__version__ = "0.1.0"

# Modules of the later layers are imported on first use, so that ``import plausible`` stays
# fast and a missing optional dependency of one application never breaks the others.
_LAZY: dict[str, tuple[str, str | None]] = {
    # name: (module, attribute or None for the module itself)
    "tasks": ("tasks", None),
    "diagnostics": ("diagnostics", None),
    "plots": ("plots", None),
    "em": ("em", None),
    "trajectories": ("trajectories", None),
    "amortized": ("amortized", None),
    "TrajectoryDenoiser": ("trajectories", "TrajectoryDenoiser"),
    "ConditionalDenoiser": ("amortized", "ConditionalDenoiser"),
}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = importlib.import_module(f".{module}", __name__)
        if attribute is not None:
            value = getattr(value, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'plausible' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "nets",
    "ops",
    "Denoiser",
    "Preconditioned",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "gaussian_condition",
    "Solution",
    "cg",
    "gmres",
    "langevin",
    "Observation",
    "Operator",
    "ZeroShotPosterior",
    "MMPS",
    "DPS",
    "SDA",
    "SAMPLERS",
    "sample",
    "SMC",
    "SMCResult",
    "Schedule",
    "VPSchedule",
    "VESchedule",
    "RectifiedSchedule",
    "time_grid",
    "fit",
    "load",
    "CheckpointError",
    "data",
    *_LAZY,
]
