"""Greedy packing under a token budget."""

import numpy as np
import pytest
import torch

from longvila.data.collate import TokenBudgetCollate, pack_rows, plan_rows


def test_first_fit_in_order_respects_the_padded_budget():
    assert plan_rows([5, 4, 3, 6, 2], max_tokens=10) == [[0, 1], [2, 3], [4]]
    assert plan_rows([5, 4, 3, 6, 2], max_tokens=10, pad_to_multiple_of=4) == [[0, 2], [1, 4], [3]]
    with pytest.raises(ValueError, match="sample 1 has 12 tokens, more than the row budget of 10"):
        plan_rows([3, 12], max_tokens=10)


def test_packed_rows_keep_samples_apart(tiny_processor):
    rng = np.random.default_rng(0)
    samples = []
    for i, frames in enumerate((3, 0, 2, 1)):
        if frames:
            video = rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8)
            msgs = [
                {"role": "user", "content": "<video>\nWhat?"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
            samples.append(tiny_processor(msgs, videos=[video], num_frames=frames))
        else:
            samples.append(
                tiny_processor([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}])
            )
    lengths = [len(s["input_ids"]) for s in samples]
    budget = max(lengths) + min(lengths) + 8
    rows = pack_rows(tiny_processor, samples, budget, pad_to_multiple_of=8)
    assert sum(len(r["cu_seqlens"]) - 1 for r in rows) == len(samples)
    seen = 0
    for row in rows:
        total = row["input_ids"].shape[1]
        assert total <= budget and total % 8 == 0
        bounds = row["cu_seqlens"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            assert row["position_ids"][0, start:end].tolist() == list(range(end - start))
            assert row["labels"][0, start] == -100  # a sample's first token is nobody's target
        frames = sum(samples[seen + k]["pixel_values"].shape[0] for k in range(len(bounds) - 1))
        assert row["pixel_values"].shape[0] == frames
        seen += len(bounds) - 1
    collate = TokenBudgetCollate(tiny_processor, budget, 8)
    again = collate([*samples[:2], None, *samples[2:]])
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, again))
