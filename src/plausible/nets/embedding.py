r"""Embedding of the scalar noise-level input of a denoiser."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TimeEmbedding", "broadcast_time", "context_embedding"]



def broadcast_time(t: Tensor | float, batch: int | None = None) -> Tensor:
    r"""Return ``t`` as a floating tensor of shape ``(B,)``.

    Arguments:
        t: A noise-level input of shape ``()`` or ``(B,)`` (``(B, 1)`` is also accepted).
        batch: The batch size ``B`` expected by the caller. A 0-d ``t`` is expanded to it
            (to ``1`` when ``batch`` is ``None``); a 1-d ``t`` must have this length.

    Returns:
        A tensor of shape ``(B,)``.
    """
    t = torch.as_tensor(t)
    if not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if t.ndim == 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    if t.ndim == 0:
        return t.expand(1 if batch is None else batch)
    if t.ndim != 1:
        raise ValueError(f"expected t of shape () or (B,), got {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        if t.shape[0] == 1:
            return t.expand(batch)
        raise ValueError(f"expected t of shape () or ({batch},), got {tuple(t.shape)}")
    return t


class TimeEmbedding(nn.Module):
    r"""Sinusoidal (Fourier) embedding of a scalar input followed by a small MLP.

    The input ``t`` is expected to be roughly in ``[-3, 3]`` (EDM's ``c_noise = log(sigma) / 4``).
    It is mapped to ``[sin(w_k t), cos(w_k t)]`` for ``features // 2`` (at least one) angular
    frequencies ``w_k`` spaced geometrically in ``[0.1, 100]``, then through
    ``Linear -> SiLU -> Linear``.

    Arguments:
        features: The number of output features.
    """

    def __init__(self, features: int):
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be positive, got {features}")

        self.features = features
        n = max(features // 2, 1)
        freqs = torch.logspace(-1.0, 2.0, n) if n > 1 else torch.tensor([1.0])
        self.register_buffer("freqs", freqs, persistent=False)

        self.mlp = nn.Sequential(
            nn.Linear(2 * n, features),
            nn.SiLU(),
            nn.Linear(features, features),
        )

    def forward(self, t: Tensor | float, batch: int | None = None) -> Tensor:
        r"""
        Arguments:
            t: The noise-level input, of shape ``()`` or ``(B,)``.
            batch: The batch size ``B``; a 0-d ``t`` is broadcast to it.

        Returns:
            The embedding, of shape ``(B, features)``.
        """
        t = broadcast_time(t, batch).to(device=self.freqs.device)
        dtype = self.mlp[0].weight.dtype
        phase = t.to(dtype).unsqueeze(-1) * self.freqs.to(dtype)
        return self.mlp(torch.cat((phase.sin(), phase.cos()), dim=-1))

    def extra_repr(self) -> str:
        return f"features={self.features}"


def context_embedding(context: int | None, embedding: int) -> nn.Module | None:
    """The MLP ``Linear-SiLU-Linear`` that maps a context vector ``(B, context)`` to the
    embedding size ``(B, embedding)`` (added to the time embedding), or ``None`` without a
    context."""
    if context is None:
        return None
    return nn.Sequential(
        nn.Linear(context, embedding),
        nn.SiLU(),
        nn.Linear(embedding, embedding),
    )
