r"""Residual multi-layer perceptron backbone for vector-valued denoisers."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .embedding import TimeEmbedding, context_embedding

__all__ = ["ResMLP"]


def check_context(context: Tensor | None, features: int | None, batch: int) -> None:
    r"""Raise a :class:`ValueError` when ``context`` does not match the expected shape.

    Arguments:
        context: The context passed to ``forward``, or ``None``.
        features: The context size given at construction, or ``None`` for no context.
        batch: The batch size ``B``.
    """
    if features is None:
        if context is not None:
            raise ValueError(
                "this network was built without context (context=None) but a context of shape "
                f"{tuple(context.shape)} was given"
            )
        return
    if context is None:
        raise ValueError(f"a context of shape ({batch}, {features}) is required, got None")
    if context.ndim != 2 or tuple(context.shape) != (batch, features):
        raise ValueError(
            f"expected a context of shape ({batch}, {features}), got {tuple(context.shape)}"
        )


class ResBlock(nn.Module):
    r"""Pre-norm residual block modulated (FiLM-style) by an embedding.

    ``x + W_2 drop(SiLU(W_1 (LN(x) * (1 + scale) + shift)))`` with
    ``scale, shift = Linear(SiLU(emb))``.

    Arguments:
        features: The number of features ``H``.
        embedding: The number of embedding features ``E``.
        dropout: The dropout rate.
    """

    def __init__(self, features: int, embedding: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(features, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(embedding, 2 * features))
        self.mlp = nn.Sequential(
            nn.Linear(features, features),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(features, features),
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        r"""
        Arguments:
            x: The input, of shape ``(B, H)``.
            emb: The embedding, of shape ``(B, E)``.

        Returns:
            The output, of shape ``(B, H)``.
        """
        scale, shift = self.modulation(emb).chunk(2, dim=-1)
        return x + self.mlp(self.norm(x) * (1 + scale) + shift)


class ResMLP(nn.Module):
    r"""Residual MLP denoiser backbone for vectors.

    ``x`` is projected to ``hidden`` features, goes through ``blocks`` residual blocks
    (LayerNorm, FiLM scale/shift from the embedding of ``t`` plus the projected context,
    Linear-SiLU-Linear) and is projected back to ``features`` by LayerNorm-Linear. The output
    layer keeps its default initialisation, so the output is ``O(1)`` at initialisation.

    Arguments:
        features: The number of input (and output) features ``D``.
        hidden: The number of hidden features ``H``.
        blocks: The number of residual blocks.
        context: The number of context features ``C``, or ``None`` for no context.
        embedding: The number of features ``E`` of the time (and context) embedding.
        dropout: The dropout rate inside the residual blocks.

    Example:
        >>> import torch
        >>> net = ResMLP(3, context=5)
        >>> net(torch.randn(8, 3), torch.tensor(0.5), torch.randn(8, 5)).shape
        torch.Size([8, 3])
    """

    def __init__(
        self,
        features: int,
        hidden: int = 256,
        blocks: int = 3,
        context: int | None = None,
        embedding: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        if features < 1 or hidden < 1 or embedding < 1 or blocks < 0:
            raise ValueError(
                "features, hidden and embedding must be positive and blocks non-negative, got "
                f"features={features}, hidden={hidden}, embedding={embedding}, blocks={blocks}"
            )
        if context is not None and context < 1:
            raise ValueError(f"context must be positive or None, got {context}")

        self.shape = (features,)
        self.config: dict[str, Any] = {
            "features": int(features),
            "hidden": int(hidden),
            "blocks": int(blocks),
            "context": None if context is None else int(context),
            "embedding": int(embedding),
            "dropout": float(dropout),
        }
        self.context_features = context

        self.time = TimeEmbedding(embedding)
        self.context = context_embedding(context, embedding)

        self.input = nn.Linear(features, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, embedding, dropout) for _ in range(blocks))
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, features))

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor | None = None) -> Tensor:
        r"""
        Arguments:
            x: The input, of shape ``(B, D)``.
            t: The noise-level input, of shape ``()`` or ``(B,)``.
            context: The context, of shape ``(B, C)``; required iff ``context`` was given at
                construction.

        Returns:
            The output, of shape ``(B, D)``.
        """
        (features,) = self.shape
        if x.ndim != 2 or x.shape[-1] != features:
            raise ValueError(f"expected x of shape (B, {features}), got {tuple(x.shape)}")
        batch = x.shape[0]
        check_context(context, self.context_features, batch)

        emb = self.time(t, batch)
        if self.context is not None:
            emb = emb + self.context(context)

        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(h)
