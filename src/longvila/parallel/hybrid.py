"""2D sequence-parallel attention: Ulysses inside a node, the zigzag ring across nodes.

With U = 1 this is pure ring attention, with R = 1 pure Ulysses, with both 1 plain local attention:
one code path for every layout.

Shapes: B batch, S this rank's share (T / (U * R)), N heads, H head dim; tensors (B, S, N, H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longvila.kernels.attention import boundaries_tuple
from longvila.parallel.ring import RingPlan, ring_attention
from longvila.parallel.ulysses import check_heads, gather_heads, replicate_kv_heads, scatter_heads
from longvila.parallel.zigzag import check_sequence_length
from longvila.plan.rules import sp_attention_comm_bytes

__all__ = ["sp_attention", "sp_attention_comm_bytes"]


@dataclass(frozen=True)
class _OneProcess:
    """The degree-1 layout `sp=None` stands for: what `SequenceParallel.single()` holds."""

    ulysses_degree: int = 1
    ring_degree: int = 1
    sp_degree: int = 1
    ring_rank: int = 0
    ring_group: None = None
    ulysses_group: None = None


_ONE_PROCESS = _OneProcess()


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sp: Any = None,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Sequence-parallel attention of this rank's zigzag share (see `SequenceParallel.shard`).

    q (B, S, Nq, H), k/v (B, S, Nk, H) -> (B, S, Nq, H) in q's dtype.
    cu_seqlens: global boundaries of packed samples (int, starting at 0, ending at T = S * U * R),
    a tensor or, better, a tuple of host ints (a tensor costs one copy to the host per call), the
    same on every rank and for every batch row; no token attends across them. Tokens at or after
    cu_seqlens[-1], if it ends early, are padding: they see nothing and output 0. No mask is built:
    the blocks are cut at the boundaries into fused-kernel pieces (`attention_pieces`).
    scale: softmax scale, default H ** -0.5. `sp`: a `SequenceParallel` (or any object with its degrees,
    ranks and groups); `None` means one process, as `SequenceParallel.single()` (not imported here: the
    layout imports this module through its MM-SP methods).
    """
    sp = _ONE_PROCESS if sp is None else sp
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q (B, S, Nq, H) and k, v (B, S, Nk, H); got {q.shape}, {k.shape}, {v.shape}"
        )
    ulysses, ring = sp.ulysses_degree, sp.ring_degree
    check_heads(q.shape[2], k.shape[2], ulysses)
    total_len = q.shape[1] * sp.sp_degree
    check_sequence_length(total_len, ring, ulysses)
    plan = RingPlan(
        group=sp.ring_group,
        ring_rank=sp.ring_rank,
        ring_degree=ring,
        causal=causal,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        total_len=total_len,
        boundaries=boundaries_tuple(cu_seqlens, total_len),
    )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    k, v = replicate_kv_heads(k, ulysses), replicate_kv_heads(v, ulysses)
    q, k, v = (scatter_heads(x, sp.ulysses_group) for x in (q, k, v))
    return gather_heads(ring_attention(q, k, v, plan), sp.ulysses_group)
