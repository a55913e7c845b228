"""The LLM's attention, plugged into Hugging Face models through their attention registry.

Registered as "longvila" in `transformers.AttentionInterface`, so any causal LM that looks its attention
up there (Qwen2, Llama, ...) runs it without patching. It reads one extra keyword argument,
`longvila_ctx` (an `AttentionContext`), that the LongVILA model passes down through the HF forward:
- packed rows: `segment_ids` keep every token inside its own sample;
- generation: `key_padding` marks the real keys of left-padded rows;
- sequence parallelism: `sp` is a strategy object whose `attention(q, k, v, causal, cu_seqlens, scale)`
  computes exact attention over the whole sequence from this rank's shard (see `longvila.parallel`).

Shapes: B batch, H query heads, K key/value heads, Sq queries, Sk keys, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

ATTENTION_NAME = "longvila"


@dataclass
class AttentionContext:
    segment_ids: torch.Tensor | None = None
    """(B, Sk) sample index of every token of packed rows; None when each row is one sample."""

    key_padding: torch.Tensor | None = None
    """(B, Sk) True for real keys, False for left padding (generation). Under sequence parallelism:
    this rank's valid cached keys, which switches attention to the exact cross-rank decoding merge."""

    cu_seqlens: torch.Tensor | None = None
    """Global sample boundaries (int32, 0 ... T) for the sequence-parallel path."""

    sp: Any = None
    """Sequence-parallel strategy; None for the single-process path."""


def _mask(ctx: AttentionContext | None, batch: int, q_len: int, k_len: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, Sq, Sk) mask, True = attend; None when plain causal suffices."""
    segments = ctx.segment_ids if ctx is not None else None
    padding = ctx.key_padding if ctx is not None else None
    if segments is None and padding is None:
        return None
    # Queries are the last Sq positions of the Sk keys (bottom-right aligned, as with a KV cache).
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None]).expand(batch, q_len, k_len)
    if segments is not None:
        allowed = allowed & (segments[:, -q_len:, None] == segments[:, None, :])
    if padding is not None:
        allowed = allowed & padding[:, None, :]
        # A padding query sees no real key; let it see itself so softmax stays finite (output unused).
        allowed = allowed | (q_pos[:, None] == k_pos[None, :])
    return allowed[:, None]


def longvila_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    longvila_ctx: AttentionContext | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF attention signature: q (B, H, Sq, D), k/v (B, K, Sk, D) -> (B, Sq, H, D)."""
    ctx = longvila_ctx
    if ctx is not None and ctx.sp is not None and ctx.key_padding is not None:
        # Sequence-parallel decoding: new queries against every rank's cached shard.
        return ctx.sp.decode_attention(query, key, value, ctx.key_padding, scale=scaling), None
    if ctx is not None and ctx.sp is not None:
        out = ctx.sp.attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            causal=True,
            cu_seqlens=ctx.cu_seqlens,
            scale=scaling,
        )
        return out, None
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    mask = _mask(ctx, batch, q_len, k_len, query.device)
    if mask is None and attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask
    is_causal = mask is None and q_len == k_len and q_len > 1
    if mask is None and 1 < q_len < k_len:
        # Chunked prefill: the chunk's queries see the whole cache and, causally, themselves. A
        # lower-right causal bias runs in the fused kernels without materialising a (Sq, Sk) mask.
        mask = causal_lower_right(q_len, k_len)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make "longvila" a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, longvila_attention)
    return ATTENTION_NAME
