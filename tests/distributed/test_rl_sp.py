"""Stage 6's GRPO loss under MM-SP (gloo, world 4, float64) equals one process: loss, gradients summed
over the SP group, token log-probabilities, the SFT warm-up loss, and the split frame encoding; under
FSDP2 and under DDP (dp 4, and dp 2 x Ulysses 2) one GRPO update equals one process: gradients and
parameters."""

from __future__ import annotations

import pytest
from _launch import run_distributed
from _rl_sp_cases import LAYOUTS, run_world4


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    from _models import lively_checkpoint

    root = tmp_path_factory.mktemp("rl")
    lively_checkpoint(root / "init")
    return run_distributed(run_world4, 4, str(root), timeout=600)


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


def _assert_update_equals_one_process(r: dict, rank: int) -> None:
    got_names, llm_names = r["grad_names"]
    assert got_names == llm_names  # gradients for exactly the LLM's parameters (vision frozen)
    assert r["grad_err"] <= 1e-9, f"rank {rank}: gradient {r['grad_err']:.3g}"
    assert r["moved"] > 1e-4  # the step changed the weights: the comparison is not of constants
    assert r["param_err"] <= 1e-9, f"rank {rank}: parameters {r['param_err']:.3g}"
    assert r["frozen_same"]


@pytest.mark.parametrize("layout", ["dp4u1", "dp2u2"])
def test_rl_update_under_fsdp2_equals_one_process(world4, layout):
    for rank, result in enumerate(world4):
        _assert_update_equals_one_process(result["fsdp"][layout], rank)


@pytest.mark.parametrize("layout", ["dp4u1", "dp2u2"])
def test_rl_update_under_ddp_equals_one_process(world4, layout):
    """Replicated weights, the losses through DDP around `PolicyLoss`, two micro-batches per group (one
    under no_sync): the reduced gradients and the stepped weights are one process's on the mean loss."""
    for rank, result in enumerate(world4):
        r = result["ddp"][layout]
        _assert_update_equals_one_process(r, rank)
        # DDP's bucketed reduction: the comm hook's all-reduces, one per bucket, in the synced backward
        # only, far fewer than the trainable parameters (a per-parameter all-reduce has one each)
        assert 1 <= r["all_reduce_calls"] <= r["trainable"] // 4, r


def test_rl_trainer_under_fsdp2_follows_the_replicated_run(world4):
    """The whole stage-6 loop under FSDP2 (dp 2 x Ulysses 2): the same rollouts, losses and rewards as
    with replicated weights and all-reduced gradients, and the same weights at the end."""
    keys = ("phase", "reward", "accuracy", "rollout_digest")
    for result in world4:
        replicated, sharded = result["trainer"]["false"], result["trainer"]["true"]
        assert sharded["sharded"] and not replicated["sharded"]
        assert sharded["exported"]
        assert [[r.get(k) for k in keys] for r in sharded["metrics"]] == [
            [r.get(k) for k in keys] for r in replicated["metrics"]
        ]
        assert [r["phase"] for r in sharded["metrics"]] == ["sft"] + ["rl"] * 2
        for a, b in zip(sharded["metrics"], replicated["metrics"]):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(abs(b["loss"]), 1e-3)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"]
        assert result["trainer"]["same_names"]
        # float32, reductions in another order: a few ulp per step; each of the 3 steps moves a weight
        # by up to the learning rate (2e-3 / 3e-3), 2 orders of magnitude more than allowed here
        assert result["trainer"]["weight_diff"] <= 2e-5
