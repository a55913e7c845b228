"""A Qwen2-0.5B-shaped LongVILA on the GPU: one bf16-autocast training step on packed rows tracks the
float32 step, and a 64K-token prompt prefilled in 16K chunks gives the one-pass prefill's hidden state."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from longvila.plan.shapes import PRESETS

# config.json of Qwen/Qwen2-0.5B (sizes from the shape registry); random weights
QWEN2_05B = PRESETS["0.5b"].llm.hf_config(max_position_embeddings=131072)


def _model():
    from longvila import LongVILA, LongVILAConfig

    config = LongVILAConfig.tiny()
    config = dataclasses.replace(config, llm={**config.llm, **QWEN2_05B})
    torch.manual_seed(0)
    return LongVILA(config).to("cuda")


def _packed_text_row(model, tokens=16384, samples=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (1, tokens), generator=g)
    ids[ids == model.config.image_token_id] = 0
    length = tokens // samples
    return {
        "input_ids": ids.cuda(),
        "labels": ids.cuda(),
        "position_ids": torch.arange(length).repeat(samples)[None].cuda(),
        "cu_seqlens": torch.arange(0, tokens + 1, length, dtype=torch.int32),
    }


def _step(model, batch, bf16):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch)
    out.loss.backward()
    grads = torch.cat([p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None])
    return float(out.loss.detach()), grads


def test_bf16_autocast_training_step_tracks_float32():
    model = _model().train()
    batch = _packed_text_row(model)
    ref_loss, ref_grads = _step(model, batch, bf16=False)
    loss, grads = _step(model, batch, bf16=True)
    assert torch.isfinite(grads).all()
    assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss), (loss, ref_loss)
    assert float((grads - ref_grads).norm() / ref_grads.norm()) <= 5e-2


@torch.no_grad()
def test_chunked_prefill_at_64k_matches_one_pass():
    from longvila.model.attention import AttentionContext
    from longvila.model.generation import _prefill

    model = _model().to(torch.bfloat16).eval()
    tokens = 65536
    ids = torch.randint(0, 150000, (1, tokens), generator=torch.Generator().manual_seed(1)).cuda()
    ids[ids == model.config.image_token_id] = 0
    embeds = model.embed(ids)
    positions = torch.arange(tokens, device="cuda")[None]
    hidden = {}
    peak = {}
    for chunk in (None, 16384):
        torch.cuda.reset_peak_memory_stats()
        hidden[chunk] = _prefill(model, embeds, positions, AttentionContext(), DynamicCache(), chunk).float()
        peak[chunk] = torch.cuda.max_memory_allocated()
    err = (hidden[16384] - hidden[None]).abs().max() / hidden[None].abs().max()
    assert float(err) < 5e-2
    assert peak[16384] < peak[None]


@pytest.mark.parametrize("tokens", [65536])
def test_one_process_packed_row_trains_at_64k_in_bf16(tokens):
    model = _model().train()
    batch = _packed_text_row(model, tokens=tokens, samples=4)
    loss, grads = _step(model, batch, bf16=True)
    assert torch.isfinite(grads).all() and loss > 0
