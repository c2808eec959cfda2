r"""Training of denoisers: :func:`fit`, one loop for every trainable model.

The loop minimises the model's own loss (for :class:`~plausible.denoisers.Preconditioned`,
the denoising score-matching loss :math:`\mathbb{E}\, w(t) \|d(x_t, t) - x\|^2`) with AdamW,
a linear warm-up then cosine learning-rate decay, gradient-norm clipping, and an exponential
moving average (EMA) of the weights, which is loaded into the model at the end (EMA weights
are what one samples with).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .denoisers import Denoiser

__all__ = ["fit"]


def fit(
    denoiser: Denoiser,
    data: Tensor,
    steps: int = 10_000,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    ema: float = 0.999,
    clip: float | None = 1.0,
    seed: int | None = 0,
    progress: bool = True,
    **loss_options: Any,
) -> dict[str, list[float]]:
    r"""Trains ``denoiser`` in place on in-memory data and loads its EMA weights at the end.

    Arguments:
        denoiser: A trainable denoiser with a ``loss(x, generator=...)`` method (for example
            ``plausible.Denoiser(net, schedule)``). Its ``shape`` is set from the data when
            unknown.
        data: Training states, shape ``(N, *S)``, finite.
        steps: Number of optimisation steps.
        batch_size: States per step (drawn uniformly with replacement).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup: Linear warm-up steps (default ``min(1000, steps // 10)``), then cosine decay
            to zero.
        ema: EMA decay of the weights (``0`` disables the EMA); the decay at step k is
            ``min(ema, (1 + k) / (10 + k))`` so that early weights are forgotten.
        clip: Maximum gradient norm (``None`` disables clipping).
        seed: Seed of the batch, time and noise draws (``None``: torch's global RNG).
        progress: Show a tqdm progress bar with the loss.
        loss_options: Passed to ``denoiser.loss`` (e.g. ``weighting``, ``t_distribution``).

    Returns:
        ``{"loss": [...]}``, the training loss at every step.
    """
    if not hasattr(denoiser, "loss"):
        raise TypeError(f"{type(denoiser).__name__} has no loss(): it is not trainable")
    if not isinstance(data, Tensor) or not data.is_floating_point() or data.dim() < 2:
        raise ValueError("data must be a floating-point tensor of shape (N, *S)")
    if not torch.isfinite(data).all():
        raise ValueError("data contains NaN or infinity")
    if denoiser.shape is None:
        denoiser.shape = tuple(data.shape[1:])
    elif tuple(data.shape[1:]) != tuple(denoiser.shape):
        raise ValueError(
            f"data must have shape (N, {', '.join(map(str, denoiser.shape))}), got "
            f"{tuple(data.shape)}"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")

    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the denoiser has no trainable parameters")
    device = params[0].device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    data_device = data.device
    data_generator = torch.Generator(device=data_device)
    data_generator.manual_seed(seed if seed is not None else int(generator.initial_seed()))

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = min(1000, steps // 10) if warmup is None else warmup

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    averaged = copy.deepcopy(denoiser) if ema > 0 else None
    if averaged is not None:
        averaged.requires_grad_(False)

    history: dict[str, list[float]] = {"loss": []}
    denoiser.train()
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        index = torch.randint(0, data.shape[0], (batch_size,), generator=data_generator,
                              device=data_device)
        x = data[index].to(device=device, dtype=params[0].dtype)
        loss = denoiser.loss(x, generator=generator, **loss_options)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {float(loss)}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        if averaged is not None:
            decay = min(ema, (1 + step) / (10 + step))  # warm-up of the average
            with torch.no_grad():
                for p_avg, p in zip(averaged.parameters(), denoiser.parameters()):
                    p_avg.lerp_(p, 1 - decay)
        history["loss"].append(float(loss.detach()))
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", refresh=False)
    if averaged is not None:
        denoiser.load_state_dict(averaged.state_dict())
    denoiser.eval()
    return history
