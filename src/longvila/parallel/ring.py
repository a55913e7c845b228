"""Ring attention over the zigzag layout: K/V pass around the ring, partial outputs merge by LSE.

Ring rank r holds queries and K/V for the chunk pair [r, 2R-1-r] of the full sequence (mesh.py).
At step i it holds the K/V of ring rank s = (r - i) mod R. Under causal attention (zigzag rule):
- step 0 (s = r): the local pair attends to itself causally (a square block, lower triangle);
- s < r: every local query sees the first received chunk (s < r) and none of the second
  (2R-1-s > 2R-1-r >= r): all queries x first half of K/V;
- s > r: the first local chunk (r) sees nothing, the second (2R-1-r) sees both received chunks:
  second half of the queries x all K/V.
Every block does the same amount of work, which is the point of the zigzag. Packed samples add a
segment mask to each block on top of this rule (boundaries may fall anywhere in a chunk).

Backward: the K/V travel the ring again; each block's backward uses the *global* (merged) output and
LSE, and the dK/dV accumulated for a K/V pair (float32, float64 for float64 inputs) travel with it and
arrive back at their owner after R hops.

Shapes: B batch, S2 = T / R this ring rank's pair, N heads, H head dim. Inputs (B, S2, N, H);
kernel tensors (B, N, S2, H).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longvila.parallel.attention import (
    accumulation_dtype,
    block_attention_backward,
    block_attention_forward,
    block_mask,
    merge_partial,
)
from longvila.parallel.comm import RingComm
from longvila.parallel.mesh import ring_pair_indices

_KV_TAG, _DKV_TAG = 0, 1


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
    segment_ids: torch.Tensor | None
    """(T,) sample index of every token (-1: padding), or None for a single unpadded sample."""

    def positions(self, ring_rank: int, device) -> torch.Tensor:
        return ring_pair_indices(self.total_len, self.ring_degree, ring_rank).to(device)

    def blocks(self, step: int, device):
        """(query slice, K/V slice, kernel causal flag, mask) for each block of `step`."""
        src = (self.ring_rank - step) % self.ring_degree
        full, pair_len = slice(None), self.total_len // self.ring_degree
        if not self.causal:
            parts = [(full, full, False)]
        elif step == 0:
            parts = [(full, full, True)]
        elif src < self.ring_rank:
            parts = [(full, slice(0, pair_len // 2), False)]
        else:
            parts = [(slice(pair_len // 2, None), full, False)]
        if self.segment_ids is None:
            return [(qs, ks, causal, None) for qs, ks, causal in parts]
        q_pos, k_pos = self.positions(self.ring_rank, device), self.positions(src, device)
        seg = self.segment_ids.to(device)
        result = []
        for qs, ks, causal in parts:
            mask = block_mask(q_pos[qs], k_pos[ks], seg[q_pos[qs]], seg[k_pos[ks]], causal)
            if mask.any():  # a block no query may see is skipped, in forward and backward alike
                result.append((qs, ks, False, mask))
        return result


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    return x[:, :, rows]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
        acc = accumulation_dtype(q.dtype)
        out = torch.zeros(q_t.shape, dtype=acc, device=q.device)
        lse = torch.full(q_t.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        comm = RingComm(plan.group) if plan.ring_degree > 1 else None
        kv = torch.stack([k_t, v_t])
        aux_list = []
        for step in range(plan.ring_degree):
            last = step == plan.ring_degree - 1
            if not last:  # post the next K/V before computing on the current one
                next_kv = comm.exchange(kv, tag=_KV_TAG)
            for qs, ks, causal, mask in plan.blocks(step, q.device):
                block_out, block_lse, aux = block_attention_forward(
                    _rows(q_t, qs),
                    _rows(kv[0], ks),
                    _rows(kv[1], ks),
                    scale=plan.scale,
                    causal=causal,
                    mask=mask,
                )
                out[:, :, qs], lse[:, :, qs] = merge_partial(
                    _rows(out, qs), _rows(lse, qs), block_out, block_lse
                )
                aux_list.append(aux)
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
        plan, aux_iter = ctx.plan, iter(ctx.aux_list)
        q_t, k_t, v_t, dout_t = (x.transpose(1, 2) for x in (q, k, v, dout))
        acc = accumulation_dtype(q.dtype)
        ring = plan.ring_degree
        kv_comm = RingComm(plan.group) if ring > 1 else None
        dkv_comm = RingComm(plan.group) if ring > 1 else None
        dq = torch.zeros(q_t.shape, dtype=acc, device=q.device)
        kv = torch.stack([k_t, v_t])
        dkv_received = None
        for step in range(ring):
            last = step == ring - 1
            if not last:
                next_kv = kv_comm.exchange(kv, tag=_KV_TAG)
            dkv_local = torch.zeros(kv.shape, dtype=acc, device=q.device)
            for qs, ks, causal, mask in plan.blocks(step, q.device):
                dq_b, dk_b, dv_b = block_attention_backward(
                    _rows(dout_t, qs),
                    _rows(q_t, qs),
                    _rows(kv[0], ks),
                    _rows(kv[1], ks),
                    _rows(out_t, qs),
                    _rows(lse, qs),
                    next(aux_iter),
                    scale=plan.scale,
                    causal=causal,
                    mask=mask,
                )
                dq[:, :, qs] += dq_b
                dkv_local[0][:, :, ks] += dk_b
                dkv_local[1][:, :, ks] += dv_b
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

    At ring degree 1 this is plain local attention (one block, no communication).
    """
    return _RingAttention.apply(q, k, v, plan)
