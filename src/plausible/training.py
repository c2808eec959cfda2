r"""Training: :func:`fit`, one loop for every trainable model.

The loop minimises the model's own ``loss`` (for :class:`~plausible.denoisers.Preconditioned`
the denoising score-matching loss :math:`\mathbb{E}\, w(t) \|d(x_t, t) - x\|^2`) with AdamW,
a linear warm-up then cosine (or linear) learning-rate decay, gradient-norm clipping,
gradient accumulation, optional bf16 autocast and ``torch.compile``, and an exponential moving
average (EMA) of the weights, which is what one samples with.

Crash safety: with ``checkpoint="run/"`` the complete training state (weights, EMA,
optimizer, scheduler, every random generator) is written atomically every
``checkpoint_every`` steps (see :mod:`plausible.checkpoints`); ``resume=True`` continues from
the latest checkpoint and, on CPU, reproduces the uninterrupted run bit for bit.

Data parallel: under ``torchrun --nproc_per_node=N`` the same call trains with
``DistributedDataParallel`` (gloo on CPU, nccl on GPU). Every process draws the same global
batch (indices, times and noise, from generators seeded alike) and keeps its own slice, so
N processes follow single-process training with the same global batch up to floating-point
summation order; only rank 0 writes checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoints import (
    CheckpointError,
    latest_checkpoint,
    model_config,
    read_checkpoint,
    write_checkpoint,
)
from .data import as_dataset, random_split

__all__ = ["fit"]


class _LossModule(nn.Module):
    """Wraps ``model.loss`` as a forward pass, so that DistributedDataParallel sees it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, options: dict[str, Any]) -> Tensor:
        if isinstance(batch, tuple):
            return self.model.loss(*batch, **options)
        return self.model.loss(batch, **options)


def _slice(batch: Any, lo: int, hi: int) -> Any:
    if isinstance(batch, tuple):
        return tuple(b[lo:hi] for b in batch)
    return batch[lo:hi]


def _first(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, tuple) else batch


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _json_safe(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _json_safe(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_json_safe(v) for v in obj]
        return None


def fit(
    model: nn.Module,
    data: Any,
    steps: int = 10_000,
    batch_size: int = 256,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    decay: str = "cosine",
    ema: float = 0.999,
    clip: float | None = 1.0,
    accumulate: int = 1,
    precision: str = "fp32",
    compile: bool = False,
    validation: Any = None,
    validate_every: int | None = None,
    patience: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    keep: int = 2,
    resume: bool = False,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    log_every: int | None = None,
    progress: bool = True,
    **loss_options: Any,
) -> dict[str, list[float]]:
    r"""Trains ``model`` in place and loads its EMA weights at the end.

    Arguments:
        model: A trainable model with ``loss(batch..., **options)`` (for example
            ``plausible.Denoiser(net, schedule)``). If it has ``draw_noise(x, generator,
            **options)``, the loss noise is drawn for the global batch (exact data parallelism).
            A denoiser's unknown ``shape`` is set from the data.
        data: Training data: a tensor ``(N, *S)``, a tuple of tensors ``(theta, y)`` (pairs,
            for conditional models), or a dataset of :mod:`plausible.data`.
        steps: Total number of optimisation steps (also when resuming).
        batch_size: Global batch size of a step (over all processes and accumulation
            micro-batches); drawn uniformly with replacement.
        lr: Peak learning rate of AdamW. weight_decay: AdamW weight decay.
        warmup: Linear warm-up steps (default ``min(1000, steps // 10)``).
        decay: ``"cosine"``, ``"linear"`` (to zero at ``steps``), ``"constant"``, or
            ``"plateau"`` (needs ``validation``): constant, halved after every
            ``max(1, patience // 3)`` validations without a new best validation loss (3 without
            ``patience``), so that a run that early stopping ends has annealed its learning
            rate whatever ``steps`` is (with cosine or linear decay the learning rate at the
            stop depends on how far it is from ``steps``). The halvings are not restored by
            ``resume``.
        ema: EMA decay (``0`` disables it); the decay at step k is ``min(ema, (1 + k) /
            (10 + k))`` so that the first weights are forgotten.
        clip: Maximum gradient norm (``None``: no clipping).
        accumulate: Micro-batches per step (gradient accumulation).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the loss).
        compile: Compile the loss with ``torch.compile``.
        validation: Held-out data (same kinds as ``data``), or a fraction in (0, 1) of
            ``data`` to hold out at random (seeded by ``seed``); its loss, with the EMA weights
            and a fixed noise draw (so that losses of different steps compare), is logged every
            ``validate_every`` steps.
        validate_every: Steps between validations (default ``checkpoint_every``).
        patience: Early stopping: stop when the validation loss has not improved for
            ``patience`` validations in a row, and end with the weights (EMA) of the best
            validation. Small simulation budgets over-fit a fixed number of steps; this is
            what guards against it. Needs ``validation``. ``None``: run all ``steps``. (The
            best weights are kept in memory: a resumed run restarts the count.)
        checkpoint: Run folder for checkpoints and ``metrics.jsonl`` (``None``: none).
        checkpoint_every: Steps between checkpoints (and one at the end).
        keep: Number of step folders kept.
        resume: Continue from the latest checkpoint of ``checkpoint`` if there is one.
        seed: Seed of the batch indices, times and noise (``None``: random).
        device: Move the model there first (default: where its parameters are).
        log_every: Steps between metric lines and progress-bar updates (default ``steps //
            100``, at least 1).
        progress: Show a tqdm bar with the loss and the throughput.
        loss_options: Passed to ``model.draw_noise`` and ``model.loss`` (e.g. ``weighting``,
            ``t_distribution``).

    Returns:
        ``{"step": [...], "loss": [...], "val_step": [...], "val_loss": [...]}`` for the steps
        run by this call (losses averaged over the global batch); with early stopping also
        ``"stopped": [step]`` if it stopped before ``steps``.

    Raises:
        ValueError: On bad data or arguments; :class:`~plausible.checkpoints.CheckpointError`
            if ``checkpoint`` holds a run of another model, or holds a run and ``resume`` is
            false.
    """
    if not hasattr(model, "loss"):
        raise TypeError(f"{type(model).__name__} has no loss(): it is not trainable")
    if steps < 1 or batch_size < 1 or accumulate < 1:
        raise ValueError("steps, batch_size and accumulate must be positive")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    if decay not in ("cosine", "linear", "constant", "plateau"):
        raise ValueError(f"decay must be 'cosine', 'linear', 'constant' or 'plateau', got "
                         f"{decay!r}")
    if decay == "plateau" and validation is None:
        raise ValueError("decay='plateau' needs validation data or a held-out fraction")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if patience is not None and (validation is None or patience < 1):
        raise ValueError("patience (early stopping) needs validation data or a held-out "
                         f"fraction, and must be >= 1; got patience={patience}, "
                         f"validation={'None' if validation is None else 'given'}")
    dataset = as_dataset(data, getattr(model, "shape", None), "data")
    if getattr(model, "shape", "absent") is None and dataset.state_shape is not None:
        model.shape = tuple(dataset.state_shape)
    if isinstance(validation, float):
        split_seed = 0 if seed is None else seed
        dataset, val_set = random_split(dataset, validation,
                                        torch.Generator().manual_seed(split_seed + 3))
    else:
        val_set = as_dataset(validation, getattr(model, "shape", None), "validation") \
            if validation is not None else None

    rank, world = _distributed()
    if batch_size % (world * accumulate):
        raise ValueError(
            f"batch_size {batch_size} must be divisible by processes x accumulate = "
            f"{world} x {accumulate}"
        )
    if device is not None:
        model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    if world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)

    seed_value = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    noise_gen = torch.Generator(device=device).manual_seed(seed_value)
    data_gen = torch.Generator().manual_seed(seed_value + 1)

    # data-dependent set-up (e.g. a ConditionalDenoiser's standardisation and sampling space)
    # before the weight average copies the model; the same draw on every process
    prepare = getattr(model, "prepare", None)
    if callable(prepare):
        prepare(dataset, batch_size, torch.Generator().manual_seed(seed_value + 5))

    # the fused kernel (CPU and CUDA) takes 15 % off a small network's step on CPU
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                  fused=True if fused else None)
    warmup = min(1000, steps // 10) if warmup is None else warmup

    plateau = {"scale": 1.0, "best": math.inf, "stale": 0,
               "every": max(1, (patience or 9) // 3)}

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup * plateau["scale"]
        if decay in ("constant", "plateau"):
            return plateau["scale"]
        frac = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    averaged = copy.deepcopy(model).requires_grad_(False) if ema > 0 else None
    if averaged is not None:
        ema_params, live_params = list(averaged.parameters()), list(model.parameters())

    run = Path(checkpoint) if checkpoint is not None else None
    options = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup": warmup, "decay": decay, "ema": ema, "clip": clip, "accumulate": accumulate,
        "precision": precision, "seed": seed_value, "world": world,
        "loss_options": _json_safe(loss_options),
    }
    start = 0
    if run is not None:
        folder = latest_checkpoint(run)
        if folder is not None and not resume:
            raise CheckpointError(
                f"{run} already holds a run (latest checkpoint {folder.name}); pass resume=True "
                "(--resume on the command line) to continue it, or choose another folder"
            )
        if folder is not None:
            start = _restore(folder, model, averaged, optimizer, scheduler, noise_gen, data_gen,
                             options)
    engine: nn.Module = _LossModule(model)
    if world > 1:
        engine = nn.parallel.DistributedDataParallel(
            engine, device_ids=[device.index] if device.type == "cuda" else None
        )
    loss_fn = torch.compile(engine) if compile else engine
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16" else contextlib.nullcontext()
    )
    draw_noise = getattr(model, "draw_noise", None)
    log_every = max(1, steps // 100) if log_every is None else max(1, log_every)
    validate_every = validate_every or checkpoint_every
    shard = batch_size // world
    micro = shard // accumulate
    history: dict[str, list[float]] = {"step": [], "loss": [], "val_step": [], "val_loss": []}
    metrics = run / "metrics.jsonl" if run is not None and rank == 0 else None
    if metrics is not None:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics, start)

    best_loss, best_state, stale = math.inf, None, 0
    pending: list[Tensor] = []
    tick, seen = time.perf_counter(), 0
    bar = tqdm(range(start, steps), desc="training", disable=not progress or rank != 0,
               initial=start, total=steps)
    model.train()
    for step in bar:
        index = dataset.draw_indices(batch_size, data_gen)
        batch = dataset.batch(index, device=device, dtype=params[0].dtype)
        noise = draw_noise(_first(batch), noise_gen, **loss_options) if draw_noise else {}
        lo = rank * shard
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for k in range(accumulate):
            a, b = lo + k * micro, lo + (k + 1) * micro
            opts = {**loss_options, **{n: v[a:b] for n, v in noise.items()}}
            if not noise:
                opts["generator"] = noise_gen
            sync = k == accumulate - 1 or world == 1
            ctx = engine.no_sync() if not sync else contextlib.nullcontext()
            with ctx, autocast:
                loss = loss_fn(_slice(batch, a, b), opts) / accumulate
            loss.backward()
            total = total + loss.detach()
        if world > 1:
            dist.all_reduce(total)
            total = total / world
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        if averaged is not None:
            rate = 1 - min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, live_params, rate)
        pending.append(total)
        seen += batch_size
        done = step + 1
        if done % log_every == 0 or done == steps:
            losses = torch.stack(pending).tolist()
            if not all(math.isfinite(v) for v in losses):
                raise FloatingPointError(f"the training loss became non-finite by step {done}; "
                                         "lower lr or check the data")
            history["step"].extend(range(done - len(losses) + 1, done + 1))
            history["loss"].extend(losses)
            elapsed = time.perf_counter() - tick
            rate_s = seen / elapsed if elapsed > 0 else float("nan")
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", samples_s=f"{rate_s:.0f}",
                            refresh=False)
            line = {"step": done, "loss": sum(losses) / len(losses),
                    "lr": scheduler.get_last_lr()[0], "samples_per_s": rate_s}
            pending, tick, seen = [], time.perf_counter(), 0
            if val_set is not None and (done % validate_every == 0 or done == steps):
                val = _validation_loss(averaged or model, val_set, batch_size, seed_value,
                                       params[0].dtype, device, loss_options)
                history["val_step"].append(done)
                history["val_loss"].append(val)
                line["val_loss"] = val
                model.train()
                if decay == "plateau":
                    if val < plateau["best"]:
                        plateau["best"], plateau["stale"] = val, 0
                    else:
                        plateau["stale"] += 1
                        if plateau["stale"] >= plateau["every"]:
                            plateau["scale"], plateau["stale"] = plateau["scale"] / 2, 0
                            for group, base in zip(optimizer.param_groups,
                                                   scheduler.base_lrs, strict=True):
                                group["lr"] = base * lr_factor(done)
                if patience is not None:
                    if val < best_loss:
                        best_loss, stale = val, 0
                        best_state = copy.deepcopy((averaged or model).state_dict())
                    else:
                        stale += 1
            if metrics is not None:
                with open(metrics, "a") as f:
                    f.write(json.dumps(line) + "\n")
        if run is not None and rank == 0 and (done % checkpoint_every == 0 or done == steps):
            _save(run, done, model, averaged, optimizer, scheduler, noise_gen, data_gen, options,
                  keep)
        if patience is not None and stale >= patience:
            history["stopped"] = [float(done)]
            bar.set_postfix(stopped=f"no improvement for {patience} validations", refresh=True)
            break
    if best_state is not None:
        if run is not None and rank == 0:  # the run's last checkpoint samples with the best
            _save(run, done, model, averaged, optimizer, scheduler, noise_gen, data_gen,
                  options, keep, sampling=best_state)
        model.load_state_dict(best_state)
    elif averaged is not None:
        model.load_state_dict(averaged.state_dict())
    model.eval()
    if world > 1:
        dist.barrier()
    return history


def _validation_loss(model: nn.Module, val_set: Any, batch_size: int, seed: int,
                     dtype: torch.dtype, device: torch.device, options: dict) -> float:
    """Mean loss over the whole validation set with a fixed noise draw."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    total, count = 0.0, 0
    draw_noise = getattr(model, "draw_noise", None)
    with torch.no_grad():
        for lo in range(0, len(val_set), batch_size):
            index = torch.arange(lo, min(lo + batch_size, len(val_set)))
            batch = val_set.batch(index, device=device, dtype=dtype)
            opts = dict(options)
            if draw_noise is not None:
                opts.update(draw_noise(_first(batch), gen, **options))
            else:
                opts["generator"] = gen
            loss = _LossModule(model)(batch, opts)
            total += float(loss) * len(index)
            count += len(index)
    return total / max(count, 1)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines after ``step`` (left by a run that crashed after its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep))


def _save(run: Path, step: int, model: nn.Module, averaged: nn.Module | None,
          optimizer: torch.optim.Optimizer, scheduler: Any, noise_gen: torch.Generator,
          data_gen: torch.Generator, options: dict, keep: int,
          sampling: dict[str, Tensor] | None = None) -> None:
    tensors: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model/{k}"] = v
    if averaged is not None:
        for k, v in averaged.state_dict().items():
            tensors[f"ema/{k}"] = v
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/noise"] = noise_gen.get_state()
    tensors["rng/data"] = data_gen.get_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    state_json = {
        "options": options,
        "param_groups": opt_state["param_groups"],
        "scheduler": _json_safe({k: v for k, v in scheduler.state_dict().items()
                                 if k != "lr_lambdas"}),
    }
    if sampling is None:
        sampling = (averaged or model).state_dict()
    write_checkpoint(run, step, model, sampling, tensors, state_json, keep=keep)


def _restore(folder: Path, model: nn.Module, averaged: nn.Module | None,
             optimizer: torch.optim.Optimizer, scheduler: Any, noise_gen: torch.Generator,
             data_gen: torch.Generator, options: dict) -> int:
    tensors, state = read_checkpoint(folder)
    spec = model_config(model)
    if state.get("model") != spec:
        raise CheckpointError(
            f"the checkpoint in {folder} is of another model:\n  checkpoint: {state.get('model')}"
            f"\n  this model: {spec}"
        )
    changed = {k: (state["options"].get(k), v) for k, v in options.items()
               if state["options"].get(k) != v}
    if changed:
        warnings.warn(f"resuming with changed training options {changed}: the run will not "
                      "reproduce an uninterrupted one", stacklevel=3)

    def sub(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(sub("model/"), strict=True)
        if averaged is not None:
            averaged.load_state_dict(sub("ema/"), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights in {folder} do not fit this model: {error}") from None
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in sub("optim/").items():
        index, name = key.split("/", 1)
        opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    sched = scheduler.state_dict()
    sched.update({k: v for k, v in state["scheduler"].items() if k in sched})
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng/torch"])
    noise_gen.set_state(tensors["rng/noise"])
    data_gen.set_state(tensors["rng/data"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return int(state["step"])
