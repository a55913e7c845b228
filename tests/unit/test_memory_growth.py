"""Peak memory of a training step on packed rows grows linearly in T: no (T x T) mask or score matrix.

benchmarks/memory_growth.py runs each length in a fresh process and reports the peak RSS the step adds
(forward + backward of the tiny LongVILA on a row of 4 packed samples). Doubling T must not grow it by
more than 2.3x; the same measurement of a dense masked softmax grows ~4x, which the last test checks so
that this one is known to be able to fail.
"""

from __future__ import annotations

from _memory_growth import MAX_GROWTH, growth


def test_one_process_8k_16k_32k_grows_linearly(tmp_path):
    rows = growth(tmp_path, "--tokens", "8192", "16384", "32768")
    for row in rows[1:]:
        assert row["growth"] <= MAX_GROWTH, rows


def test_the_measurement_sees_a_dense_mask(tmp_path):
    """The same benchmark with a dense (T x T) masked softmax in place of the model's attention."""
    rows = growth(tmp_path, "--tokens", "2048", "4096", "--attention", "dense")
    assert rows[1]["growth"] > MAX_GROWTH, rows
