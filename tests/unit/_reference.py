"""Independent reference implementations the tests compare against."""

import torch


def merge_2x2_by_loops(x_FPC: torch.Tensor) -> torch.Tensor:
    """The release's formula spelled out: pad rows then columns to even, and output token (j, i) of the
    half grid, in column-major order, is [x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]]."""
    frames, patches, channels = x_FPC.shape
    grid = int(round(patches**0.5))
    even = grid + grid % 2
    padded = torch.zeros(frames, even, even, channels, dtype=x_FPC.dtype)
    padded[:, :grid, :grid] = x_FPC.reshape(frames, grid, grid, channels)
    half = even // 2
    out = torch.zeros(frames, half * half, 4 * channels, dtype=x_FPC.dtype)
    for j in range(half):
        for i in range(half):
            out[:, j * half + i] = torch.cat(
                [
                    padded[:, 2 * i, 2 * j],
                    padded[:, 2 * i, 2 * j + 1],
                    padded[:, 2 * i + 1, 2 * j],
                    padded[:, 2 * i + 1, 2 * j + 1],
                ],
                dim=-1,
            )
    return out
