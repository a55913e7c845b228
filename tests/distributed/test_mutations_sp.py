"""Mutation check on gloo ranks: replace ring attention's log-sum-exp merge of partial results with a
max and require test_sp_attention's single-process check to fail on every ring case."""

from __future__ import annotations

import pytest
import test_sp_attention as guard
from _launch import run_distributed
from _sp_attention_cases import WORLD_SIZE, attention_cases, run_with_broken_lse_merge


@pytest.fixture(scope="module")
def mutated():
    return run_distributed(run_with_broken_lse_merge, WORLD_SIZE)


def test_a_broken_lse_merge_fails_the_attention_check(mutated):
    ring_cases = [case for case in attention_cases() if case[0] in mutated[0]["attention"]]
    assert ring_cases, "no ring case ran"
    caught = 0
    for case in ring_cases:
        try:
            guard.test_matches_single_process(mutated, case)
        except AssertionError:
            caught += 1
    # Every ring case attends across ranks (more than one block is merged), so each one must fail.
    assert caught == len(ring_cases), f"{len(ring_cases) - caught} ring cases passed with a broken merge"
