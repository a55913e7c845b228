import pytest

from longvila.parallel.layout import choose_sp_layout
from longvila.parallel.mesh import SequenceParallel
from longvila.parallel.sampler import sp_aware_sampler


@pytest.mark.parametrize(
    ("sp", "node", "heads", "kv", "expected"),
    [
        (8, 8, 28, 4, (4, 2)),  # Qwen2-7B: 7 does not divide the node, 8 not the heads
        (32, 8, 28, 4, (4, 8)),
        (256, 8, 28, 4, (4, 64)),
        (8, 8, 12, 2, (4, 2)),  # Qwen2-1.5B: K/V heads replicated 2x
        (4, 8, 14, 2, (2, 2)),  # Qwen2-0.5B
        (6, 8, 28, 4, (2, 3)),
        (3, 8, 28, 4, (1, 3)),
    ],
)
def test_choose_layout(sp, node, heads, kv, expected):
    layout = choose_sp_layout(sp, node, heads, kv)
    assert (layout.ulysses_degree, layout.ring_degree) == expected
    assert layout.sp_degree == sp and f"U={expected[0]}" in layout.reason


def test_choose_layout_rejects_bad_heads():
    with pytest.raises(ValueError, match="not a multiple of K/V heads"):
        choose_sp_layout(8, 8, 28, 3)


def test_sp_ranks_share_batches_and_dp_ranks_do_not():
    data = list(range(20))
    indices = {}
    for dp_rank in range(2):
        for ring_rank in range(2):
            sp = SequenceParallel(
                ulysses_degree=1, ring_degree=2, dp_degree=2, ring_rank=ring_rank, dp_rank=dp_rank
            )
            sampler = sp_aware_sampler(data, sp, seed=3)
            sampler.set_epoch(1)
            indices[(dp_rank, ring_rank)] = list(sampler)
    assert indices[(0, 0)] == indices[(0, 1)] and indices[(1, 0)] == indices[(1, 1)]
    assert not set(indices[(0, 0)]) & set(indices[(1, 0)])
    assert sorted(indices[(0, 0)] + indices[(1, 0)]) == data
