"""The mask-free decomposition of packed causal attention, against masks and attention built here.

Every piece must be full, a causal square or absent, and together they must cover exactly the
(query, key) pairs that the rule allows: same sample (padding in none) and, if causal, key position <=
query position. The references are masks and float64 softmax attention written in this file.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import longvila.kernels.attention as kernels
from longvila.kernels.attention import attention_pieces, local_attention, prefix_attention
from longvila.model.attention import AttentionContext, longvila_attention
from longvila.parallel.ring import ring_pair_runs

# Shapes: B batch, N heads, T tokens, H head dim; kernel tensors (B, N, T, H).


def _sample_of(bounds, total_len) -> torch.Tensor:
    """(T,) sample index of every position, -1 after the last bound (padding). Written independently."""
    sample = torch.full((total_len,), -1)
    if bounds is None:
        bounds = (0, total_len)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        sample[a:b] = i
    return sample


def _allowed(q_pos, k_pos, bounds, total_len, causal) -> torch.Tensor:
    sample = _sample_of(bounds, total_len)
    ok = (sample[q_pos][:, None] == sample[k_pos][None, :]) & (sample[q_pos][:, None] >= 0)
    if causal:
        ok &= k_pos[None, :] <= q_pos[:, None]
    return ok


def _positions(runs) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b, _ in runs])


def _covered(pieces, q_len, k_len) -> torch.Tensor:
    """How many pieces cover each local (query, key) pair."""
    count = torch.zeros(q_len, k_len, dtype=torch.int64)
    for p in pieces:
        block = torch.ones(p.q_end - p.q_start, p.k_end - p.k_start, dtype=torch.int64)
        if p.causal:
            assert block.shape[0] == block.shape[1], p
            block = block.tril()
        count[p.q_slice, p.k_slice] += block
    return count


def _random_bounds(rng: random.Random, total_len: int):
    kind = rng.choice(["none", "packed", "padded", "empty_sample"])
    if kind == "none":
        return None
    cuts = sorted(rng.sample(range(1, total_len), rng.randint(1, 5)))
    if kind == "empty_sample":
        cuts.insert(1, cuts[0])
    end = total_len if kind != "padded" else rng.randint(cuts[-1], total_len - 1)
    return (0, *cuts, end)


@pytest.mark.parametrize("seed", range(40))
def test_ring_pieces_cover_exactly_the_allowed_pairs(seed):
    rng = random.Random(seed)
    ring = rng.choice([1, 2, 3, 4])
    total_len = 2 * ring * rng.randint(2, 12)
    bounds, causal = _random_bounds(rng, total_len), rng.random() < 0.75
    for rank in range(ring):
        q_runs = ring_pair_runs(total_len, ring, rank)
        for src in range(ring):
            k_runs = ring_pair_runs(total_len, ring, src)
            pieces = attention_pieces(q_runs, k_runs, bounds, causal)
            q_pos, k_pos = _positions(q_runs), _positions(k_runs)
            expected = _allowed(q_pos, k_pos, bounds, total_len, causal).to(torch.int64)
            assert torch.equal(_covered(pieces, len(q_pos), len(k_pos)), expected), (bounds, rank, src)


def test_one_sample_is_one_fused_call_and_zigzag_steps_are_one_block_each():
    total_len, ring = 64, 4
    whole = ((0, total_len, 0),)
    assert attention_pieces(whole, whole, None, True) == (kernels.Piece(0, 64, 0, 64, True),)
    for rank in range(ring):
        for src in range(ring):
            pieces = attention_pieces(
                ring_pair_runs(total_len, ring, rank), ring_pair_runs(total_len, ring, src), None, True
            )
            assert len(pieces) == 1  # the zigzag rule: a causal square, or one full block
    # Packed: one causal square per sample.
    packed = attention_pieces(whole, whole, (0, 10, 30, 64), True)
    assert sorted((p.q_start, p.q_end, p.causal) for p in packed) == [
        (0, 10, True),
        (10, 30, True),
        (30, 64, True),
    ]


def _masked_sdpa(q, k, v, allowed, scale):
    """float64 softmax attention with a mask built by the test; rows that see nothing give 0."""
    nq, nk = q.shape[1], k.shape[1]
    kk, vv = (x.repeat_interleave(nq // nk, dim=1) for x in (k, v))
    scores = (q @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return probs @ vv


def _qkv(total_len, nq=4, nk=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, nq, total_len, 8, dtype=dtype, generator=g)
    k, v = (torch.randn(2, nk, total_len, 8, dtype=dtype, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize(
    "bounds", [None, (0, 7, 19, 40), (0, 5, 5, 33), (0, 12, 31)], ids=["one", "packed", "empty", "padded"]
)
@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_matches_masked_softmax_in_float64(bounds, causal):
    total_len, scale = 40, 8**-0.5
    q, k, v = _qkv(total_len)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    refs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = local_attention(*leaves, scale=scale, causal=causal, boundaries=bounds)
    pos = torch.arange(total_len)
    ref = _masked_sdpa(*refs, _allowed(pos, pos, bounds, total_len, causal), scale)
    dout = torch.randn_like(ref)
    out.backward(dout)
    ref.backward(dout)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-11, atol=1e-11)


def test_dropping_sample_boundaries_is_caught(monkeypatch):
    """Mutation: a decomposition that forgets the samples' bounds lets tokens see other samples."""
    total_len, scale, bounds = 40, 8**-0.5, (0, 7, 19, 40)
    q, k, v = _qkv(total_len)
    pos = torch.arange(total_len)
    ref = _masked_sdpa(q, k, v, _allowed(pos, pos, bounds, total_len, True), scale)
    original = kernels.attention_pieces
    monkeypatch.setattr(
        kernels, "attention_pieces", lambda q_runs, k_runs, _b, c: original(q_runs, k_runs, None, c)
    )
    mutated = local_attention(q, k, v, scale=scale, causal=True, boundaries=bounds)
    assert (mutated - ref).abs().max() > 1e-3
    runs = ((0, total_len, 0),)
    wrong = _covered(original(runs, runs, None, True), total_len, total_len)
    assert not torch.equal(wrong, _allowed(pos, pos, bounds, total_len, True).to(torch.int64))


def test_prefix_attention_is_causal_attention_of_the_last_queries():
    sq, sk, scale = 6, 20, 8**-0.5
    q, k, v = _qkv(sk)
    q = q[:, :, -sq:]
    q_pos, k_pos = torch.arange(sk - sq, sk), torch.arange(sk)
    expected = _masked_sdpa(q, k, v, k_pos[None, :] <= q_pos[:, None], scale)
    torch.testing.assert_close(prefix_attention(q, k, v, scale=scale), expected, rtol=1e-12, atol=1e-12)


def test_left_padded_prefill_sees_only_each_rows_real_keys():
    """The model's attention with key_padding (generation): each row as if alone, padding queries 0."""
    total_len, scale = 12, 8**-0.5
    q, k, v = _qkv(total_len)
    pads = [0, 5]
    key_padding = torch.ones(2, total_len, dtype=torch.bool)
    key_padding[1, : pads[1]] = False
    with torch.no_grad():
        out, _ = longvila_attention(
            None, q, k, v, None, scale, longvila_ctx=AttentionContext(key_padding=key_padding)
        )
        for row, pad in enumerate(pads):
            alone = F.scaled_dot_product_attention(
                q[row : row + 1, :, pad:], k[row : row + 1, :, pad:], v[row : row + 1, :, pad:],
                is_causal=True, scale=scale, enable_gqa=True,
            )  # fmt: skip
            torch.testing.assert_close(out[row, pad:], alone[0].transpose(0, 1), rtol=1e-12, atol=1e-12)
            assert (out[row, :pad] == 0).all()
        # A chunk after its cache (chunked prefill), with the same padding.
        chunk, _ = longvila_attention(
            None, q[:, :, -4:], k, v, None, scale, longvila_ctx=AttentionContext(key_padding=key_padding)
        )
    torch.testing.assert_close(chunk, out[:, -4:], rtol=1e-12, atol=1e-12)


def test_bfloat16_kernel_path_tracks_float64():
    total_len, scale, bounds = 96, 8**-0.5, (0, 30, 70, 96)
    q, k, v = _qkv(total_len)
    pos = torch.arange(total_len)
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out = local_attention(*leaves, scale=scale, boundaries=bounds)
    assert out.dtype == torch.bfloat16
    refs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = _masked_sdpa(*refs, _allowed(pos, pos, bounds, total_len, True), scale)
    dout = torch.randn_like(ref)
    out.backward(dout.to(torch.bfloat16))
    ref.backward(dout)
    assert (out.double() - ref).abs().max() < 3e-2
    for got, want in zip(leaves, refs):
        assert (got.grad.double() - want.grad).abs().max() < 5e-2 * want.grad.abs().max()


def test_autocast_reaches_the_kernel_in_one_dtype(monkeypatch):
    seen = []
    original = kernels.block_attention_forward

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, **kw)

    monkeypatch.setattr(kernels, "block_attention_forward", spy)
    q, k, v = _qkv(16, dtype=torch.float32)
    ctx = AttentionContext(cu_seqlens=(0, 9, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = longvila_attention(None, q, k, v.to(torch.bfloat16), None, 0.3, longvila_ctx=ctx)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    assert out.dtype == torch.bfloat16


def test_bad_bounds_and_dtypes_are_rejected():
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        local_attention(q, k, v, scale=1.0, boundaries=(0, 6, 4, 10))
    with pytest.raises(ValueError, match="share one dtype"):
        kernels.block_attention_forward(q, k.float(), v, scale=1.0)


def test_sp_decode_attention_is_exact_and_never_copies_the_cache_per_query_head():
    """One new token against a cache with some invalid keys: exact in float64, and no op makes a
    tensor as large as the cache repeated to every query head (the old path did, in float32)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from longvila.parallel import SequenceParallel

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    q, k, v = _qkv(64, nq=8, nk=2)
    q = q[:, :, -1:]
    valid = torch.rand(2, 64, generator=torch.Generator().manual_seed(3)) > 0.3
    with Largest():
        out = SequenceParallel.single().decode_attention(q, k, v, valid, scale=0.3)
    assert Largest.largest < q.shape[0] * q.shape[1] * k.shape[2] * k.shape[3]  # B * Nq * Sk * H
    expected = _masked_sdpa(q, k, v, valid[:, None, None, :], 0.3).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
