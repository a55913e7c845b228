"""Sequence-parallel attention on a world-4 gloo group against single-process float64 attention.

One process group runs every case (spawning costs seconds); the tests below read its results.
Layouts: (U, R) = (4, 1), (1, 4), (2, 2), and dp 2 x (2, 1).
"""

from __future__ import annotations

import pytest
from _launch import run_distributed
from _sp_attention_cases import HEADS, LAYOUTS, WORLD_SIZE, attention_cases, run_all

TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def results():
    return run_distributed(run_all, WORLD_SIZE)


@pytest.mark.parametrize("case", attention_cases(), ids=lambda case: case[0])
def test_matches_single_process(results, case):
    for rank, by_rank in enumerate(results):
        errors = by_rank["attention"][case[0]]
        assert not errors["nan"], f"rank {rank}: NaN"
        for key in ("out", "out_local", "dq", "dk", "dv"):
            assert errors[key] <= TOLERANCE, f"rank {rank}: {key} relative error {errors[key]:.3g}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_counted_bytes_equal_formula(results, layout, heads):
    ulysses, ring = LAYOUTS[layout]
    for by_rank in results:
        counted = by_rank["bytes"][f"{layout}-h{heads[0]}kv{heads[1]}"]
        assert counted["forward"] == counted["expected"]["forward"]
        assert counted["backward"] == counted["expected"]["backward"]
        assert ("all_to_all" in counted["forward"]) == (ulysses > 1)
        assert ("ring_p2p" in counted["forward"]) == (ring > 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gather_gradient_convention(results, layout):
    for by_rank in results:
        assert by_rank["gather"][layout]["round_trip"]
        assert by_rank["gather"][layout]["bytes_match"]
        assert by_rank["gather"][layout]["grad"] <= TOLERANCE


def test_rank_with_only_padding_returns_zeros(results):
    padded = [by_rank["padded_rank"] for by_rank in results]
    assert [p["all_padding"] for p in padded] == [False, False, True, True]
    for p in padded:
        assert p["finite"]
    for p in padded[2:]:
        assert p["out_zero"] and p["grads_zero"]


def test_bad_layouts_raise(results):
    for by_rank in results:
        assert all(by_rank["errors"].values()), by_rank["errors"]


def test_mesh_coordinates(results):
    # global rank = dp_rank * (R * U) + ring_rank * U + ulysses_rank: Ulysses contiguous, ring strided.
    for rank, by_rank in enumerate(results):
        for name, (dp_rank, ring_rank, ulysses_rank, sp_rank, sp_degree, dp_degree) in by_rank[
            "coords"
        ].items():
            ulysses, ring = LAYOUTS[name]
            assert (sp_degree, dp_degree) == (ulysses * ring, WORLD_SIZE // (ulysses * ring))
            assert rank == dp_rank * ulysses * ring + ring_rank * ulysses + ulysses_rank
            assert sp_rank == ring_rank * ulysses + ulysses_rank
