r"""U-Net backbone for 1-D, 2-D and 3-D field denoisers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embedding import TimeEmbedding, context_embedding
from .mlp import check_context

__all__ = ["UNet"]

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PADDINGS = ("circular", "zeros")


def groups_for(channels: int, maximum: int = 8) -> int:
    r"""Return the largest number of groups ``<= maximum`` that divides ``channels``."""
    for groups in range(min(maximum, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def conv(
    spatial: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: str = "zeros",
) -> nn.Module:
    r"""Return a "same" (for ``stride=1``) convolution of dimension ``spatial``."""
    return _CONVS[spatial](
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        padding_mode=padding,
    )


class ResBlock(nn.Module):
    r"""Convolutional residual block modulated (scale/shift) by an embedding.

    ``skip(x) + conv_2(drop(SiLU(GN(conv_1(SiLU(GN(x)))) * (1 + scale) + shift)))``.

    Arguments:
        in_channels: The number of input channels ``C_i``.
        out_channels: The number of output channels ``C_o``.
        embedding: The number of embedding features ``E``.
        spatial: The number of spatial dimensions.
        padding: The convolution padding mode.
        kernel_size: The convolution kernel size (odd).
        dropout: The dropout rate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding: int,
        spatial: int,
        padding: str,
        kernel_size: int,
        dropout: float,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups_for(in_channels), in_channels)
        self.conv1 = conv(spatial, in_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = nn.GroupNorm(groups_for(out_channels), out_channels, affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(embedding, 2 * out_channels))
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(spatial, out_channels, out_channels, kernel_size, padding=padding)
        if in_channels == out_channels:
            self.skip = nn.Identity()
        else:
            self.skip = conv(spatial, in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        r"""
        Arguments:
            x: The input, of shape ``(B, C_i, *L)``.
            emb: The embedding, of shape ``(B, E)``.

        Returns:
            The output, of shape ``(B, C_o, *L)``.
        """
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.modulation(emb).chunk(2, dim=-1)
        expand = (...,) + (None,) * (x.ndim - 2)
        h = self.norm2(h) * (1 + scale[expand]) + shift[expand]
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    r"""Multi-head self-attention over all spatial positions, with a residual connection.

    Arguments:
        channels: The number of channels ``C``.
        heads: The number of attention heads, which must divide ``C``.
        spatial: The number of spatial dimensions.
    """

    def __init__(self, channels: int, heads: int, spatial: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups_for(channels), channels)
        self.qkv = conv(spatial, channels, 3 * channels, kernel_size=1)
        self.proj = conv(spatial, channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        r"""
        Arguments:
            x: The input, of shape ``(B, C, *L)``.

        Returns:
            The output, of shape ``(B, C, *L)``.
        """
        b, c, *size = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, N, C / heads)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, *size)
        return x + self.proj(h)


class Level(nn.Module):
    r"""A sequence of residual blocks, each optionally followed by self-attention."""

    def __init__(self, blocks: Sequence[ResBlock], attention: Sequence[nn.Module] | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = None if attention is None else nn.ModuleList(attention)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, emb)
            if self.attention is not None:
                x = self.attention[i](x)
        return x


class UNet(nn.Module):
    r"""U-Net denoiser backbone for fields of 1, 2 or 3 spatial dimensions.

    The encoder has ``levels = len(hidden_channels)`` levels of residual blocks (GroupNorm,
    SiLU, convolutions, scale/shift modulation by the embedding of ``t`` plus the projected
    context); between levels the resolution is halved by a stride-2 convolution. The decoder
    mirrors it: nearest-neighbour upsampling followed by a convolution, concatenation of the
    encoder features of the same level (skip connection) and residual blocks. The lowest level
    has ``hidden_blocks[-1]`` blocks on each side and no concatenation. The output layer keeps
    its default initialisation, so the output is ``O(1)`` at initialisation.

    With ``padding="circular"`` every operation is equivariant to periodic shifts by multiples
    of ``2 ** (levels - 1)`` pixels (self-attention has no positional encoding).

    Arguments:
        in_channels: The number of input channels ``C``.
        out_channels: The number of output channels ``C'`` (defaults to ``in_channels``).
        hidden_channels: The number of channels at each level.
        hidden_blocks: The number of residual blocks at each level, or one number for all.
        spatial: The number of spatial dimensions (1, 2 or 3).
        padding: The convolution padding mode, ``"circular"`` (periodic) or ``"zeros"``.
        attention: The levels (0-based) at which self-attention follows each residual block.
        heads: The number of attention heads; must divide the channels of attention levels.
        context: The number of context features ``K``, or ``None`` for no context.
        embedding: The number of features ``E`` of the time (and context) embedding.
        kernel_size: The (odd) convolution kernel size.
        dropout: The dropout rate inside the residual blocks.

    Example:
        >>> net = UNet(2, hidden_channels=(16, 32), spatial=1)
        >>> net(torch.randn(4, 2, 32), torch.zeros(4)).shape
        torch.Size([4, 2, 32])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        hidden_channels: Sequence[int] = (32, 64, 128),
        hidden_blocks: int | Sequence[int] = 2,
        spatial: int = 2,
        padding: str = "circular",
        attention: Sequence[int] = (),
        heads: int = 4,
        context: int | None = None,
        embedding: int = 64,
        kernel_size: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()

        out_channels = in_channels if out_channels is None else out_channels
        hidden_channels = [int(c) for c in hidden_channels]
        levels = len(hidden_channels)
        if isinstance(hidden_blocks, int):
            blocks = [hidden_blocks] * levels
        else:
            blocks = [int(n) for n in hidden_blocks]
        attention = sorted({int(i) for i in attention})

        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}"
            )
        if levels < 1 or any(c < 1 for c in hidden_channels):
            raise ValueError(
                f"hidden_channels must be non-empty and positive, got {hidden_channels}"
            )
        if len(blocks) != levels or any(n < 0 for n in blocks):
            raise ValueError(
                f"hidden_blocks must be a non-negative int or a sequence of {levels} of them "
                f"(one per level), got {hidden_blocks}"
            )
        if spatial not in _CONVS:
            raise ValueError(f"spatial must be 1, 2 or 3, got {spatial}")
        if padding not in _PADDINGS:
            raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if any(not 0 <= i < levels for i in attention):
            raise ValueError(f"attention levels must be in [0, {levels}), got {attention}")
        for i in attention:
            if heads < 1 or hidden_channels[i] % heads != 0:
                raise ValueError(
                    f"heads={heads} must divide the {hidden_channels[i]} channels of attention "
                    f"level {i}"
                )
        if context is not None and context < 1:
            raise ValueError(f"context must be positive or None, got {context}")

        self.shape = None
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "hidden_channels": list(hidden_channels),
            "hidden_blocks": list(blocks),
            "spatial": int(spatial),
            "padding": str(padding),
            "attention": list(attention),
            "heads": int(heads),
            "context": None if context is None else int(context),
            "embedding": int(embedding),
            "kernel_size": int(kernel_size),
            "dropout": float(dropout),
        }
        self.in_channels = in_channels
        self.spatial = spatial
        self.levels = levels
        self.context_features = context

        self.time = TimeEmbedding(embedding)
        self.context = context_embedding(context, embedding)

        def level(c_in: int, c: int, n: int, i: int) -> Level:
            res = [
                ResBlock(
                    c_in if j == 0 else c, c, embedding, spatial, padding, kernel_size, dropout
                )
                for j in range(n)
            ]
            att = [SelfAttention(c, heads, spatial) for _ in range(n)] if i in attention else None
            return Level(res, att)

        c0 = hidden_channels[0]
        self.input = conv(spatial, in_channels, c0, kernel_size, padding=padding)

        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i, (c, n) in enumerate(zip(hidden_channels, blocks, strict=True)):
            c_prev = hidden_channels[max(i - 1, 0)]
            if i > 0:
                self.down.append(conv(spatial, c_prev, c, kernel_size, stride=2, padding=padding))
            # level 0 receives c0 channels from `self.input`, deeper levels c from `self.down`
            self.encoder.append(level(c, c, n, i))
            if i < levels - 1:
                c_next = hidden_channels[i + 1]
                self.up.append(conv(spatial, c_next, c, kernel_size, padding=padding))
                # skip connection: concatenation of the upsampled and encoder features
                self.decoder.append(level(2 * c, c, max(n, 1), i))
            else:
                self.decoder.append(level(c, c, n, i))

        self.output = nn.Sequential(
            nn.GroupNorm(groups_for(c0), c0),
            nn.SiLU(),
            conv(spatial, c0, out_channels, kernel_size, padding=padding),
        )

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor | None = None) -> Tensor:
        r"""
        Arguments:
            x: The input, of shape ``(B, C, *L)`` with ``len(L) == spatial`` and each size in
                ``L`` divisible by ``2 ** (levels - 1)``.
            t: The noise-level input, of shape ``()`` or ``(B,)``.
            context: The context, of shape ``(B, K)``; required iff ``context`` was given at
                construction.

        Returns:
            The output, of shape ``(B, C', *L)``.
        """
        if x.ndim != 2 + self.spatial or x.shape[1] != self.in_channels:
            dims = ", ".join(f"L{i + 1}" for i in range(self.spatial))
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, {dims}), got {tuple(x.shape)}"
            )
        divisor = 2 ** (self.levels - 1)
        size = tuple(x.shape[2:])
        if any(s % divisor != 0 for s in size):
            raise ValueError(
                f"spatial size {size} is not divisible by {divisor} = 2 ** (levels - 1) "
                f"with levels={self.levels}"
            )
        batch = x.shape[0]
        check_context(context, self.context_features, batch)

        emb = self.time(t, batch)
        if self.context is not None:
            emb = emb + self.context(context)

        h = self.input(x)
        skips = []
        for i, encode in enumerate(self.encoder):
            if i > 0:
                h = self.down[i - 1](h)
            h = encode(h, emb)
            skips.append(h)

        for i in reversed(range(self.levels)):
            if i < self.levels - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.up[i](h)
                h = torch.cat((h, skips[i]), dim=1)
            h = self.decoder[i](h, emb)

        return self.output(h)
