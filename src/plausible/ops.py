"""Observation operators, ``plausible.ops``: re-exported from :mod:`plausible.observations`."""

from .observations import (
    Blur,
    Coarsen,
    Compose,
    FourierMask,
    Identity,
    Lambda,
    Mask,
    Matrix,
    Operator,
    Subsample,
)

__all__ = [
    "Operator",
    "Identity",
    "Mask",
    "Subsample",
    "Coarsen",
    "Blur",
    "FourierMask",
    "Matrix",
    "Lambda",
    "Compose",
]
