"""Training configurations: a YAML or TOML file that fully describes a prior (backbone,
schedule), its data and its training, validated field by field.

Example (TOML)::

    [model]
    backbone = "ResMLP"                 # or "UNet"
    backbone_args = { features = 3, hidden = 256, blocks = 3 }
    schedule = { kind = "vp", eta = 1e-3 }
    sigma_data = 1.0

    [data]
    path = "lorenz.zarr"                # .zarr store, .npy array or .safetensors file
    key = "x"                           # array in the store / tensor in the file
    window = 5                          # optional: random windows of 5 states
    validation = 0.05                   # held-out fraction (or a path)

    [training]
    out = "run/"
    steps = 20000
    batch_size = 256
    lr = 1e-3
    patience = 5                        # optional: early stopping on data.validation

Every unknown field and every wrong type is reported with its dotted name.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch
from torch import Tensor

from . import nets
from .checkpoints import build_model
from .denoisers import Preconditioned
from .schedules import schedule_from_config

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "TrainingConfig",
    "Config",
    "read_config",
    "parse_config",
    "build_prior",
    "load_array",
    "train",
]


class ConfigError(ValueError):
    """A configuration field is unknown, missing or of the wrong type."""


@dataclass
class ModelConfig:
    """``[model]``: the backbone class and its arguments, the schedule, ``sigma_data`` and the
    state shape (needed for a UNet)."""

    backbone: str
    backbone_args: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=lambda: {"kind": "vp", "eta": 1e-3})
    sigma_data: float = 1.0
    shape: list | None = None


@dataclass
class DataConfig:
    """``[data]``: where the training states are, and how to read them."""

    path: str
    key: str | None = None
    window: int | None = None
    flatten_window: bool = False
    memory_budget: str = "1GB"
    validation: float | str | None = None


@dataclass
class TrainingConfig:
    """``[training]``: the arguments of :func:`plausible.fit` and the run folder."""

    out: str
    steps: int = 10_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int | None = None
    decay: str = "cosine"
    ema: float = 0.999
    clip: float | None = 1.0
    accumulate: int = 1
    precision: str = "fp32"
    compile: bool = False
    validate_every: int | None = None
    patience: int | None = None
    checkpoint_every: int = 1000
    keep: int = 2
    seed: int | None = 0
    device: str | None = None
    t_distribution: str = "uniform"
    weighting: str = "edm"


@dataclass
class Config:
    """A whole training configuration."""

    model: ModelConfig
    data: DataConfig
    training: TrainingConfig


def _check_type(value: Any, hint: Any, name: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is None and hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"field {name} must be null, got {value!r}")
    if args and type(None) in args:  # Optional / union
        if value is None:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, name)
            except ConfigError as error:
                errors.append(str(error))
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"field {name} must be {names}, got {type(value).__name__} {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"field {name} must be a number, got {type(value).__name__} "
                              f"{value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"field {name} must be an integer, got {type(value).__name__} "
                              f"{value!r}")
        return value
    base = origin or hint
    if base in (str, bool, dict, list) and not isinstance(value, base):
        raise ConfigError(f"field {name} must be {base.__name__}, got {type(value).__name__} "
                          f"{value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"section {prefix} must be a table/mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown field {prefix}.{unknown[0]} (known fields of [{prefix}]: "
                          f"{', '.join(sorted(known))})")
    values = {}
    for f in fields(cls):
        name = f"{prefix}.{f.name}"
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"missing required field {name}")
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and hint in (ModelConfig, DataConfig, TrainingConfig):
            values[f.name] = _build(hint, raw[f.name], name)
        else:
            values[f.name] = _check_type(raw[f.name], hint, name)
    return cls(**values)


def parse_config(raw: dict) -> Config:
    """Validates a mapping (as read from YAML/TOML) into a :class:`Config`.

    Raises:
        ConfigError: Naming the first unknown, missing or mistyped field.
    """
    if not isinstance(raw, dict):
        raise ConfigError("a configuration must be a mapping with [model], [data], [training]")
    unknown = sorted(set(raw) - {"model", "data", "training"})
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]} (expected model, data, training)")
    for section in ("model", "data", "training"):
        if section not in raw:
            raise ConfigError(f"missing section [{section}]")
    config = Config(
        model=_build(ModelConfig, raw["model"], "model"),
        data=_build(DataConfig, raw["data"], "data"),
        training=_build(TrainingConfig, raw["training"], "training"),
    )
    if config.model.backbone not in ("ResMLP", "UNet"):
        raise ConfigError(f"field model.backbone must be 'ResMLP' or 'UNet', got "
                          f"{config.model.backbone!r}")
    cls = getattr(nets, config.model.backbone)
    try:
        import inspect

        inspect.signature(cls).bind(**config.model.backbone_args)
    except TypeError as error:
        raise ConfigError(f"field model.backbone_args: {error}") from None
    try:
        schedule_from_config(config.model.schedule)
    except ValueError as error:
        raise ConfigError(f"field model.schedule: {error}") from None
    t = config.training
    for name, value, allowed in (("decay", t.decay, ("cosine", "linear", "constant", "plateau")),
                                 ("precision", t.precision, ("fp32", "bf16")),
                                 ("t_distribution", t.t_distribution, ("uniform", "lognormal")),
                                 ("weighting", t.weighting, ("edm", "none"))):
        if value not in allowed:
            raise ConfigError(f"field training.{name} must be one of {allowed}, got {value!r}")
    for name in ("steps", "batch_size", "accumulate", "checkpoint_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"field training.{name} must be positive")
    if t.patience is not None:
        if t.patience < 1:
            raise ConfigError("field training.patience must be positive")
        if config.data.validation is None:
            raise ConfigError("field training.patience (early stopping) needs held-out data: "
                              "set data.validation (a fraction or a path)")
    if t.decay == "plateau" and config.data.validation is None:
        raise ConfigError("field training.decay = 'plateau' (halve the learning rate when the "
                          "validation loss stalls) needs held-out data: set data.validation")
    return config


def read_config(path: str | Path) -> Config:
    """Reads and validates a ``.toml``, ``.yaml`` or ``.yml`` configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no configuration file at {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
    else:
        raise ConfigError(f"{path}: expected a .toml, .yaml or .yml file")
    return parse_config(raw)


def build_prior(config: ModelConfig) -> Preconditioned:
    """The (untrained) prior that ``[model]`` describes."""
    backbone = build_model({"class": config.backbone, "config": config.backbone_args})
    shape = tuple(config.shape) if config.shape is not None else None
    return Preconditioned(backbone, schedule_from_config(config.schedule), config.sigma_data,
                          shape)


def load_array(path: str | Path, key: str | None = None) -> Tensor:
    """Reads a tensor from a ``.npy`` file (no pickles) or a ``.safetensors`` file (``key``
    names the tensor when there are several)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no data at {path}")
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if key is None:
            if len(tensors) != 1:
                raise ConfigError(f"{path} holds {sorted(tensors)}: set data.key")
            return next(iter(tensors.values()))
        if key not in tensors:
            raise ConfigError(f"{path} has no tensor {key!r} (it has {sorted(tensors)})")
        return tensors[key]
    raise ConfigError(f"unsupported data file {path}: expected .zarr, .npy or .safetensors")


def _dataset(config: DataConfig, path: str) -> Any:
    from . import data as data_module

    if path.endswith(".zarr") or Path(path).suffix == ".zarr":
        zarr_data = getattr(data_module, "ZarrData", None)
        if zarr_data is None:  # pragma: no cover - zarr support not installed
            raise ConfigError("reading .zarr needs plausible.data.ZarrData")
        source: Any = zarr_data(path, key=config.key, memory_budget=config.memory_budget)
    else:
        source = load_array(path, config.key).float()
    if config.window is not None:
        windows = data_module.Windows
        return windows(source, config.window, flatten=config.flatten_window)
    return source


def train(config: Config, resume: bool = False, progress: bool = True) -> dict[str, list]:
    """Builds the prior and the data of ``config`` and trains it with :func:`plausible.fit`,
    writing checkpoints to ``training.out``."""
    from .training import fit

    prior = build_prior(config.model)
    data = _dataset(config.data, config.data.path)
    validation = None
    v = config.data.validation
    if isinstance(v, str):
        validation = _dataset(config.data, v)
    elif isinstance(v, float):
        if not 0 < v < 1:
            raise ConfigError("field data.validation must be a fraction in (0, 1) or a path")
        if not isinstance(data, Tensor):
            raise ConfigError("a validation fraction needs in-memory data; give a path instead")
        n_val = max(1, int(round(v * data.shape[0])))
        perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))
        validation, data = data[perm[:n_val]], data[perm[n_val:]]
    t = config.training
    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)
    import dataclasses
    import json

    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    return fit(
        prior, data, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
        weight_decay=t.weight_decay, warmup=t.warmup, decay=t.decay, ema=t.ema, clip=t.clip,
        accumulate=t.accumulate, precision=t.precision, compile=t.compile,
        validation=validation, validate_every=t.validate_every, patience=t.patience,
        checkpoint=t.out,
        checkpoint_every=t.checkpoint_every, keep=t.keep, resume=resume, seed=t.seed,
        device=t.device, progress=progress, t_distribution=t.t_distribution,
        weighting=t.weighting,
    )
