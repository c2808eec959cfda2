r"""Checkpoints that survive crashes and load without unpickling.

A checkpoint folder ``run/`` holds

.. code-block:: text

    run/latest.json               {"step": 2000, "folder": "step-00002000"}
    run/step-00002000/model.safetensors   weights to sample with (EMA), config in metadata
    run/step-00002000/model.json          the model's config (class and arguments)
    run/step-00002000/state.safetensors   training state tensors (raw weights, optimizer,
                                          EMA, random generators)
    run/step-00002000/state.json          step, optimizer hyper-parameters, scheduler, options
    run/step-00002000/manifest.json       size and SHA-256 of each file above
    run/metrics.jsonl                     one JSON line of metrics per logged step

A step folder is written under a temporary name, every file flushed and fsynced, then renamed;
``latest.json`` is replaced atomically last. A crash at any moment leaves the previous
checkpoint intact and ``latest.json`` pointing to a complete folder. Loading checks the
manifest (a truncated or altered file is reported, never half-read) and only ever parses JSON
and safetensors: nothing is unpickled.

Models are rebuilt from their config by a registry of classes (:func:`register`); the
built-in denoisers and backbones are registered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import nets
from .denoisers import GaussianDenoiser, GaussianMixtureDenoiser, Preconditioned
from .schedules import schedule_from_config

__all__ = [
    "CheckpointError",
    "register",
    "model_config",
    "build_model",
    "save_model",
    "load",
    "write_checkpoint",
    "read_checkpoint",
    "latest_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, altered, or of another model."""


Builder = Callable[[dict[str, Any], dict[str, Tensor]], nn.Module]
_REGISTRY: dict[str, tuple[type, Callable[[nn.Module], dict[str, Any]], Builder]] = {}


def register(
    cls: type,
    to_config: Callable[[nn.Module], dict[str, Any]] | None = None,
    from_config: Builder | None = None,
    name: str | None = None,
) -> type:
    """Registers a module class so that checkpoints of it can be rebuilt by :func:`load`.

    Arguments:
        cls: The ``nn.Module`` subclass.
        to_config: ``module -> JSON-serialisable dict`` (default: the module's ``config``
            attribute, the keyword arguments of its constructor).
        from_config: ``(config, tensors) -> module`` (default: ``cls(**config)``; the weights
            are loaded afterwards in any case).
        name: Registry key (default: the class name).
    """
    key = name or cls.__name__

    def default_to(module: nn.Module) -> dict[str, Any]:
        config = getattr(module, "config", None)
        if not isinstance(config, dict):
            raise TypeError(f"{cls.__name__} has no `config` dict; register it with to_config=")
        return dict(config)

    def default_from(config: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
        return cls(**config)

    _REGISTRY[key] = (cls, to_config or default_to, from_config or default_from)
    return cls


def model_config(model: nn.Module) -> dict[str, Any]:
    """``{"class": name, "config": {...}}`` of a registered module (JSON-serialisable)."""
    for key, (cls, to_config, _) in _REGISTRY.items():
        if type(model) is cls:
            return {"class": key, "config": to_config(model)}
    raise TypeError(
        f"{type(model).__name__} is not registered for checkpoints; call "
        f"plausible.checkpoints.register({type(model).__name__}) first"
    )


#: Registered classes of plausible's lazily imported modules: the module that registers them,
#: imported on demand so that ``load`` works in a fresh process.
_PROVIDERS = {"ConditionalDenoiser": "amortized", "MLPEmbedding": "amortized"}


def build_model(spec: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> nn.Module:
    """Rebuilds a module from :func:`model_config`'s output (weights not loaded)."""
    if not isinstance(spec, dict) or "class" not in spec or "config" not in spec:
        raise CheckpointError(f"invalid model config: expected {{'class', 'config'}}, got {spec}")
    if spec["class"] not in _REGISTRY and spec["class"] in _PROVIDERS:
        import importlib

        importlib.import_module(f"plausible.{_PROVIDERS[spec['class']]}")
    if spec["class"] not in _REGISTRY:
        raise CheckpointError(
            f"unknown model class {spec['class']!r} in checkpoint; known: {sorted(_REGISTRY)} "
            "(register custom classes with plausible.checkpoints.register)"
        )
    _, _, from_config = _REGISTRY[spec["class"]]
    return from_config(spec["config"], tensors or {})


# -- built-in classes ---------------------------------------------------------------------

register(nets.ResMLP)
register(nets.UNet)


def _preconditioned_to(model: Preconditioned) -> dict[str, Any]:
    return {
        "backbone": model_config(model.backbone),
        "schedule": model.schedule.config,
        "sigma_data": model.sigma_data,
        "shape": list(model.shape) if model.shape is not None else None,
    }


def _preconditioned_from(config: dict[str, Any], tensors: dict[str, Tensor]) -> Preconditioned:
    prefix = "backbone."
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return Preconditioned(
        build_model(config["backbone"], sub),
        schedule_from_config(config["schedule"]),
        sigma_data=config["sigma_data"],
        shape=tuple(config["shape"]) if config["shape"] is not None else None,
    )


register(Preconditioned, _preconditioned_to, _preconditioned_from)


def _gaussian_to(model: GaussianDenoiser) -> dict[str, Any]:
    return {"schedule": model.schedule.config, "shape": list(model.shape), "kind": model.kind}


def _gaussian_from(config: dict[str, Any], tensors: dict[str, Tensor]) -> GaussianDenoiser:
    need = {"dense": ("Q", "lam"), "diag": ("lam",), "lowrank": ("U", "d")}[config["kind"]]
    missing = [k for k in ("mean", *need) if k not in tensors]
    if missing:
        raise CheckpointError(f"GaussianDenoiser checkpoint lacks tensors {missing}")
    if config["kind"] == "dense":
        cov = (tensors["Q"] * tensors["lam"]) @ tensors["Q"].T
    elif config["kind"] == "diag":
        cov = tensors["lam"]
    else:
        cov = (tensors["U"], tensors["d"])
    return GaussianDenoiser(
        tensors["mean"].reshape(config["shape"]), cov, schedule_from_config(config["schedule"])
    )


register(GaussianDenoiser, _gaussian_to, _gaussian_from)


def _mixture_from(config: dict[str, Any], tensors: dict[str, Tensor]) -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(
        tensors["log_weights"].exp(), tensors["means"], tensors["covs"],
        schedule_from_config(config["schedule"]),
    )


register(
    GaussianMixtureDenoiser, lambda m: {"schedule": m.schedule.config}, _mixture_from
)


# -- files --------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _replace_json(path: Path, obj: Any) -> None:
    """Atomically replaces ``path`` by the JSON of ``obj`` (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    _write_json(tmp, obj)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous, un-aliased CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    save_file(_tensors(tensors), str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_model(model: nn.Module, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Writes ``model.safetensors`` + ``model.json`` + ``manifest.json`` into ``folder``
    (atomically: a temporary folder renamed into place). Returns the folder."""
    folder = Path(folder)
    spec = model_config(model)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(tmp / "model.safetensors", model.state_dict(), {"plausible": json.dumps(spec)})
    _write_json(tmp / "model.json", {**spec, **({"extra": extra} if extra else {})})
    _write_manifest(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    return folder


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.name != "manifest.json")
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_json(folder / "manifest.json", manifest)
    _fsync_dir(folder)


def _verify(folder: Path, names: tuple[str, ...]) -> None:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: manifest.json is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {error}") from None
    for name in names:
        path = folder / name
        if name not in manifest:
            raise CheckpointError(f"{folder}/manifest.json does not list {name}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        size = path.stat().st_size
        if size != manifest[name]["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} has {size} bytes, expected {manifest[name]['bytes']} "
                "(truncated or replaced)"
            )
        if _sha256(path) != manifest[name]["sha256"]:
            raise CheckpointError(f"checkpoint file {path} does not match its SHA-256 (altered)")


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def latest_checkpoint(run: str | os.PathLike) -> Path | None:
    """The folder of the latest complete checkpoint of ``run`` (``None`` if there is none)."""
    run = Path(run)
    pointer = run / "latest.json"
    if not pointer.is_file():
        return None
    try:
        folder = run / json.loads(pointer.read_text())["folder"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{pointer} is corrupt: {error}") from None
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} points to {folder}, which does not exist")
    return folder


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if (path / "latest.json").is_file():
        folder = latest_checkpoint(path)
        assert folder is not None
        return folder
    if (path / "manifest.json").is_file() or (path / "model.safetensors").is_file():
        return path
    raise CheckpointError(
        f"{path} holds no checkpoint (expected latest.json or model.safetensors + manifest.json)"
    )


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuilds a model from a checkpoint folder (a run folder or one step folder), with its
    sampling (EMA) weights, in eval mode. Only JSON and safetensors are read.

    Raises:
        CheckpointError: If files are missing, truncated or altered, or the weights do not fit
            the model the config describes.
    """
    folder = _resolve(path)
    _verify(folder, ("model.safetensors", "model.json"))
    try:
        spec = json.loads((folder / "model.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder}/model.json is not valid JSON: {error}") from None
    tensors = _load_tensors(folder / "model.safetensors")
    model = build_model(spec, tensors)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights in {folder} do not fit {spec['class']}: {error}") from None
    return model.to(map_location).eval()


def write_checkpoint(
    run: str | os.PathLike,
    step: int,
    model: nn.Module,
    sampling_state: dict[str, Tensor],
    state_tensors: dict[str, Tensor],
    state_json: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Writes a complete step folder then points ``latest.json`` to it; keeps the ``keep``
    newest step folders. ``sampling_state`` is the state dict saved as the model's weights
    (the EMA weights)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = run / name
    tmp = run / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    spec = model_config(model)
    _save_tensors(tmp / "model.safetensors", sampling_state, {"plausible": json.dumps(spec)})
    _write_json(tmp / "model.json", spec)
    _save_tensors(tmp / "state.safetensors", state_tensors, {"step": str(step)})
    _write_json(tmp / "state.json", {**state_json, "step": step, "model": spec})
    _write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run)
    _replace_json(run / "latest.json", {"step": step, "folder": name})
    # prune: older step folders beyond `keep`, and temporaries of dead writers
    steps = sorted(p for p in run.glob("step-*") if p.is_dir() and ".tmp-" not in p.name)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in run.glob("step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verified training state of a step folder: ``(state tensors, state json)``."""
    _verify(folder, ("model.safetensors", "model.json", "state.safetensors", "state.json"))
    try:
        state_json = json.loads((folder / "state.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder}/state.json is not valid JSON: {error}") from None
    return _load_tensors(folder / "state.safetensors"), state_json
