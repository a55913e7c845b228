"""Greedy packing of tokenised samples into rows under a token budget.

A sample's length is known once the processor has tokenised it (frames x tokens per frame + text), so
rows are formed from tokenised samples: first fit in the given order (the data order stays close to the
sampler's), each row at most `max_tokens` after padding to the parallel layout's multiple. Each row is
then collated by the processor: position ids restart per sample, `cu_seqlens` marks the boundaries,
labels are masked outside assistant turns and never cross samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _padded(length: int, multiple: int) -> int:
    return length + (-length) % multiple


def plan_rows(lengths: Sequence[int], max_tokens: int, pad_to_multiple_of: int = 1) -> list[list[int]]:
    """Indices of the samples in each row: first fit, in order; a row's padded length stays <= max_tokens."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rows: list[list[int]] = []
    sizes: list[int] = []
    for index, length in enumerate(lengths):
        if _padded(length, pad_to_multiple_of) > max_tokens:
            raise ValueError(
                f"sample {index} has {length} tokens, more than the row budget of {max_tokens} "
                f"(padded to a multiple of {pad_to_multiple_of}): raise the budget or use fewer frames"
            )
        for row, size in enumerate(sizes):
            if _padded(size + length, pad_to_multiple_of) <= max_tokens:
                rows[row].append(index)
                sizes[row] += length
                break
        else:
            rows.append([index])
            sizes.append(length)
    return rows


def pack_rows(processor, samples: Sequence[dict[str, Any]], max_tokens: int, pad_to_multiple_of: int = 1):
    """Tokenised samples -> a list of packed row batches (each as `processor.collate` returns it)."""
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    return [
        processor.collate([samples[i] for i in row], pad_to_multiple_of=pad_to_multiple_of)
        for row in plan_rows(lengths, max_tokens, pad_to_multiple_of)
    ]


class TokenBudgetCollate:
    """DataLoader collate: a micro-batch of samples -> a list of packed rows under `max_tokens` each."""

    def __init__(self, processor, max_tokens: int, pad_to_multiple_of: int = 1):
        self.processor = processor
        self.max_tokens = max_tokens
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: list[dict[str, Any]]):
        return pack_rows(
            self.processor, [s for s in samples if s is not None], self.max_tokens, self.pad_to_multiple_of
        )
