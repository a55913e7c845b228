"""Ring attention over the zigzag layout: K/V pass around the ring, partial outputs merge by LSE.

Ring rank r holds queries and K/V for the chunk pair [r, 2R-1-r] of the full sequence (mesh.py).
At step i it holds the K/V of ring rank s = (r - i) mod R. Under causal attention (zigzag rule):
- step 0 (s = r): the local pair attends to itself causally (a square block, lower triangle);
- s < r: every local query sees the first received chunk (s < r) and none of the second
  (2R-1-s > 2R-1-r >= r): all queries x first half of K/V;
- s > r: the first local chunk (r) sees nothing, the second (2R-1-r) sees both received chunks:
  second half of the queries x all K/V.
Every block does the same amount of work, which is the point of the zigzag. Packed samples cut each
block further at their boundaries (which may fall anywhere in a chunk) into pieces that are full,
causal on a square diagonal or empty (`attention_pieces`): the fused kernel runs every piece without
a mask, and the pieces' partial outputs merge by LSE like the blocks do.

Backward: the K/V travel the ring again; each block's backward uses the *global* (merged) output and
LSE, and the dK/dV accumulated for a K/V pair (float32, float64 for float64 inputs) travel with it and
arrive back at their owner after R hops.

Shapes: B batch, S2 = T / R this ring rank's pair, N heads, H head dim. Inputs (B, S2, N, H);
kernel tensors (B, N, S2, H).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longvila.kernels.attention import (
    Piece,
    Run,
    accumulation_dtype,
    attend_pieces,
    attend_pieces_backward,
    attention_pieces,
)
from longvila.parallel.comm import RingComm

_KV_TAG, _DKV_TAG = 0, 1


def ring_pair_runs(total_len: int, ring_degree: int, ring_rank: int) -> tuple[Run, ...]:
    """The global runs of ring rank r's pair [chunk r, chunk 2R-1-r] (the whole sequence when R = 1)."""
    if ring_degree == 1:
        return ((0, total_len, 0),)
    chunk = total_len // (2 * ring_degree)
    second = (2 * ring_degree - 1 - ring_rank) * chunk
    return ((ring_rank * chunk, (ring_rank + 1) * chunk, 0), (second, second + chunk, chunk))


@dataclass
class RingPlan:
    """What the ring loop needs besides the tensors."""

    group: object
    """Ring process group (None when ring_degree == 1)."""
    ring_rank: int
    ring_degree: int
    causal: bool
    scale: float
    total_len: int
    """T, the full sequence length."""
    boundaries: tuple[int, ...] | None = None
    """Packed samples' bounds (0, b1, ..., bn), bn <= T (tokens from bn on are padding), host ints;
    None for a single unpadded sample (the plain causal fused path)."""

    def pieces(self, step: int) -> tuple[Piece, ...]:
        """The mask-free kernel calls of `step` (this rank's queries x the K/V of ring rank
        (r - step) mod R). Cached per (layout, boundaries): computed once per batch, not per layer."""
        src = (self.ring_rank - step) % self.ring_degree
        return attention_pieces(
            ring_pair_runs(self.total_len, self.ring_degree, self.ring_rank),
            ring_pair_runs(self.total_len, self.ring_degree, src),
            self.boundaries,
            self.causal,
        )


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
        acc = accumulation_dtype(q.dtype)
        out = torch.zeros(q_t.shape, dtype=acc, device=q.device)
        lse = torch.full(q_t.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        comm = RingComm(plan.group) if plan.ring_degree > 1 else None
        kv = torch.stack([k_t, v_t]) if plan.ring_degree > 1 else (k_t, v_t)
        aux_list = []
        for step in range(plan.ring_degree):
            last = step == plan.ring_degree - 1
            if not last:  # post the next K/V before computing on the current one
                next_kv = comm.exchange(kv, tag=_KV_TAG)
            aux_list.append(attend_pieces(q_t, kv[0], kv[1], plan.pieces(step), plan.scale, out, lse))
            if not last:
                comm.wait()
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.aux_list = plan, aux_list
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out_t, lse = ctx.saved_tensors
        plan = ctx.plan
        q_t, k_t, v_t, dout_t = (x.transpose(1, 2) for x in (q, k, v, dout))
        acc = accumulation_dtype(q.dtype)
        ring = plan.ring_degree
        kv_comm = RingComm(plan.group) if ring > 1 else None
        dkv_comm = RingComm(plan.group) if ring > 1 else None
        dq = torch.zeros(q_t.shape, dtype=acc, device=q.device)
        kv = torch.stack([k_t, v_t]) if ring > 1 else (k_t, v_t)
        dkv_received = None
        for step in range(ring):
            last = step == ring - 1
            if not last:
                next_kv = kv_comm.exchange(kv, tag=_KV_TAG)
            dkv_local = torch.zeros((2, *k_t.shape), dtype=acc, device=q.device)
            attend_pieces_backward(
                dout_t,
                q_t,
                kv[0],
                kv[1],
                out_t,
                lse,
                plan.pieces(step),
                ctx.aux_list[step],
                plan.scale,
                dq,
                dkv_local[0],
                dkv_local[1],
            )
            if step == 0:
                dkv = dkv_local
            else:  # dK/dV of this K/V pair from the ranks that held it before
                dkv_comm.wait()
                dkv = dkv_received + dkv_local
            if ring > 1:  # after the last step this sends every pair's dK/dV home
                dkv_received = dkv_comm.exchange(dkv, tag=_DKV_TAG)
            if not last:
                kv_comm.wait()
                kv = next_kv
        if ring > 1:
            dkv_comm.wait()
            dkv = dkv_received
        dk, dv = (x.to(k.dtype).transpose(1, 2) for x in dkv)
        return dq.to(q.dtype).transpose(1, 2), dk, dv, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:
    """Attention of this ring rank's pair. q (B, S2, Nq, H), k/v (B, S2, Nk, H) -> (B, S2, Nq, H).

    At ring degree 1 this is plain local attention (no communication): one causal fused call for a
    single sample, one call per sample for packed rows.
    """
    return _RingAttention.apply(q, k, v, plan)
