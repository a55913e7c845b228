"""Stage 6's GRPO loss under MM-SP (gloo, world 4, float64) equals one process: loss, gradients summed
over the SP group, token log-probabilities, the SFT warm-up loss, and the split frame encoding."""

from __future__ import annotations

import pytest
from _launch import run_distributed
from _rl_sp_cases import LAYOUTS, run_world4


@pytest.fixture(scope="module")
def world4():
    return run_distributed(run_world4, 4, timeout=600)


@pytest.mark.parametrize("agg", ["sequence_mean", "token_mean"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rl_loss_and_gradients_under_sp_equal_one_process(world4, layout, agg):
    for rank, result in enumerate(world4):
        r = result["loss_grads"][f"{layout}/{agg}"]
        got, want = r["loss"]
        assert abs(got - want) <= 1e-10 * abs(want), f"rank {rank}: loss {got} vs {want}"
        assert r["grad_scale"] > 1e-6
        assert r["grad_err"] <= 1e-9, f"rank {rank}: gradient {r['grad_err']:.3g}"
        assert r["logp_err"] <= 1e-10
        assert r["tokens"][0] == r["tokens"][1] and r["clipped"][0] == r["clipped"][1]
        assert r["clipped"][1] > 0 and abs(r["kl"][0] - r["kl"][1]) <= 1e-10 * abs(r["kl"][1])
        assert abs(r["sft"][0] - r["sft"][1]) <= 1e-10 * abs(r["sft"][1])
    # each rank held only a share of the reply tokens
    shares = [result["loss_grads"][f"{layout}/{agg}"]["local_tokens"] for result in world4]
    assert sum(shares) == world4[0]["loss_grads"][f"{layout}/{agg}"]["tokens"][1]
    assert max(shares) < sum(shares)


def test_embedding_cache_splits_frames_over_sp_ranks(world4):
    assert [r["cache"]["frames_here"] for r in world4] == [[2], [2], [1], [1]]  # 6 frames over 4 ranks
    for r in world4:
        assert r["cache"]["err"] <= 1e-12
        assert r["cache"]["same"]
        assert r["cache"]["state"]["encodes"] == 1 and r["cache"]["state"]["memory_hits"] == 1
