"""The LLM's attention, plugged into Hugging Face models through their attention registry.

Registered as "longvila" in `transformers.AttentionInterface`, so any causal LM that looks its attention
up there (Qwen2, Llama, ...) runs it without patching. It reads one extra keyword argument,
`longvila_ctx` (an `AttentionContext`), that the LongVILA model passes down through the HF forward:
- packed rows: `cu_seqlens` keep every token inside its own sample;
- generation: `key_padding` marks the real keys of left-padded rows;
- sequence parallelism: `sp` is a strategy object whose `attention(q, k, v, causal, cu_seqlens, scale)`
  computes exact attention over the whole sequence from this rank's shard (see `longvila.parallel`).

No path builds a (Sq, Sk) mask: packed rows run one fused causal call per sample
(`longvila.kernels.attention`), left-padded prompts attend over each row's real keys only, and a prefill
chunk attends to its cache as a full piece plus a causal square (docs/performance.md). Under autocast,
q, k and v are cast to the autocast dtype first (after RoPE q and k would otherwise arrive in float32
while v is bf16), so the fused kernels run in one compute dtype.

Shapes: B batch, H query heads, K key/value heads, Sq queries, Sk keys, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from longvila.kernels.attention import local_attention, prefix_attention

ATTENTION_NAME = "longvila"


@dataclass
class AttentionContext:
    key_padding: torch.Tensor | None = None
    """(B, Sk) True for real keys, False for left padding (generation). Under sequence parallelism:
    this rank's valid cached keys, which switches attention to the exact cross-rank decoding merge."""

    cu_seqlens: tuple[int, ...] | torch.Tensor | None = None
    """Sample bounds (0, ..., T) of a packed row, host ints (computed once per batch); None: one
    sample per row. Under sequence parallelism these are the global bounds."""

    sp: Any = None
    """Sequence-parallel strategy; None for the single-process path."""


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The autocast dtype of the tensor's device when autocast is on there, else the tensor's dtype."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _left_padded_attention(query, key, value, key_padding, scale):
    """Prefill of left-padded rows: each row's queries attend causally to its real keys only.

    key_padding (B, Sk) is False on a prefix of each row. Queries on padding positions give 0 (their
    outputs feed only keys that stay masked). No (Sq, Sk) tensor: one fused prefix call per row.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    out = query.new_zeros(query.shape)
    pads = (~key_padding).sum(1).tolist()  # one host copy per layer, prefill only
    for row, pad in enumerate(pads):
        first_query = max(pad - (k_len - q_len), 0)
        if first_query >= q_len:
            continue  # this chunk is all padding for this row
        out[row : row + 1, :, first_query:] = prefix_attention(
            query[row : row + 1, :, first_query:],
            key[row : row + 1, :, pad:],
            value[row : row + 1, :, pad:],
            scale=scale,
        )
    return out


def _single_process(query, key, value, ctx: AttentionContext | None, scale):
    """(B, H, Sq, D) attention of the whole sequence (or of a chunk after its KV cache) in one process."""
    q_len, k_len = query.shape[2], key.shape[2]
    padding = ctx.key_padding if ctx is not None else None
    bounds = ctx.cu_seqlens if ctx is not None else None
    gqa = query.shape[1] != key.shape[1]
    if bounds is not None:
        if q_len != k_len:
            raise ValueError(
                f"packed rows (cu_seqlens) need the whole row at once, got Sq={q_len}, Sk={k_len}"
            )
        return local_attention(query, key, value, scale=scale, causal=True, boundaries=bounds)
    if padding is not None and q_len > 1:
        if torch.is_grad_enabled() and query.requires_grad:
            raise ValueError("left-padded rows (key_padding) are for generation, which runs without grad")
        return _left_padded_attention(query, key, value, padding, scale)
    if padding is not None:  # one new token per row: a (B, 1, 1, Sk) mask is O(Sk)
        mask = padding[:, None, None, :]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if q_len == k_len or q_len == 1:
        causal = q_len == k_len and q_len > 1
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    # A prefill chunk after its cache: the cache is a full piece, the chunk a causal square.
    if not torch.is_grad_enabled() or not query.requires_grad:
        return prefix_attention(query, key, value, scale=scale)
    mask = causal_lower_right(q_len, k_len)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)


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
    """HF attention signature: q (B, H, Sq, D), k/v (B, K, Sk, D) -> (B, Sq, H, D).

    `attention_mask` from Hugging Face is ignored: the model describes padding and packing through
    `longvila_ctx` and never passes an HF mask.
    """
    ctx = longvila_ctx
    dtype = compute_dtype(value)
    query, key, value = (x.to(dtype) for x in (query, key, value))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if ctx is not None and ctx.sp is not None and ctx.key_padding is not None:
        # Sequence-parallel decoding: new queries against every rank's cached shard.
        return ctx.sp.decode_attention(query, key, value, ctx.key_padding, scale=scale), None
    if ctx is not None and ctx.sp is not None:
        out = ctx.sp.attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            causal=True,
            cu_seqlens=ctx.cu_seqlens,
            scale=scale,
        )
        return out, None
    out = _single_process(query, key, value, ctx, scale)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make "longvila" a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, longvila_attention)
    return ATTENTION_NAME
