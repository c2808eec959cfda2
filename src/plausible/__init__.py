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
from .linalg import Solution, cg, gmres
from .observations import Observation, Operator
from .posterior import DPS, MMPS, SDA, ZeroShotPosterior
from .sampling import SAMPLERS, sample
from .schedules import RectifiedSchedule, Schedule, VESchedule, VPSchedule, time_grid
from .smc import SMC, SMCResult
from .training import fit

__version__ = "0.1.0"

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
]
