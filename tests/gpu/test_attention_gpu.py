"""The CUDA attention paths in bf16 against float64 attention built here (forward and backward):
the flash block kernel with an external LSE, the mask-free pieces of packed rows, GQA, and the prefix
(chunked prefill) path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longvila.kernels.attention import (
    block_attention_backward,
    block_attention_forward,
    local_attention,
    prefix_attention,
)

DEVICE = "cuda"
# bf16 rounds to 8 significant bits; attention outputs are averages of O(1) values.
OUT_TOL, GRAD_TOL = 3e-2, 5e-2


def _qkv(total_len, nq=14, nk=2, head_dim=64, batch=1, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, nq, total_len, head_dim, device=DEVICE, dtype=torch.float64, generator=g)
    k, v = (
        torch.randn(batch, nk, total_len, head_dim, device=DEVICE, dtype=torch.float64, generator=g)
        for _ in range(2)
    )
    return q, k, v


def _allowed(total_len, bounds, causal):
    pos = torch.arange(total_len, device=DEVICE)
    sample = torch.full((total_len,), -1, device=DEVICE)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        sample[a:b] = i
    ok = (sample[:, None] == sample[None, :]) & (sample[:, None] >= 0)
    return ok & (pos[None, :] <= pos[:, None]) if causal else ok


def _sdpa64(q, k, v, allowed):
    groups = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
    return out.masked_fill(~allowed.any(-1)[:, None], 0.0)


def _rel_max(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("causal", [True, False])
def test_block_kernel_matches_sdpa_in_bf16_with_gqa(causal):
    q, k, v = _qkv(1024)
    scale = q.shape[-1] ** -0.5
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    out, lse, aux = block_attention_forward(qb, kb, vb, scale=scale, causal=causal)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = _sdpa64(*leaves, _allowed(1024, (0, 1024), causal))
    dout = torch.randn_like(ref)
    ref.backward(dout)
    assert _rel_max(out, ref.detach()) < OUT_TOL
    grads = block_attention_backward(
        dout.to(torch.bfloat16), qb, kb, vb, out, lse, aux, scale=scale, causal=causal
    )
    for got, leaf in zip(grads, leaves):
        assert got.shape == leaf.shape
        assert _rel_max(got, leaf.grad) < GRAD_TOL


@pytest.mark.parametrize("bounds", [(0, 4096), (0, 1000, 1024, 3000, 4096), (0, 17, 2048, 4000)])
def test_packed_rows_match_sdpa_in_bf16(bounds):
    total_len = 4096
    q, k, v = _qkv(total_len)
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out = local_attention(*leaves, scale=q.shape[-1] ** -0.5, boundaries=bounds)
    refs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = _sdpa64(*refs, _allowed(total_len, bounds, True))
    dout = torch.randn_like(ref)
    out.backward(dout.to(torch.bfloat16))
    ref.backward(dout)
    assert _rel_max(out, ref.detach()) < OUT_TOL
    for got, want in zip(leaves, refs):
        assert _rel_max(got.grad, want.grad) < GRAD_TOL


def test_prefix_attention_matches_sdpa_in_bf16():
    q, k, v = _qkv(4096)
    chunk = q[:, :, -1024:]
    out = prefix_attention(*(x.to(torch.bfloat16) for x in (chunk, k, v)), scale=q.shape[-1] ** -0.5)
    pos = torch.arange(4096, device=DEVICE)
    allowed = pos[None, :] <= pos[-1024:, None]
    assert _rel_max(out, _sdpa64(chunk, k, v, allowed)) < OUT_TOL


def test_packed_rows_use_no_quadratic_memory():
    """32K tokens, 4 samples, 14 heads: a (T x T) bf16 score matrix alone would take 28 GiB."""
    total_len = 32768
    q, k, v = (x.to(torch.bfloat16) for x in _qkv(total_len, seed=1))
    bounds = (0, 8192, 16384, 24576, 32768)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    leaves = [x.requires_grad_() for x in (q, k, v)]
    local_attention(*leaves, scale=0.125, boundaries=bounds).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 2 * 1024**3, f"{extra / 1024**3:.1f} GiB"
