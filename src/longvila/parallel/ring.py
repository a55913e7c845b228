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

The schedule lives in one place: `ring_forward_steps` / `ring_backward_steps` are one rank's loop,
written against a transport (`exchange` posts a send to the next rank and a receive from the previous
one, `wait` completes them). Under torch.distributed the transport is `RingComm` (batched isend/irecv)
and the loop runs straight through; `simulate_ring_attention` runs every rank's loop on one device in
lockstep with an in-process transport (`LocalRing`), which is what benchmarks/attention.py times.

Shapes: B batch, S2 = T / R this ring rank's pair, N heads, H head dim. Inputs (B, S2, N, H);
kernel tensors (B, N, S2, H).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from typing import Protocol

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
from longvila.parallel.zigzag import ring_pair_indices

_KV_TAG, _DKV_TAG = 0, 1


def ring_pair_runs(total_len: int, ring_degree: int, ring_rank: int) -> tuple[Run, ...]:
    """The global runs of ring rank r's pair [chunk r, chunk 2R-1-r] (the whole sequence when R = 1)."""
    if ring_degree == 1:
        return ((0, total_len, 0),)
    chunk = total_len // (2 * ring_degree)
    second = (2 * ring_degree - 1 - ring_rank) * chunk
    return ((ring_rank * chunk, (ring_rank + 1) * chunk, 0), (second, second + chunk, chunk))


@dataclasses.dataclass
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


class RingTransport(Protocol):
    """One rank's link in the ring: send to the next rank, receive from the previous one."""

    def exchange(self, tensor: torch.Tensor, tag: int = 0) -> torch.Tensor:
        """Post sending `tensor` and receiving one of the same shape; returns the receive buffer, which
        holds the previous rank's tensor once `wait` has returned (it must not be read before)."""
        ...

    def wait(self) -> None:
        """Complete every exchange posted since the last wait."""
        ...


RingSteps = Generator[RingTransport, None, tuple]
"""One rank's loop: yields the transport each time it must wait for its posted exchanges (the driver
then completes them), returns its results."""


def ring_forward_steps(
    q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, plan: RingPlan, comm: RingTransport | None
) -> RingSteps:
    """This rank's forward: q_t (B, N, S2, H), k_t/v_t (B, Nk, S2, H) kernel tensors -> returns (out
    (B, N, S2, H), lse (B, N, S2), both in the accumulation dtype, the pieces' saved state per step).

    At each step the next K/V is posted before the current one is computed on (overlap)."""
    acc = accumulation_dtype(q_t.dtype)
    out = torch.zeros(q_t.shape, dtype=acc, device=q_t.device)
    lse = torch.full(q_t.shape[:-1], float("-inf"), dtype=acc, device=q_t.device)
    kv = torch.stack([k_t, v_t]) if plan.ring_degree > 1 else (k_t, v_t)
    aux_list = []
    for step in range(plan.ring_degree):
        last = step == plan.ring_degree - 1
        if not last:  # post the next K/V before computing on the current one
            next_kv = comm.exchange(kv, tag=_KV_TAG)
        aux_list.append(attend_pieces(q_t, kv[0], kv[1], plan.pieces(step), plan.scale, out, lse))
        if not last:
            yield comm
            kv = next_kv
    return out, lse, aux_list


def ring_backward_steps(
    dout_t: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    out_t: torch.Tensor,
    lse: torch.Tensor,
    aux_list: list,
    plan: RingPlan,
    kv_comm: RingTransport | None,
    dkv_comm: RingTransport | None,
) -> RingSteps:
    """This rank's backward (kernel tensors as in the forward; out_t the merged output in the input
    dtype, lse the merged LSE) -> returns (dq (B, N, S2, H), dkv (2, B, Nk, S2, H)) in the accumulation
    dtype. The K/V travel the ring again on `kv_comm`; the dK/dV of each pair travel with it on
    `dkv_comm`, gathering every holder's share, and reach their owner after R hops."""
    acc = accumulation_dtype(q_t.dtype)
    ring = plan.ring_degree
    dq = torch.zeros(q_t.shape, dtype=acc, device=q_t.device)
    kv = torch.stack([k_t, v_t]) if ring > 1 else (k_t, v_t)
    dkv_received = None
    for step in range(ring):
        last = step == ring - 1
        if not last:
            next_kv = kv_comm.exchange(kv, tag=_KV_TAG)
        dkv_local = torch.zeros((2, *k_t.shape), dtype=acc, device=q_t.device)
        attend_pieces_backward(
            dout_t,
            q_t,
            kv[0],
            kv[1],
            out_t,
            lse,
            plan.pieces(step),
            aux_list[step],
            plan.scale,
            dq,
            dkv_local[0],
            dkv_local[1],
        )
        if step == 0:
            dkv = dkv_local
        else:  # dK/dV of this K/V pair from the ranks that held it before
            yield dkv_comm
            dkv = dkv_received + dkv_local
        if ring > 1:  # after the last step this sends every pair's dK/dV home
            dkv_received = dkv_comm.exchange(dkv, tag=_DKV_TAG)
        if not last:
            yield kv_comm
            kv = next_kv
    if ring > 1:
        yield dkv_comm
        dkv = dkv_received
    return dq, dkv


def run_steps(steps: RingSteps) -> tuple:
    """Drive one rank's loop over a real transport: wait where it asks, return its results."""
    while True:
        try:
            comm = next(steps)
        except StopIteration as done:
            return done.value
        comm.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
        comm = RingComm(plan.group) if plan.ring_degree > 1 else None
        out, lse, aux_list = run_steps(ring_forward_steps(q_t, k_t, v_t, plan, comm))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.aux_list = plan, aux_list
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out_t, lse = ctx.saved_tensors
        plan = ctx.plan
        q_t, k_t, v_t, dout_t = (x.transpose(1, 2) for x in (q, k, v, dout))
        ring = plan.ring_degree > 1
        kv_comm, dkv_comm = (RingComm(plan.group) if ring else None for _ in range(2))
        dq, dkv = run_steps(
            ring_backward_steps(dout_t, q_t, k_t, v_t, out_t, lse, ctx.aux_list, plan, kv_comm, dkv_comm)
        )
        dk, dv = (x.to(k.dtype).transpose(1, 2) for x in dkv)
        return dq.to(q.dtype).transpose(1, 2), dk, dv, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:
    """Attention of this ring rank's pair. q (B, S2, Nq, H), k/v (B, S2, Nk, H) -> (B, S2, Nq, H).

    At ring degree 1 this is plain local attention (no communication): one causal fused call for a
    single sample, one call per sample for packed rows.
    """
    return _RingAttention.apply(q, k, v, plan)


# ---- the ring on one device ----------------------------------------------------------------------
class LocalRing:
    """An in-process ring of `degree` simulated ranks on one device: `link(r).exchange` records rank r's
    tensor and hands out an empty receive buffer; `deliver` copies every recorded tensor of rank r into
    rank r+1's buffer of the same posting (ranks post in the same order, as over the network)."""

    def __init__(self, degree: int) -> None:
        self.degree = degree
        self._posted: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(degree)]

    def link(self, rank: int) -> _LocalLink:
        return _LocalLink(self, rank)

    def deliver(self) -> None:
        if len({len(posted) for posted in self._posted}) != 1:
            raise RuntimeError("LocalRing: the ranks posted different numbers of exchanges")
        for rank, posted in enumerate(self._posted):
            for (sent, _), (_, received) in zip(posted, self._posted[(rank + 1) % self.degree]):
                received.copy_(sent)
        self._posted = [[] for _ in range(self.degree)]


@dataclasses.dataclass
class _LocalLink:
    ring: LocalRing
    rank: int

    def exchange(self, tensor: torch.Tensor, tag: int = 0) -> torch.Tensor:
        received = torch.empty_like(tensor)
        self.ring._posted[self.rank].append((tensor, received))
        return received

    def wait(self) -> None:
        raise RuntimeError("a LocalRing link completes in `run_lockstep`, when every rank waits on it")


def run_lockstep(loops: list[RingSteps]) -> list[tuple]:
    """Drive every rank's loop in turn up to its next wait; when all wait on the same ring, deliver its
    exchanges and go on. Returns the ranks' results in rank order."""
    results: list = [None] * len(loops)
    while True:
        waiting = []
        for rank, steps in enumerate(loops):
            try:
                waiting.append(next(steps))
            except StopIteration as done:
                results[rank] = done.value
        if not waiting:
            return results
        rings = {id(link.ring) for link in waiting}
        if len(waiting) != len(loops) or len(rings) != 1:
            raise RuntimeError("the ranks' ring loops fell out of step")
        waiting[0].ring.deliver()


def simulate_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    ring_degree: int,
    *,
    boundaries: tuple[int, ...] | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The zigzag ring of `ring_degree` ranks on one device: each rank's forward and backward are
    `ring_forward_steps` / `ring_backward_steps` on its zigzag pair, run in lockstep over `LocalRing`s
    (no process group). q/dout (B, N, T, H), k/v (B, Nk, T, H) in global token order -> (out, dq, dk, dv)
    in global order (out, dq like q; dk, dv like k), in the accumulation dtype (float32, float64 for
    float64 inputs). The compute is every rank's, summed; the communication is a local copy."""
    total_len = q.shape[2]
    plan = RingPlan(
        group=None,
        ring_rank=0,
        ring_degree=ring_degree,
        causal=causal,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        total_len=total_len,
        boundaries=boundaries,
    )
    plans = [dataclasses.replace(plan, ring_rank=r) for r in range(ring_degree)]
    pairs = [ring_pair_indices(total_len, ring_degree, r).to(q.device) for r in range(ring_degree)]
    local = [[x.index_select(2, pair) for x in (q, k, v, dout)] for pair in pairs]
    ring = LocalRing(ring_degree)
    forward = run_lockstep(
        [
            ring_forward_steps(q_r, k_r, v_r, p, ring.link(r))
            for r, ((q_r, k_r, v_r, _), p) in enumerate(zip(local, plans))
        ]
    )
    kv_ring, dkv_ring = LocalRing(ring_degree), LocalRing(ring_degree)
    backward = run_lockstep(
        [
            ring_backward_steps(
                dout_r, q_r, k_r, v_r, out.to(q.dtype), lse, aux, p, kv_ring.link(r), dkv_ring.link(r)
            )
            for r, ((q_r, k_r, v_r, dout_r), (out, lse, aux), p) in enumerate(zip(local, forward, plans))
        ]
    )
    acc = forward[0][0].dtype
    out, dq = (torch.empty(q.shape, dtype=acc, device=q.device) for _ in range(2))
    dk, dv = (torch.empty(k.shape, dtype=acc, device=q.device) for _ in range(2))
    for pair, (out_r, _, _), (dq_r, dkv_r) in zip(pairs, forward, backward):
        out[:, :, pair], dq[:, :, pair] = out_r, dq_r
        dk[:, :, pair], dv[:, :, pair] = dkv_r[0], dkv_r[1]
    return out, dq, dk, dv
