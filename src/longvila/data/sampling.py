"""The one uniform frame-sampling rule, shared by every path that picks frames.

LongVILA samples N frames uniformly over the whole video: indices on `linspace(0, total - 1, N)`,
rounded to the nearest frame (docs/data.md, "Sampling rule"). Ties (x.5) round **up**, so the rule
is `floor(linspace(0, total - 1, N) + 0.5)`, computed in exact integers. A video given as a path (any decoder backend), the same
frames given as an array, and a chat turn's frames all go through `uniform_indices`, so they pick the
same frames; tests/unit/test_processor.py checks every (total, N) below 64.

A leaf module (numpy only), so the processor, the decoders and the chat session can all import it.
"""

from __future__ import annotations

import numpy as np


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` frame indices (int64, (num_frames,), non-decreasing) spread over `range(total)`.

    When `num_frames > total` indices repeat, so the result always has exactly `num_frames` entries.
    """
    if total < 1:
        raise ValueError(f"cannot sample from {total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames == 1:
        return np.zeros(1, dtype=np.int64)
    # Exact integers: floor(i * (total - 1) / (N - 1) + 1/2). Float linspace misses exact halves
    # (14 frames, 47 asked: 23 * 13 / 46 = 6.5 comes out 6.4999...) and would round them down.
    i = np.arange(num_frames, dtype=np.int64)
    return (2 * i * (total - 1) + (num_frames - 1)) // (2 * (num_frames - 1))


def sample_frame_array(
    frames: np.ndarray, num_frames: int | None, max_frames: int | None = None
) -> np.ndarray:
    """Frames given as an array (T, H, W, 3), sampled exactly as `decode_frames` samples a path.

    `num_frames=N`: `frames[uniform_indices(T, N)]` (N frames, repeats when N > T). Otherwise, with no
    timestamps to sample by, all frames, thinned uniformly to `max_frames` when more remain.
    """
    if num_frames is not None:
        return frames[uniform_indices(frames.shape[0], num_frames)]
    if max_frames is not None and frames.shape[0] > max_frames:
        return frames[uniform_indices(frames.shape[0], max_frames)]
    return frames
