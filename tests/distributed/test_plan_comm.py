"""The planner's attention communication bytes against the bytes a real gloo run hands torch.distributed
(counted by wrapping its calls, `_comm_traffic.DistTraffic`, not by the code's own CommCounter).

World 4, layouts (U, R) = (2, 2), (1, 4) and (4, 1), GQA 8 query / 2 KV heads (replicated under
Ulysses 4), float32.
"""

from __future__ import annotations

import pytest
from _launch import run_distributed

from longvila.plan import LLMShape
from longvila.plan.timing import attention_comm_bytes

WORLD_SIZE = 4
TOTAL_LEN = 64
LLM = LLMShape(hidden=64, intermediate=128, layers=1, q_heads=8, kv_heads=2, head_dim=8, vocab=16)
LAYOUTS = {"2x2": (2, 2), "ring4": (1, 4), "ulysses4": (4, 1)}


def count_bytes(rank: int, world_size: int) -> dict:
    import torch
    from _comm_traffic import DistTraffic

    from longvila.parallel import init_sp, sp_attention

    counted = {}
    for name, (ulysses, ring) in LAYOUTS.items():
        sp = init_sp(ulysses=ulysses, ring=ring)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, TOTAL_LEN, LLM.q_heads, LLM.head_dim, generator=g)
        k, v = (torch.randn(1, TOTAL_LEN, LLM.kv_heads, LLM.head_dim, generator=g) for _ in range(2))
        q, k, v = (sp.shard(x, dim=1).detach().requires_grad_() for x in (q, k, v))
        with DistTraffic() as forward:
            out = sp_attention(q, k, v, sp, causal=True)
        with DistTraffic() as backward:
            out.sum().backward()
        counted[name] = {"forward": dict(forward.bytes), "backward": dict(backward.bytes)}
    return counted


@pytest.fixture(scope="module")
def results():
    return run_distributed(count_bytes, WORLD_SIZE)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_bytes_equal_counted(results, name):
    ulysses, ring = LAYOUTS[name]
    expected = attention_comm_bytes(
        LLM,
        batch=1,
        total_len=TOTAL_LEN,
        ulysses_degree=ulysses,
        ring_degree=ring,
        element_bytes=4,
        accumulation_bytes=4,
    )
    for by_rank in results:
        assert by_rank[name] == expected
