"""The block kernel and the mask-free pieces the ring runs, re-exported from `longvila.kernels.attention`
(which `longvila.model` uses too, without importing this package)."""

from longvila.kernels.attention import (
    Piece,
    Run,
    accumulation_dtype,
    attend_pieces,
    attend_pieces_backward,
    attention_pieces,
    block_attention_backward,
    block_attention_forward,
    block_mask,
    boundaries_tuple,
    local_attention,
    merge_partial,
    prefix_attention,
    reference_attention,
    segment_ids_from_cu_seqlens,
)

__all__ = [
    "Piece",
    "Run",
    "accumulation_dtype",
    "attend_pieces",
    "attend_pieces_backward",
    "attention_pieces",
    "block_attention_backward",
    "block_attention_forward",
    "block_mask",
    "boundaries_tuple",
    "local_attention",
    "merge_partial",
    "prefix_attention",
    "reference_attention",
    "segment_ids_from_cu_seqlens",
]
