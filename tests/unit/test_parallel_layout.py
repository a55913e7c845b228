"""The zigzag 2D layout, the degree-1 path and the errors for bad layouts (no process group)."""

from __future__ import annotations

import pytest
import torch

from longvila.kernels.attention import reference_attention, segment_ids_from_cu_seqlens
from longvila.parallel import SequenceParallel, init_sp, sp_attention, zigzag_indices
from longvila.parallel.hybrid import sp_attention_comm_bytes
from longvila.parallel.ulysses import check_heads


def test_zigzag_indices_for_ring2_ulysses4():
    # 16 tokens, 4 chunks of 4: ring rank 0 holds chunks 0 and 3, cut into 4 pieces of 2 tokens.
    pieces = [zigzag_indices(16, 2, 4, 0, u).tolist() for u in range(4)]
    assert pieces == [[0, 1], [2, 3], [12, 13], [14, 15]]
    assert zigzag_indices(16, 2, 4, 1, 3).tolist() == [10, 11]


@pytest.mark.parametrize(("ring", "ulysses"), [(1, 1), (1, 4), (4, 1), (2, 2), (3, 2), (2, 3)])
def test_ulysses_pieces_rebuild_the_ring_pair(ring, ulysses):
    total_len = 2 * ring * ulysses * 3
    chunk = total_len // (2 * ring)
    every = []
    for r in range(ring):
        pair = torch.cat([zigzag_indices(total_len, ring, ulysses, r, u) for u in range(ulysses)])
        if ring > 1:
            expected = list(range(r * chunk, (r + 1) * chunk))
            expected += list(range((2 * ring - 1 - r) * chunk, (2 * ring - r) * chunk))
            assert pair.tolist() == expected
        every.append(pair)
    assert sorted(torch.cat(every).tolist()) == list(range(total_len))


@pytest.mark.parametrize(("ring", "ulysses"), [(2, 2), (4, 1), (1, 4)])
def test_shard_then_reassemble_round_trip(ring, ulysses):
    total_len = 2 * ring * ulysses * 2
    x = torch.randn(3, total_len, 5)
    shares = []
    for r in range(ring):
        for u in range(ulysses):
            # layout arithmetic of one rank; shard needs no process group
            sp = SequenceParallel(ring_degree=ring, ulysses_degree=ulysses, ring_rank=r, ulysses_rank=u)
            shares.append(sp.shard(x, dim=1))
            assert torch.equal(shares[-1], x[:, sp.local_positions(total_len)])
    order = SequenceParallel(ring_degree=ring, ulysses_degree=ulysses).rank_order_indices(total_len)
    rebuilt = torch.cat(shares, dim=1).index_select(1, torch.argsort(order))
    assert torch.equal(rebuilt, x)


def test_single_is_identity_and_init_sp_without_process_group():
    sp = init_sp(1, 1)
    assert isinstance(sp, SequenceParallel)
    assert (sp.sp_degree, sp.sp_rank, sp.dp_degree, sp.ring_degree, sp.ulysses_degree) == (1, 0, 1, 1, 1)
    x = torch.randn(2, 7, 3)
    assert sp.shard(x, 1) is x and sp.gather(x, 1) is x
    assert sp.local_positions(7).tolist() == list(range(7))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cu", [None, [0, 3, 10, 17], [0, 6, 12]])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
def test_degree_one_equals_plain_attention(causal, cu, heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 17, heads[0], 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 17, heads[1], 8, dtype=torch.float64, generator=g) for _ in range(2))
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    dout = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = sp_attention(*leaves, SequenceParallel.single(), causal=causal, cu_seqlens=cu)
    out.backward(dout)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_leaves, causal=causal, cu_seqlens=cu)
    ref.backward(dout)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()


def test_degree_one_matches_torch_sdpa_causal():
    q, k, v = (torch.randn(1, 12, 2, 4, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(sp_attention(q, k, v), expected)


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="torch.distributed"):
        init_sp(ulysses=2, ring=1)
    with pytest.raises(ValueError, match=">= 1"):
        init_sp(ulysses=0)
    with pytest.raises(ValueError, match="sequence length 20"):
        zigzag_indices(20, ring_degree=4, ulysses_degree=1)
    with pytest.raises(ValueError, match="sequence length 6"):
        zigzag_indices(6, ring_degree=1, ulysses_degree=4)
    with pytest.raises(ValueError, match="query heads 6"):
        check_heads(6, 6, 4)
    with pytest.raises(ValueError, match="K/V heads 3"):
        check_heads(6, 3, 2)
    with pytest.raises(ValueError, match="multiple of K/V heads"):
        check_heads(8, 3, 1)
    check_heads(8, 1, 4)
    check_heads(16, 2, 8)


def test_bad_cu_seqlens_raise():
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_ids_from_cu_seqlens(torch.tensor([1, 4]), 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 5, 3]), 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 9]), 8)
    assert segment_ids_from_cu_seqlens(torch.tensor([0, 3, 6]), 8).tolist() == [0, 0, 0, 1, 1, 1, -1, -1]


def test_bad_shapes_raise():
    q = torch.randn(1, 8, 4, 8)
    with pytest.raises(ValueError, match="expected q"):
        sp_attention(q, torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4))


def test_comm_formula_by_hand():
    # B 1, T 32, Nq 8, Nk 2, H 8, U 2, R 2, float64: S = 8.
    got = sp_attention_comm_bytes(
        batch=1,
        total_len=32,
        q_heads=8,
        kv_heads=2,
        head_dim=8,
        ulysses_degree=2,
        ring_degree=2,
        element_bytes=8,
        accumulation_bytes=8,
    )
    a2a = (2 * 8 + 2 * 2) * 8 * 8 * 8 // 2  # (2 Nq + 2 Nk) S H e (U-1)/U
    kv = 2 * 16 * 1 * 8 * 8  # K and V of one pair (T/R = 16 tokens) for Nk/U = 1 head
    assert got == {
        "forward": {"all_to_all": a2a, "ring_p2p": kv},
        "backward": {"all_to_all": a2a, "ring_p2p": kv + 2 * kv},
    }
    single = sp_attention_comm_bytes(
        batch=1,
        total_len=8,
        q_heads=2,
        kv_heads=2,
        head_dim=4,
        ulysses_degree=1,
        ring_degree=1,
        element_bytes=2,
    )
    assert single == {"forward": {}, "backward": {}}
