"""The downsampling projectors of the LongVILA / NVILA line: a k x k space-to-channel merge, then an MLP.

Shapes: F frames, P patches per frame (a square grid G x G), C vision width, D LLM width, k block side.

Three projector types exist in released checkpoints (docs/checkpoints.md has the table):

| type                     | block | MLP after the merge                                        | token order      |
|--------------------------|-------|------------------------------------------------------------|------------------|
| `mlp_downsample`         | 2x2   | LN(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)             | column or row    |
| `mlp_downsample_2x2_fix` | 2x2   | same as `mlp_downsample`                                   | row              |
| `mlp_downsample_3x3_fix` | 3x3   | LN(9C) -> Linear(9C, 3C) -> GELU -> LN(3C) -> Linear(3C, D) -> GELU -> Linear(D, D) | row |

The merge pads the grid with zeros to a multiple of k, and output token (i, j) of the reduced grid
carries the channels of the k x k block whose top-left patch is (k*i, k*j), read row by row:
[x[k*i, k*j], x[k*i, k*j+1], ..., x[k*i+k-1, k*j+k-1]]. The tokens are then flattened either
column-major (index j * G/k + i: the LongVILA release of 2024-08, whose merge stopped after one
permute) or row-major (index i * G/k + j: every VILA/NVILA release since 2024-12-12, which added a
second permute). Weights trained with one order give other numbers with the other, so the order is an
explicit setting, never inferred from the weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from longvila.config import FIXED_TOKEN_ORDER, PROJECTOR_BLOCK, TOKEN_ORDERS


def merge_blocks(features_FPC: torch.Tensor, block: int, token_order: str) -> torch.Tensor:
    """(F, G*G, C) -> (F, ceil(G/k)^2, k*k*C): merge k x k neighbouring patches into one token.

    See the module docstring for the channel layout and the two token orders.
    """
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
    frames, patches, channels = features_FPC.shape
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(
            f"the {block}x{block} merge needs a square patch grid, got {patches} patches per frame"
        )
    x = features_FPC.reshape(frames, grid, grid, channels)
    pad = (-grid) % block
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad, 0, pad))
    side = (grid + pad) // block
    # (F, rows, cols, C) -> (F, i, row_in_block, j, col_in_block, C)
    x = x.reshape(frames, side, block, side, block, channels)
    # row-major tokens: (F, i, j, r, c, C); column-major: (F, j, i, r, c, C)
    x = x.permute(0, 1, 3, 2, 4, 5) if token_order == "row" else x.permute(0, 3, 1, 2, 4, 5)
    return x.reshape(frames, side * side, block * block * channels)


def merge_2x2(features_FPC: torch.Tensor, token_order: str = "column") -> torch.Tensor:
    """The 2x2 merge; column order by default (the LongVILA 2024-08 release)."""
    return merge_blocks(features_FPC, 2, token_order)


def projector_block(projector_type: str) -> int:
    """Side k of the type's k x k merge."""
    if projector_type not in PROJECTOR_BLOCK:
        raise ValueError(f"projector type {projector_type!r} is not one of {tuple(PROJECTOR_BLOCK)}")
    return PROJECTOR_BLOCK[projector_type]


class DownsampleProjector(nn.Module):
    """k x k merge then the type's MLP. `layers` keeps the release's module indices (index 0 is the
    merge, which has no weights), so official `mm_projector` weights load under their own keys:
    `layers.{1,2,4}.*` for the 2x2 types, `layers.{1,2,4,5,7}.*` for `mlp_downsample_3x3_fix`."""

    def __init__(
        self,
        vision_hidden_size: int,
        llm_hidden_size: int,
        projector_type: str = "mlp_downsample",
        token_order: str = "column",
    ) -> None:
        super().__init__()
        self.block = projector_block(projector_type)
        fixed = FIXED_TOKEN_ORDER.get(projector_type)
        if token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
        if fixed is not None and token_order != fixed:
            raise ValueError(
                f"{projector_type} always uses {fixed}-major tokens, got token_order {token_order!r}"
            )
        self.projector_type = projector_type
        self.token_order = token_order
        c, d = vision_hidden_size, llm_hidden_size
        if self.block == 2:
            modules = [nn.LayerNorm(4 * c), nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d)]
        else:
            modules = [
                nn.LayerNorm(9 * c),
                nn.Linear(9 * c, 3 * c),
                nn.GELU(),
                nn.LayerNorm(3 * c),
                nn.Linear(3 * c, d),
                nn.GELU(),
                nn.Linear(d, d),
            ]
        self.layers = nn.Sequential(nn.Identity(), *modules)

    @property
    def out_weight(self) -> torch.Tensor:
        """The last Linear's weight (its dtype is the projector's)."""
        return self.layers[-1].weight

    def forward(self, features_FPC: torch.Tensor) -> torch.Tensor:
        """(F, P, C) vision features -> (F, ceil(G/k)^2, D) LLM embeddings."""
        x = merge_blocks(features_FPC, self.block, self.token_order)
        for layer in list(self.layers)[1:]:
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        return f"type={self.projector_type}, token_order={self.token_order}"


class MLPDownsampleProjector(DownsampleProjector):
    """`mlp_downsample` (2x2) in the LongVILA 2024-08 release's column order unless told otherwise."""

    def __init__(self, vision_hidden_size: int, llm_hidden_size: int, token_order: str = "column") -> None:
        super().__init__(vision_hidden_size, llm_hidden_size, "mlp_downsample", token_order)


def build_projector(config) -> DownsampleProjector:
    """The projector a `LongVILAConfig` describes."""
    return DownsampleProjector(
        config.vision_hidden_size, config.llm_hidden_size, config.projector_type, config.projector_token_order
    )
