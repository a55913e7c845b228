"""MM-SP through the tiny LongVILA model (float64, gloo, world 4 and 2) against one process."""

from __future__ import annotations

import pytest
from _launch import run_distributed
from _mmsp_cases import LAYOUTS, run_world2, run_world4


@pytest.fixture(scope="module")
def world4():
    return run_distributed(run_world4, 4, timeout=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_and_summed_gradients_equal_single_process(world4, layout):
    for rank, result in enumerate(world4):
        r = result["loss_grads"][layout]
        assert r["loss_rel"] <= 1e-10, f"rank {rank}: loss {r['loss_rel']:.3g}"
        assert r["count"][0] == r["count"][1]
        assert r["grad_rel"] <= 1e-9, f"rank {rank}: gradient {r['grad_rel']:.3g}"
        assert r["vision_grad_nonzero"] and r["vision_grad_rel"] <= 1e-9


def test_fewer_frames_than_ranks(world4):
    assert [r["few_frames"]["local_frames"] for r in world4] == [1, 1, 0, 0]
    for r in world4:
        assert r["few_frames"]["loss_rel"] <= 1e-10


def test_bad_layouts_fail_before_any_work(world4):
    for r in world4:
        assert "does not divide the world size 4" in r["bad"]["world"]
        assert "not divisible by the Ulysses degree 4" in r["bad"]["heads"]
        assert "pad the sequence" in r["bad"]["length"]


def test_sp_generate_returns_the_single_process_tokens_on_4_ranks(world4):
    for r in world4:
        for layout, tokens in r["generate"]["sp"].items():
            assert tokens == r["generate"]["ref"], layout
        assert r["generate"]["ref_embeds"] == r["generate"]["ref"]
        for layout, tokens in r["generate"]["sp_embeds"].items():
            assert tokens == r["generate"]["ref"], layout


def test_sp_generate_returns_the_single_process_tokens_on_2_ranks():
    for r in run_distributed(run_world2, 2, timeout=300):
        for layout, tokens in r["generate"]["sp"].items():
            assert tokens == r["generate"]["ref"], layout
        assert r["generate"]["ref_embeds"] == r["generate"]["ref"]
        for layout, tokens in r["generate"]["sp_embeds"].items():
            assert tokens == r["generate"]["ref"], layout


def test_fsdp2_adamw_step_equals_single_process_on_both_batches(world4):
    for r in world4:
        assert r["fsdp"]["param_rel"] <= 1e-9, r["fsdp"]
