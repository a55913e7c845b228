"""Local block attention returning (out, lse), with a backward that takes an external out and LSE,
and the mask-free decomposition of packed, causal attention into pieces for it.

The block kernel is what the ring loop (ring.py) calls for every (query block, K/V block) pair. The
backward is called with the *global* (merged) output and LSE, which makes the per-block gradients add
up to the exact gradient of the full softmax (ring-flash-attention's derivation).

Pieces (`attention_pieces`): within one packed sample, under causal attention, the queries and keys
of a rank are made of globally contiguous runs (the zigzag chunks), and every (query run x key run)
intersection is *full*, *causal on a square diagonal* or *empty*. Cutting the blocks at the samples'
boundaries (host integers, computed once per batch and cached) therefore leaves only pieces that a
fused kernel runs without any mask; their partial (out, lse) merge exactly. See docs/parallelism.md.

Kernel paths (no (Sq, Sk) tensor is ever built on them):
- CPU, any float dtype: `aten._scaled_dot_product_flash_attention_for_cpu` and its backward (tiled,
  native GQA, float64 stays exact, the backward accepts an external LSE).
- CUDA, fp16/bf16: `aten._scaled_dot_product_flash_attention` and its backward.
- Everything else (CUDA fp32/fp64, or an explicit boolean `mask`, kept for tests and odd shapes): an
  exact reference in plain torch with a masked softmax, computed in float32 (float64 for float64).

Masks: `causal=True` is allowed only on square diagonal blocks (the aten ops align causal masks
top-left, flash-attn >= 2.1 bottom-right; a square block makes both agree). A query row with no allowed
key gives out = 0 and lse = -inf, never NaN, and zero gradients.

Shapes: B batch, N heads (Nq query heads, Nk K/V heads, Nq % Nk == 0), S sequence, H head dim.
Kernel tensors are (B, N, S, H); lse is (B, Nq, Sq).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact tests); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    """Which implementation runs this block: "cpu", "cuda" (flash) or "reference"."""
    if mask is not None:
        return "reference"
    if q.device.type == "cpu" and q.dtype in _CPU_DTYPES:
        return "cpu"
    if q.is_cuda and q.dtype in _FLASH_DTYPES:
        return "cuda"
    return "reference"


def _check_block(causal: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal block attention needs a square block, got Sq={q.shape[2]}, Sk={k.shape[2]}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k and v must share one dtype (cast them to the compute dtype first), got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    groups = num_q_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


# ----------------------------------------------------------------------------------------------
# Exact reference (masked softmax in plain torch)
# ----------------------------------------------------------------------------------------------


def _allowed(causal: bool, mask: torch.Tensor | None, sq: int, sk: int, device) -> torch.Tensor | None:
    if causal:
        tri = torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
        mask = tri if mask is None else mask & tri
    return mask


def _grouped_scores(q, k, scale, causal, mask):
    """Scores (B, Nk, G, Sq, Sk) in the accumulation dtype, masked entries -inf."""
    b, nq, sq, h = q.shape
    nk, sk = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    q_g = q.to(acc).reshape(b, nk, nq // nk, sq, h)  # query head n uses K/V head n // G
    scores = torch.einsum("bkgqh,bksh->bkgqs", q_g, k.to(acc)) * scale
    allowed = _allowed(causal, mask, sq, sk, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return q_g, scores


def _probs(scores: torch.Tensor, lse_g: torch.Tensor) -> torch.Tensor:
    # A row with no allowed key has lse = -inf and all scores -inf: subtracting 0 instead keeps
    # exp(-inf) = 0 rather than exp(nan).
    safe_lse = torch.where(torch.isneginf(lse_g), torch.zeros_like(lse_g), lse_g)
    return torch.exp(scores - safe_lse.unsqueeze(-1))


def _reference_forward(q, k, v, scale, causal, mask):
    b, nq, sq, h = q.shape
    _, scores = _grouped_scores(q, k, scale, causal, mask)
    lse_g = torch.logsumexp(scores, dim=-1)
    out_g = torch.einsum("bkgqs,bksh->bkgqh", _probs(scores, lse_g), v.to(scores.dtype))
    return out_g.reshape(b, nq, sq, h), lse_g.reshape(b, nq, sq)


def _reference_backward(dout, q, k, v, out, lse, scale, causal, mask):
    b, nq, sq, h = q.shape
    nk = k.shape[1]
    q_g, scores = _grouped_scores(q, k, scale, causal, mask)
    acc = scores.dtype
    shape_g = (b, nk, nq // nk, sq)
    probs = _probs(scores, lse.to(acc).reshape(shape_g))
    dout_g = dout.to(acc).reshape(*shape_g, h)
    out_g = out.to(acc).reshape(*shape_g, h)
    dv = torch.einsum("bkgqs,bkgqh->bksh", probs, dout_g)
    dprobs = torch.einsum("bkgqh,bksh->bkgqs", dout_g, v.to(acc))
    # softmax backward with the global output: dS = P * (dP - rowsum(dO * O)).
    delta = (dout_g * out_g).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dq = torch.einsum("bkgqs,bksh->bkgqh", dscores, k.to(acc)) * scale
    dk = torch.einsum("bkgqs,bkgqh->bksh", dscores, q_g) * scale
    return dq.reshape(b, nq, sq, h), dk, dv


# ----------------------------------------------------------------------------------------------
# Public block kernel
# ----------------------------------------------------------------------------------------------


def block_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
):
    """Attention of one query block on one K/V block.

    q (B, Nq, Sq, H), k/v (B, Nk, Sk, H) of one dtype, mask (Sq, Sk) bool or None (None: the fused
    kernels). Returns (out (B, Nq, Sq, H) and lse (B, Nq, Sq), both in the accumulation dtype, and an
    opaque `aux` to hand to `block_attention_backward`). No autograd.
    """
    _check_block(causal, q, k, v)
    kernel = _kernel(q, mask)
    if kernel == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        acc = accumulation_dtype(q.dtype)
        return out.to(acc), lse.to(acc), None
    if kernel == "cuda":
        nq = q.shape[1]
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, _expand_kv(k, nq), _expand_kv(v, nq), 0.0, causal, False, scale=scale
        )
        out, lse = res[0], res[1]
        return out.float(), lse.float()[..., : q.shape[2]], tuple(res[2:8])
    out, lse = _reference_forward(q, k, v, scale, causal, mask)
    return out, lse, None


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    aux=None,
    *,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
):
    """Gradients of one block given the global (merged) `out` (B, Nq, Sq, H) and `lse` (B, Nq, Sq).

    Returns (dq, dk, dv) in the accumulation dtype with the shapes of q, k, v.
    """
    _check_block(causal, q, k, v)
    kernel = _kernel(q, mask)
    if kernel == "cpu":
        # The CPU kernel wants the LSE in float32 for reduced precision, in q's dtype otherwise.
        lse_dtype = torch.float32 if q.dtype in _FLASH_DTYPES else q.dtype
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype),
            q,
            k,
            v,
            out.to(q.dtype),
            lse.to(lse_dtype).contiguous(),
            0.0,
            causal,
            scale=scale,
        )
        acc = accumulation_dtype(q.dtype)
        return tuple(g.to(acc) for g in grads)
    if kernel == "cuda":
        return _cuda_flash_backward(dout, q, k, v, out, lse, aux, scale, causal)
    return _reference_backward(dout, q, k, v, out, lse, scale, causal, mask)


def _cuda_flash_backward(dout, q, k, v, out, lse, aux, scale, causal):
    b, nq, sq, h = q.shape
    nk, sk = k.shape[1], k.shape[2]
    cum_q, cum_k, max_q, max_k, seed, offset = aux
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype),
        q,
        _expand_kv(k, nq),
        _expand_kv(v, nq),
        out.to(q.dtype),
        lse.float().contiguous(),
        cum_q,
        cum_k,
        max_q,
        max_k,
        0.0,
        causal,
        seed,
        offset,
        scale=scale,
    )
    # Gradients of replicated K/V heads add up onto their source head.
    dk = dk.float().reshape(b, nk, nq // nk, sk, h).sum(2)
    dv = dv.float().reshape(b, nk, nq // nk, sk, h).sum(2)
    return dq.float(), dk, dv


def merge_partial(out, lse, block_out, block_lse):
    """Merge a block's partial (out, lse) into the running one (accumulation dtype).

    out (B, N, S, H), lse (B, N, S). Stable form (ring-flash-attention, "update_out_and_lse"):
        out = out - sigmoid(lse_b - lse) * (out - out_b)
        lse = lse - logsigmoid(lse - lse_b)
    which is log-sum-exp weighting without exponentiating either LSE. Rows with lse = -inf (no key
    seen yet, or none in the block) are handled explicitly so no NaN appears.
    """
    lse_empty, block_empty = torch.isneginf(lse), torch.isneginf(block_lse)
    weight = torch.sigmoid(block_lse - lse).masked_fill(lse_empty & block_empty, 0.0)
    new_out = out - weight.unsqueeze(-1) * (out - block_out)
    merged = lse - F.logsigmoid(lse - block_lse)
    new_lse = torch.where(block_empty, lse, torch.where(lse_empty, block_lse, merged))
    return new_out, new_lse


# ----------------------------------------------------------------------------------------------
# Mask-free decomposition of packed causal attention
# ----------------------------------------------------------------------------------------------

Run = tuple[int, int, int]
"""(global start, global end, local start): tokens [start, end) of the full sequence, held
contiguously from `local start` on in the local tensor."""


@dataclass(frozen=True)
class Piece:
    """One fused-kernel call: local query rows [q_start, q_end) x local keys [k_start, k_end)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool
    """True: a square block on the diagonal (query i sees keys 0..i); False: every query sees every key."""

    @property
    def q_slice(self) -> slice:
        return slice(self.q_start, self.q_end)

    @property
    def k_slice(self) -> slice:
        return slice(self.k_start, self.k_end)


def _clip(runs: tuple[Run, ...], start: int, end: int) -> list[Run]:
    """The parts of `runs` inside the global interval [start, end)."""
    clipped = []
    for g0, g1, local in runs:
        a, b = max(g0, start), min(g1, end)
        if a < b:
            clipped.append((a, b, local + a - g0))
    return clipped


def _local_span(runs: list[Run]) -> tuple[int, int]:
    """[first, last) local rows of runs that are contiguous in the local tensor."""
    return runs[0][2], runs[-1][2] + runs[-1][1] - runs[-1][0]


def _causal_pair(q_run: Run, k_run: Run) -> list[Piece]:
    """Pieces of causal attention (key position <= query position) of one query run on one key run.

    Keys before the first query are seen by all queries (full); where both runs cover the same
    positions, a causal square; queries after that overlap see it whole (full); keys after the last
    query are seen by none.
    """
    (qa, qb, lq), (ka, kb, lk) = q_run, k_run
    pieces = []
    if ka < min(kb, qa):  # keys before every query
        pieces.append(Piece(lq, lq + qb - qa, lk, lk + min(kb, qa) - ka, False))
    d0, d1 = max(qa, ka), min(qb, kb)
    if d0 < d1:
        pieces.append(Piece(lq + d0 - qa, lq + d1 - qa, lk + d0 - ka, lk + d1 - ka, True))
        if d1 < qb:
            pieces.append(Piece(lq + d1 - qa, lq + qb - qa, lk + d0 - ka, lk + d1 - ka, False))
    return pieces


def _merge_full(pieces: list[Piece]) -> list[Piece]:
    """Join full pieces that share keys and have adjacent queries (or the reverse): fewer calls."""
    for same, adjacent in (("k", "q"), ("q", "k")):
        merged: list[Piece] = []
        for piece in sorted(
            pieces, key=lambda p: (getattr(p, f"{same}_start"), getattr(p, f"{adjacent}_start"))
        ):
            last = merged[-1] if merged else None
            if (
                last is not None
                and not last.causal
                and not piece.causal
                and (getattr(last, f"{same}_start"), getattr(last, f"{same}_end"))
                == (getattr(piece, f"{same}_start"), getattr(piece, f"{same}_end"))
                and getattr(last, f"{adjacent}_end") == getattr(piece, f"{adjacent}_start")
            ):
                fields = {f"{adjacent}_end": getattr(piece, f"{adjacent}_end")}
                merged[-1] = Piece(**{**last.__dict__, **fields})
            else:
                merged.append(piece)
        pieces = merged
    return pieces


@functools.lru_cache(maxsize=256)
def attention_pieces(
    q_runs: tuple[Run, ...],
    k_runs: tuple[Run, ...],
    boundaries: tuple[int, ...] | None,
    causal: bool,
) -> tuple[Piece, ...]:
    """The mask-free pieces of attention between local queries and local keys.

    q_runs / k_runs: the global token runs the local tensors hold, in increasing global order (the
    zigzag pair of a ring rank, the whole sequence, or the last Sq of Sk positions when prefilling).
    boundaries: packed samples' bounds (0, b1, ..., bn) with bn <= T (tokens from bn on are padding
    and attend to nothing), or None for one sample. No token attends across a boundary; under `causal`
    a key is seen only by queries at or after its position. Host integers only (cached: computed once
    per batch, not per layer). Returns pieces in no particular order; queries covered by none see no key.
    """
    ends = (0, max(q_runs[-1][1], k_runs[-1][1])) if boundaries is None else boundaries
    pieces: list[Piece] = []
    for start, end in zip(ends[:-1], ends[1:]):
        qs, ks = _clip(q_runs, start, end), _clip(k_runs, start, end)
        if not qs or not ks:
            continue
        if not causal:
            # Local order follows global order, so a sample's tokens are one local range.
            (q0, q1), (k0, k1) = _local_span(qs), _local_span(ks)
            pieces.append(Piece(q0, q1, k0, k1, False))
        elif qs == ks:
            # The same positions on both sides, in increasing order: one causal square.
            q0, q1 = _local_span(qs)
            pieces.append(Piece(q0, q1, q0, q1, True))
        else:
            pieces.extend(p for q_run in qs for k_run in ks for p in _causal_pair(q_run, k_run))
    return tuple(_merge_full(pieces))


def boundaries_tuple(cu_seqlens, total_len: int) -> tuple[int, ...] | None:
    """Validated host tuple of packed samples' bounds from a tensor or a sequence; None for one
    unpadded sample ([0, T]) or None. Raises ValueError naming the bad bounds."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        bounds = tuple(int(x) for x in cu_seqlens.reshape(-1).tolist())
    else:
        bounds = tuple(int(x) for x in cu_seqlens)
    if (
        len(bounds) < 2
        or bounds[0] != 0
        or any(b < a for a, b in zip(bounds, bounds[1:]))
        or bounds[-1] > total_len
    ):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at most at the sequence length "
            f"{total_len}; got {list(bounds)}"
        )
    return None if bounds == (0, total_len) else bounds


def attend_pieces(q_t, k_t, v_t, pieces, scale, out, lse) -> list:
    """Run every piece and merge it into `out` (B, Nq, Sq, H) / `lse` (B, Nq, Sq) in place.

    q_t (B, Nq, Sq, H), k_t/v_t (B, Nk, Sk, H). Returns the pieces' `aux` for the backward.
    """
    aux_list = []
    for piece in pieces:
        qs, ks = piece.q_slice, piece.k_slice
        block_out, block_lse, aux = block_attention_forward(
            q_t[:, :, qs], k_t[:, :, ks], v_t[:, :, ks], scale=scale, causal=piece.causal
        )
        out[:, :, qs], lse[:, :, qs] = merge_partial(out[:, :, qs], lse[:, :, qs], block_out, block_lse)
        aux_list.append(aux)
    return aux_list


def attend_pieces_backward(dout_t, q_t, k_t, v_t, out_t, lse, pieces, aux_list, scale, dq, dk, dv) -> None:
    """Add every piece's gradients, given the merged `out_t` and `lse`, into dq / dk / dv in place."""
    for piece, aux in zip(pieces, aux_list):
        qs, ks = piece.q_slice, piece.k_slice
        dq_b, dk_b, dv_b = block_attention_backward(
            dout_t[:, :, qs],
            q_t[:, :, qs],
            k_t[:, :, ks],
            v_t[:, :, ks],
            out_t[:, :, qs],
            lse[:, :, qs],
            aux,
            scale=scale,
            causal=piece.causal,
        )
        dq[:, :, qs] += dq_b
        dk[:, :, ks] += dk_b
        dv[:, :, ks] += dv_b


def prefix_attention(q, k, v, *, scale: float, boundaries: tuple[int, ...] | None = None) -> torch.Tensor:
    """Causal attention of the last Sq of Sk positions (a prefill chunk after its KV cache), no grad.

    q (B, Nq, Sq, H), k/v (B, Nk, Sk, H) of one dtype -> (B, Nq, Sq, H) in q's dtype. The cache is a
    full piece and the chunk a causal square: no (Sq, Sk) mask. Queries that see no key give 0.
    """
    sq, sk = q.shape[2], k.shape[2]
    q_runs, k_runs = ((sk - sq, sk, 0),), ((0, sk, 0),)
    pieces = attention_pieces(q_runs, k_runs, boundaries, True)
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    attend_pieces(q, k, v, pieces, scale, out, lse)
    return out.to(q.dtype)


class _LocalAttention(torch.autograd.Function):
    """Attention of a whole (packed) sequence held by one process, piece by piece."""

    @staticmethod
    def forward(ctx, q_t, k_t, v_t, pieces, scale):
        acc = accumulation_dtype(q_t.dtype)
        out = torch.zeros(q_t.shape, dtype=acc, device=q_t.device)
        lse = torch.full(q_t.shape[:-1], float("-inf"), dtype=acc, device=q_t.device)
        aux_list = attend_pieces(q_t, k_t, v_t, pieces, scale, out, lse)
        out = out.to(q_t.dtype)
        ctx.save_for_backward(q_t, k_t, v_t, out, lse)
        ctx.pieces, ctx.scale, ctx.aux_list = pieces, scale, aux_list
        return out

    @staticmethod
    def backward(ctx, dout):
        q_t, k_t, v_t, out, lse = ctx.saved_tensors
        acc = accumulation_dtype(q_t.dtype)
        dq = torch.zeros(q_t.shape, dtype=acc, device=q_t.device)
        dk = torch.zeros(k_t.shape, dtype=acc, device=q_t.device)
        dv = torch.zeros(v_t.shape, dtype=acc, device=q_t.device)
        attend_pieces_backward(dout, q_t, k_t, v_t, out, lse, ctx.pieces, ctx.aux_list, ctx.scale, dq, dk, dv)
        return dq.to(q_t.dtype), dk.to(k_t.dtype), dv.to(v_t.dtype), None, None


def local_attention(q, k, v, *, scale: float, causal: bool = True, boundaries=None) -> torch.Tensor:
    """Attention over a whole sequence in one process, with autograd and without any mask.

    q (B, Nq, T, H), k/v (B, Nk, T, H) of one dtype -> (B, Nq, T, H). boundaries: packed samples'
    bounds as for `attention_pieces` (a tensor or host ints; None: one sample). Each sample is one
    fused causal call; tokens after the last bound see nothing and give 0.
    """
    total_len = q.shape[2]
    bounds = boundaries_tuple(boundaries, total_len)
    runs = ((0, total_len, 0),)
    return _LocalAttention.apply(q, k, v, attention_pieces(runs, runs, bounds, causal), scale)


# ----------------------------------------------------------------------------------------------
# Masks from packed samples
# ----------------------------------------------------------------------------------------------


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int) -> torch.Tensor:
    """Sample index of every token, (T,) int64; tokens at or after cu_seqlens[-1] are padding (-1).

    cu_seqlens: 1-D, starts at 0, non-decreasing, last entry <= T (normally == T).
    """
    cu = torch.as_tensor(cu_seqlens).reshape(-1).to(torch.int64).cpu()
    if cu.numel() < 2 or cu[0] != 0 or bool((cu[1:] < cu[:-1]).any()) or cu[-1] > total_len:
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at most at the sequence length "
            f"{total_len}; got {cu.tolist()}"
        )
    seg = torch.searchsorted(cu[1:], torch.arange(total_len), right=True)
    return torch.where(seg >= cu.numel() - 1, torch.full_like(seg, -1), seg)


def block_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_seg: torch.Tensor | None,
    k_seg: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor | None:
    """Boolean (Sq, Sk) mask: same sample (padding, id < 0, sees nothing) and, if causal,
    k_pos <= q_pos. None when nothing is masked (no segments, not causal)."""
    mask = None
    if q_seg is not None:
        mask = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] >= 0)
    if causal:
        order = k_pos[None, :] <= q_pos[:, None]
        mask = order if mask is None else mask & order
    return mask


def reference_attention(q, k, v, *, causal=True, cu_seqlens=None, scale=None):
    """Plain masked-softmax attention with autograd, for tests and small inputs.

    q (B, T, Nq, H), k/v (B, T, Nk, H) -> (B, T, Nq, H). Rows that see no key give 0.
    """
    total_len, nq = q.shape[1], q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    pos = torch.arange(total_len, device=q.device)
    seg = None if cu_seqlens is None else segment_ids_from_cu_seqlens(cu_seqlens, total_len).to(q.device)
    mask = block_mask(pos, pos, seg, seg, causal)
    qt, kt, vt = q.transpose(1, 2), _expand_kv(k.transpose(1, 2), nq), _expand_kv(v.transpose(1, 2), nq)
    scores = qt @ kt.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # rows with no key: 0, not NaN
    return (probs @ vt).transpose(1, 2)
