"""The block kernel: (out, lse), backward with an external merged out/LSE, masks, the LSE merge."""

from __future__ import annotations

import pytest
import torch

from longvila.kernels.attention import (
    block_attention_backward,
    block_attention_forward,
    block_mask,
    merge_partial,
    reference_attention,
)

SCALE = 8**-0.5


def _qkv(sq=10, sk=10, nq=4, nk=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, nq, sq, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, nk, sk, 8, dtype=torch.float64, generator=g) for _ in range(2))
    return q, k, v


def _autograd_block(q, k, v, mask):
    """Masked-softmax attention of one block with autograd (kernel layout (B, N, S, H))."""
    nq, nk = q.shape[1], k.shape[1]
    kk, vv = (x.repeat_interleave(nq // nk, dim=1) for x in (k, v))
    scores = (q @ kk.transpose(-1, -2) * SCALE).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return probs @ vv


def test_forward_and_backward_match_autograd_with_mask_and_gqa():
    q, k, v = _qkv(sq=6, sk=9)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[2] = False  # a query with no key
    out, lse, aux = block_attention_forward(q, k, v, scale=SCALE, mask=mask)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = _autograd_block(*leaves, mask)
    dout = torch.randn_like(expected)
    expected.backward(dout)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)
    grads = block_attention_backward(dout, q, k, v, out, lse, aux, scale=SCALE, mask=mask)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_grads():
    q, k, v = _qkv()
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[5:, :3] = True  # rows 0-4 see nothing
    out, lse, aux = block_attention_forward(q, k, v, scale=SCALE, mask=mask)
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    assert (out[:, :, :5] == 0).all() and not torch.isnan(out).any()
    dq, dk, dv = block_attention_backward(
        torch.ones_like(out), q, k, v, out, lse, aux, scale=SCALE, mask=mask
    )
    assert (dq[:, :, :5] == 0).all() and (dk[:, :, 3:] == 0).all() and (dv[:, :, 3:] == 0).all()
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv))
    # An entirely masked block: everything zero, nothing NaN.
    none = torch.zeros(10, 10, dtype=torch.bool)
    out, lse, aux = block_attention_forward(q, k, v, scale=SCALE, mask=none)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = block_attention_backward(torch.ones_like(out), q, k, v, out, lse, aux, scale=SCALE, mask=none)
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("causal", [True, False])
def test_two_blocks_merged_equal_one_block(causal):
    """Split K/V in two, merge by LSE; backward of each half with the merged out/LSE adds up."""
    q, k, v = _qkv(sq=8, sk=8)
    pos = torch.arange(8)
    full_mask = block_mask(pos, pos, None, None, causal)
    full_out, full_lse, _ = block_attention_forward(q, k, v, scale=SCALE, causal=causal)
    out = torch.zeros_like(full_out)
    lse = torch.full_like(full_lse, float("-inf"))
    halves = [slice(0, 3), slice(3, 8)]
    for ks in halves:
        mask = full_mask[:, ks] if full_mask is not None else None
        block_out, block_lse, _ = block_attention_forward(q, k[:, :, ks], v[:, :, ks], scale=SCALE, mask=mask)
        out, lse = merge_partial(out, lse, block_out, block_lse)
    torch.testing.assert_close(out, full_out, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse, full_lse, rtol=1e-13, atol=1e-13)
    dout = torch.randn_like(out)
    dq_full, dk_full, dv_full = block_attention_backward(
        dout, q, k, v, full_out, full_lse, scale=SCALE, causal=causal
    )
    dq = torch.zeros_like(dq_full)
    for ks in halves:
        mask = full_mask[:, ks] if full_mask is not None else None
        dq_b, dk_b, dv_b = block_attention_backward(
            dout, q, k[:, :, ks], v[:, :, ks], out, lse, scale=SCALE, mask=mask
        )
        dq += dq_b
        torch.testing.assert_close(dk_b, dk_full[:, :, ks], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dv_b, dv_full[:, :, ks], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dq, dq_full, rtol=1e-12, atol=1e-12)


def test_merge_handles_empty_sides_without_nan():
    out = torch.tensor([[[[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]]])
    lse = torch.tensor([[[0.5, float("-inf"), float("-inf")]]])
    block_out = torch.tensor([[[[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]]])
    block_lse = torch.tensor([[[float("-inf"), 1.5, float("-inf")]]])
    new_out, new_lse = merge_partial(out, lse, block_out, block_lse)
    assert torch.equal(new_out, torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]]]))
    assert new_lse[0, 0, 0] == 0.5 and new_lse[0, 0, 1] == 1.5 and torch.isneginf(new_lse[0, 0, 2])
    # Large LSE gaps do not overflow.
    big, small = torch.tensor([[[1e4]]]), torch.tensor([[[-1e4]]])
    merged_out, merged_lse = merge_partial(torch.ones(1, 1, 1, 1), big, torch.zeros(1, 1, 1, 1), small)
    assert merged_out.item() == 1.0 and merged_lse.item() == 1e4


def test_causal_needs_a_square_block():
    q, k, v = _qkv(sq=4, sk=8)
    with pytest.raises(ValueError, match="square"):
        block_attention_forward(q, k, v, scale=SCALE, causal=True)


def test_reference_attention_matches_sdpa():
    q, k, v = (torch.randn(1, 9, 2, 4, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(reference_attention(q, k, v, causal=True), expected)
