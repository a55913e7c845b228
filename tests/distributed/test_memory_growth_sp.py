"""Under sequence parallelism (ring 2 on 2 gloo ranks) the per-rank peak memory of a training step on
packed rows also grows linearly in T: no rank builds a (T x T) or (T/2 x T/2) mask."""

from __future__ import annotations

from _memory_growth import MAX_GROWTH, growth


def test_sp_world2_8k_16k_32k_grows_linearly(tmp_path):
    rows = growth(tmp_path, "--tokens", "8192", "16384", "32768", "--ring", "2")
    for row in rows[1:]:
        assert row["growth"] <= MAX_GROWTH, rows
