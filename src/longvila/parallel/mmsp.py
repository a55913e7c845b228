"""MM-SP: the strategy the LongVILA model calls under sequence parallelism.

Two-stage sharding (docs/reference.md): every rank of an SP group holds the same packed batch.
  Stage 1: the frames are split evenly across the SP ranks; each rank encodes only its share
           (`split_frames`), and the frame embeddings are all-gathered (`gather_frames`, whose
           backward is a reduce-scatter, so the vision tower and projector get the gradient of every
           token, wherever the token ends up).
  Stage 2: the full token sequence is sharded in the 2D zigzag layout (`shard`), and the LLM runs
           `sp_attention` through transformers' attention registry.
Loss: labels are shifted on the full sequence before sharding; each rank sums its tokens' losses and
divides by the SP group's supervised-token count (`reduce_loss`).

Generation: the prompt is prefilled with MM-SP, each rank keeps the KV cache of its own shard, and each
new token's attention is the exact merge of every rank's partial (output, log-sum-exp) over its cached
keys (`decode_attention`). New tokens' K/V are counted on SP rank 0 only.

Plain functions of a layout `sp` (its degrees, ranks and groups): `SequenceParallel` exposes each as a
method, which is how the model sees them (`longvila.model` never imports this package). Shapes: F frames, P tokens per frame, D width, B batch, N heads, H head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longvila.parallel.comm import all_gather_pieces, record_comm, reduce_scatter_pieces, tensor_bytes
from longvila.parallel.hybrid import sp_attention
from longvila.parallel.ulysses import check_heads
from longvila.parallel.zigzag import check_sequence_length


def frame_split(num_frames: int, degree: int, rank: int) -> tuple[int, int]:
    """[start, end) of this rank's frames: contiguous shares whose sizes differ by at most one."""
    base, extra = divmod(num_frames, degree)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _GatherFrames(torch.autograd.Function):
    """All-gather uneven frame shares (padded to the largest share); backward = reduce-scatter."""

    @staticmethod
    def forward(ctx, local_FPD, total, sp):
        degree = sp.sp_degree
        share = -(-total // degree)
        ctx.sp, ctx.total, ctx.share = sp, total, share
        ctx.local = local_FPD.shape[0]
        padded = local_FPD.new_zeros(share, *local_FPD.shape[1:])
        padded[: ctx.local] = local_FPD
        stacked = all_gather_pieces(padded, 0, sp.sp_group)
        rows = torch.cat(
            [torch.arange(r * share, r * share + (e - s)) for r, (s, e) in enumerate(_splits(total, degree))]
        )
        ctx.rows = rows
        return stacked.index_select(0, rows.to(stacked.device))

    @staticmethod
    def backward(ctx, grad_full):
        sp = ctx.sp
        padded = grad_full.new_zeros(ctx.share * sp.sp_degree, *grad_full.shape[1:])
        padded.index_copy_(0, ctx.rows.to(grad_full.device), grad_full.contiguous())
        grad_local = reduce_scatter_pieces(padded, 0, sp.sp_group)[: ctx.local]
        return grad_local, None, None


def _splits(total: int, degree: int) -> list[tuple[int, int]]:
    return [frame_split(total, degree, r) for r in range(degree)]


# ---- layout checks -----------------------------------------------------------------------
def sequence_multiple(sp) -> int:
    """Pad packed rows to a multiple of this (2 x ring x ulysses) before sharding."""
    return 2 * sp.ring_degree * sp.ulysses_degree if sp.sp_degree > 1 else 1


def check_model(sp, num_q_heads: int, num_kv_heads: int) -> None:
    """Fail before any work when the heads do not fit the Ulysses degree."""
    check_heads(num_q_heads, num_kv_heads, sp.ulysses_degree)


def check_sequence(sp, total_len: int) -> None:
    check_sequence_length(total_len, sp.ring_degree, sp.ulysses_degree)


# ---- stage 1: frames ------------------------------------------------------------------------
def split_frames(sp, pixel_values: torch.Tensor) -> torch.Tensor:
    """This SP rank's contiguous share of the frames (possibly empty)."""
    start, end = frame_split(pixel_values.shape[0], sp.sp_degree, sp.sp_rank)
    return pixel_values[start:end]


def gather_frames(sp, local_FPD: torch.Tensor, total: int) -> torch.Tensor:
    """All ranks' frame embeddings in frame order, (F, P, D); differentiable."""
    if sp.sp_degree == 1:
        return local_FPD
    return _GatherFrames.apply(local_FPD, total, sp)


# ---- stage 2: attention ---------------------------------------------------------------------
def attention(sp, q, k, v, causal=True, cu_seqlens=None, scale=None):
    """(B, S, Nq, H), (B, S, Nk, H) x2 -> (B, S, Nq, H): exact attention over the full sequence."""
    return sp_attention(q, k, v, sp, causal=causal, cu_seqlens=cu_seqlens, scale=scale)


def decode_attention(sp, q_BNqH, k_BNkSH, v_BNkSH, key_valid_BS, scale=None):
    """New queries against every rank's KV cache: q (B, Nq, Sq, H) with cached k/v (B, Nk, Sk, H)
    and this rank's valid keys (B, Sk) -> (B, Sq, Nq, H), the same on every rank.

    Each rank computes its partial softmax over its own valid keys (all of them precede the new
    queries), then the partials are merged exactly by their log-sum-exp.
    """
    batch, num_q, q_len, dim = q_BNqH.shape
    num_kv = k_BNkSH.shape[1]
    scale = dim**-0.5 if scale is None else scale
    acc = torch.promote_types(q_BNqH.dtype, torch.float32)
    # Query head n uses K/V head n // G: group the query heads onto their K/V head instead of
    # repeating the cache to every query head, and multiply in the cache's dtype; only the small
    # (G * Sq, Sk) score rows are float32.
    q_g = q_BNqH.to(k_BNkSH.dtype).reshape(batch, num_kv, (num_q // num_kv) * q_len, dim)
    scores = (q_g @ k_BNkSH.transpose(-1, -2)).to(acc) * scale
    scores = scores.masked_fill(~key_valid_BS[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where this rank has no valid key
    probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0)[..., None])
    out = (probs.to(v_BNkSH.dtype) @ v_BNkSH).to(acc)
    out, lse = out.reshape(batch, num_q, q_len, dim), lse.reshape(batch, num_q, q_len)
    if sp.sp_degree > 1:
        outs = all_gather_pieces(out[None], 0, sp.sp_group)  # (P, B, N, Sq, H)
        lses = all_gather_pieces(lse[None], 0, sp.sp_group)  # (P, B, N, Sq)
        top = lses.amax(0)
        weights = torch.exp(lses - top.masked_fill(torch.isneginf(top), 0)).nan_to_num(0.0)
        out = (weights[..., None] * outs).sum(0) / weights.sum(0).clamp_min(1e-30)[..., None]
    return out.transpose(1, 2).to(q_BNqH.dtype)


# ---- loss and small reductions -------------------------------------------------------------
def all_reduce_sum(sp, x: torch.Tensor) -> torch.Tensor:
    """Sum over the SP group (no grad)."""
    if sp.sp_degree == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, group=sp.sp_group)
    record_comm("all_reduce", tensor_bytes(x))
    return x


def reduce_loss(sp, local_sum: torch.Tensor, local_count: int) -> tuple[torch.Tensor, int]:
    """Local loss sum -> (global mean over the SP group's supervised tokens, global count).

    The value is the same on every rank; its gradient is only the local part (local sum over the
    global count), so summing the ranks' gradients gives exactly the single-process gradient.
    """
    count = int(all_reduce_sum(sp, torch.tensor([float(local_count)], device=local_sum.device)).item())
    local = local_sum / max(count, 1)
    total = all_reduce_sum(sp, local.detach().reshape(1)).reshape(())
    return local + (total - local).detach(), count
