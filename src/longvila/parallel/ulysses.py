"""Ulysses: an all-to-all that trades a sequence split for a head split, and back.

Before attention every Ulysses rank holds S tokens of all heads; after `scatter_heads` it holds the
U*S tokens of its ring rank's pair (pieces concatenated in Ulysses-rank order) for N/U heads.
`gather_heads` is the inverse. Both are differentiable (the backward of one is the other).

GQA: query heads must divide by U. K/V heads must divide by U, or divide U; in the second case each
K/V head is replicated U / Nk times first (autograd sums the replicas' gradients back), so every
Ulysses rank gets one K/V head serving its N/U query heads.

Shapes: B batch, S this rank's share, N heads, H head dim; tensors (B, S, N, H).
"""

from __future__ import annotations

import torch

from longvila.parallel.comm import all_to_all
from longvila.plan.rules import ulysses_head_problems


def check_heads(num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> None:
    """Raise ValueError when the heads do not fit the Ulysses degree (the rule of `plan.rules`)."""
    problems = ulysses_head_problems(num_q_heads, num_kv_heads, ulysses_degree)
    if problems:
        raise ValueError(problems[0])


def replicate_kv_heads(x: torch.Tensor, ulysses_degree: int) -> torch.Tensor:
    """(B, S, Nk, H) -> (B, S, max(Nk, U), H): repeat each K/V head when U exceeds the K/V heads.

    Query head n uses K/V head n // (Nq / Nk); with the repeat, Ulysses rank j gets replica j of
    head j // (U / Nk), which is the K/V head of exactly its query heads.
    """
    num_kv_heads = x.shape[2]
    if num_kv_heads >= ulysses_degree:
        return x
    return x.repeat_interleave(ulysses_degree // num_kv_heads, dim=2)


def scatter_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, S, N, H) -> (B, U*S, N/U, H): gather the sequence, scatter the heads."""
    return all_to_all(x, scatter_dim=2, gather_dim=1, group=group)


def gather_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, U*S, N/U, H) -> (B, S, N, H): the inverse of `scatter_heads`."""
    return all_to_all(x, scatter_dim=1, gather_dim=2, group=group)
