"""The `mlp_downsample` projector of LongVILA: 2x2 space-to-channel merge, then an MLP.

Shapes: F frames, P patches per frame (a square grid G x G), C vision width, D LLM width.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def merge_2x2(features_FPC: torch.Tensor) -> torch.Tensor:
    """Merge 2x2 neighbouring patches into one token of 4C channels, in the official release's order.

    The grid (rows a, columns b) is zero-padded to even sides. Output token (j, i) of the half-size grid,
    flattened column-major (index j * G/2 + i, as the release's permute leaves it), carries the channels
    [x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]]. Weights trained with that order only give the
    same numbers with the same order, so it is kept exactly.
    """
    frames, patches, channels = features_FPC.shape
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"mlp_downsample needs a square patch grid, got {patches} patches per frame")
    x = features_FPC.reshape(frames, grid, grid, channels)
    pad_rows, pad_cols = grid % 2, grid % 2
    if pad_rows or pad_cols:
        x = nn.functional.pad(x, (0, 0, 0, pad_cols, 0, pad_rows))
    half = (grid + 1) // 2
    # (F, rows, cols, C) -> (F, i, row_pair, j, col_pair, C) -> (F, j, i, row_pair, col_pair, C)
    x = x.reshape(frames, half, 2, half, 2, channels).permute(0, 3, 1, 2, 4, 5)
    return x.reshape(frames, half * half, 4 * channels)


class MLPDownsampleProjector(nn.Module):
    """`layers` keeps the release's indices: 1 LayerNorm, 2 Linear, 3 GELU, 4 Linear (0 is the merge)."""

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int) -> None:
        super().__init__()
        merged = 4 * vision_hidden_size
        self.layers = nn.Sequential(
            nn.Identity(),  # index 0: the 2x2 merge, which has no weights
            nn.LayerNorm(merged),
            nn.Linear(merged, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )

    def forward(self, features_FPC: torch.Tensor) -> torch.Tensor:
        """(F, P, C) vision features -> (F, ceil(G/2)^2, D) LLM embeddings."""
        x = merge_2x2(features_FPC)
        for layer in list(self.layers)[1:]:
            x = layer(x)
        return x
