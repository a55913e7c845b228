"""The 2D zigzag index math of sequence parallelism: which global tokens a (ring, ulysses) rank holds.

A leaf module (torch only), so that the layout (`mesh.py`), the attention (`hybrid.py`), the MM-SP methods
(`mmsp.py`) and benchmarks share one rule without importing each other. Shapes: T full sequence, S = T / (R * U).
"""

from __future__ import annotations

import torch


def zigzag_indices(
    total_len: int, ring_degree: int = 1, ulysses_degree: int = 1, ring_rank: int = 0, ulysses_rank: int = 0
) -> torch.Tensor:
    """Global token indices held by (ring_rank, ulysses_rank), in local order. Shape (S,).

    The sequence is cut into 2R chunks; ring rank r holds the pair [chunk r, chunk 2R-1-r]
    (under causal attention early chunks are cheap and late ones expensive, so pairing them
    balances the work). The pair, concatenated, is cut contiguously into U pieces, one per Ulysses
    rank, so that the Ulysses all-to-all (which concatenates pieces in Ulysses-rank order) rebuilds
    exactly [chunk r, chunk 2R-1-r] on every rank of ring rank r. With R = 1 the layout is the
    plain contiguous split.
    """
    check_sequence_length(total_len, ring_degree, ulysses_degree)
    if not (0 <= ring_rank < ring_degree and 0 <= ulysses_rank < ulysses_degree):
        raise ValueError(
            f"rank ({ring_rank}, {ulysses_rank}) outside degrees ({ring_degree}, {ulysses_degree})"
        )
    pair = ring_pair_indices(total_len, ring_degree, ring_rank)
    piece = pair.numel() // ulysses_degree
    return pair[ulysses_rank * piece : (ulysses_rank + 1) * piece]


def ring_pair_indices(total_len: int, ring_degree: int, ring_rank: int) -> torch.Tensor:
    """Global indices of [chunk r, chunk 2R-1-r] (the whole sequence when R = 1). Shape (T / R,)."""
    if ring_degree == 1:
        return torch.arange(total_len)
    chunk = total_len // (2 * ring_degree)
    first = torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk)
    second_start = (2 * ring_degree - 1 - ring_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk)])


def check_sequence_length(total_len: int, ring_degree: int, ulysses_degree: int) -> None:
    """T must cut into 2R equal chunks (R > 1) and each ring pair (T / R) into U equal pieces."""
    chunks = 2 * ring_degree if ring_degree > 1 else 1
    if total_len % chunks or total_len % (ring_degree * ulysses_degree):
        raise ValueError(
            f"sequence length {total_len} does not fit ring degree {ring_degree} x ulysses degree "
            f"{ulysses_degree}: it must be divisible by {chunks} and by {ring_degree * ulysses_degree} "
            f"(2 x ring x ulysses always works); pad the sequence"
        )
