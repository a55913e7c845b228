"""Local block attention returning (out, lse), with a backward that takes an external out and LSE.

This is the one block kernel that the ring loop (ring.py) calls for every (query block, K/V block)
pair. The backward is called with the *global* (merged) output and LSE, which makes the per-block
gradients add up to the exact gradient of the full softmax (ring-flash-attention's derivation).

Paths:
- CUDA, fp16/bf16, no mask: `aten._scaled_dot_product_flash_attention` and its backward.
- Everything else (CPU, fp32/fp64, or a segment mask for packed samples): an exact reference in
  plain torch with a masked softmax, computed in float32 (float64 for float64 inputs). On CUDA this
  materialises the (Sq, Sk) scores of one block, so packed samples cost more memory than flash.

Masks: `causal=True` is allowed only on square diagonal blocks (the aten ops align causal masks
top-left, flash-attn >= 2.1 bottom-right; a square block makes both agree). Anything else is a
boolean `mask` of shape (Sq, Sk), True where the query may attend. A query row with no allowed key
gives out = 0 and lse = -inf, never NaN, and zero gradients.

Shapes: B batch, N heads (Nq query heads, Nk K/V heads, Nq % Nk == 0), S sequence, H head dim.
Kernel tensors are (B, N, S, H); lse is (B, Nq, Sq).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact tests); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _uses_flash(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return q.is_cuda and q.dtype in _FLASH_DTYPES and mask is None


def _check_causal(causal: bool, q: torch.Tensor, k: torch.Tensor) -> None:
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal block attention needs a square block, got Sq={q.shape[2]}, Sk={k.shape[2]}")


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

    q (B, Nq, Sq, H), k/v (B, Nk, Sk, H), mask (Sq, Sk) bool or None.
    Returns (out (B, Nq, Sq, H) and lse (B, Nq, Sq), both in the accumulation dtype, and an opaque
    `aux` to hand to `block_attention_backward`). No autograd.
    """
    _check_causal(causal, q, k)
    if _uses_flash(q, mask):
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
    _check_causal(causal, q, k)
    if _uses_flash(q, mask):
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
    return _reference_backward(dout, q, k, v, out, lse, scale, causal, mask)


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
