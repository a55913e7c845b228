"""The scale planner: shapes, the activation count, communication bytes, paper-scale predictions, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longvila.plan import (
    H100,
    PRESETS,
    Layout,
    Workload,
    llm_layer_activation_bytes,
    load_shape,
    predict_memory,
)
from longvila.plan.search import evaluate, layout_problems, max_sequence_length, plan
from longvila.plan.timing import attention_comm_bytes

SEVEN_B = PRESETS["7b"]
PAPER_TOKENS = 578 * 1024


def test_presets_match_known_parameter_counts():
    assert SEVEN_B.llm.params == pytest.approx(7.62e9, rel=0.01)  # Qwen2-7B
    assert PRESETS["1.5b"].llm.params == pytest.approx(1.54e9, rel=0.01)
    assert PRESETS["0.5b"].llm.params == pytest.approx(0.494e9, rel=0.01)
    assert SEVEN_B.vision.params == pytest.approx(0.413e9, rel=0.01)  # SigLIP-so400m without its pooling head
    assert SEVEN_B.tokens_per_frame == 196


def test_shape_from_longvila_and_hf_configs(tmp_path):
    from longvila.config import LongVILAConfig

    config = LongVILAConfig.tiny()
    config.save(tmp_path / "config.json")
    shape = load_shape(str(tmp_path))
    assert shape.llm.hidden == 64 and shape.llm.kv_heads == 2 and shape.tokens_per_frame == 16
    (tmp_path / "hf.json").write_text(json.dumps({**config.llm, "num_hidden_layers": 5}))
    assert load_shape(str(tmp_path / "hf.json")).llm.layers == 5
    with pytest.raises(ValueError, match="neither a preset"):
        load_shape("no-such-model")


def test_activation_count_of_a_qwen2_layer():
    # 13 tensors + statistics, bf16 7B: 2*(4h + 2h + 4) + 2*(q + 2kv) + 2*2q + 4*Nq + 4*2*I.
    h, q, kv, inter = 3584, 3584, 512, 18944
    expected = 2 * (4 * h + 2 * h + 4) + 2 * (q + 2 * kv) + 4 * q + 4 * 28 + 8 * inter
    assert llm_layer_activation_bytes(SEVEN_B.llm, 2) == expected
    # Ulysses 8 > 4 KV heads: K/V replicated to 8 heads.
    assert llm_layer_activation_bytes(SEVEN_B.llm, 2, ulysses=8) == expected + 2 * 2 * 4 * 128


def _transfers_written_out(llm, *, total, ulysses, ring, e, e_acc):
    """The bytes one rank receives in one SP attention call (batch 1), tensor by tensor, following the
    algorithm step by step (docs/parallelism.md, "Attention"): {pass: {collective: bytes}}."""
    local = total // (ulysses * ring)  # tokens of each tensor on this rank before the all-to-all
    kv_heads = llm.kv_heads if llm.kv_heads >= ulysses else ulysses  # K/V heads repeated up to U
    transfers = {"forward": {}, "backward": {}}
    if ulysses > 1:

        def all_to_all(heads):  # this rank keeps 1/U of the tensor and receives the other U - 1 parts
            return local * heads * llm.head_dim * e * (ulysses - 1) // ulysses

        q, kv = all_to_all(llm.q_heads), all_to_all(kv_heads)
        transfers["forward"]["all_to_all"] = q + kv + kv + q  # q, k, v to heads; the output back
        transfers["backward"]["all_to_all"] = q + q + kv + kv  # dO to heads; dQ, dK, dV back
    if ring > 1:
        # after the all-to-all a rank holds its ring pair (T / R tokens) on 1/U of the K/V heads
        k_and_v = 2 * (total // ring) * (kv_heads // ulysses) * llm.head_dim
        hops = ring - 1  # steps 1 .. R-1 each receive the K/V of the previous ring rank
        transfers["forward"]["ring_p2p"] = hops * k_and_v * e
        # backward: the K/V travel again, and the dK/dV (accumulation dtype) each step, R hops, the
        # last one taking every pair's gradient home
        transfers["backward"]["ring_p2p"] = hops * k_and_v * e + ring * k_and_v * e_acc
    return transfers


@pytest.mark.parametrize("ulysses,ring", [(1, 1), (4, 1), (1, 4), (2, 2), (8, 1), (4, 16), (2, 32)])
@pytest.mark.parametrize("dtype_bytes", [(2, 4), (8, 8)])
def test_comm_bytes_equal_the_transfers_written_out(ulysses, ring, dtype_bytes):
    """plan/timing's bytes (the formula `sp_attention` follows) against the transfers derived in the test.
    The distributed tests count real float32 runs (tests/distributed/test_plan_comm.py); this covers the
    paper-scale layouts and bf16 inputs with float32 dK/dV, where the two element sizes differ."""
    e, e_acc = dtype_bytes
    for llm in (SEVEN_B.llm, PRESETS["8b"].llm, PRESETS["1.5b"].llm):
        if llm.q_heads % ulysses:
            continue
        total = 2 * ulysses * ring * 1000
        ours = attention_comm_bytes(
            llm,
            batch=1,
            total_len=total,
            ulysses_degree=ulysses,
            ring_degree=ring,
            element_bytes=e,
            accumulation_bytes=e_acc,
        )
        assert ours == _transfers_written_out(llm, total=total, ulysses=ulysses, ring=ring, e=e, e_acc=e_acc)


def test_comm_bytes_worked_example():
    """Qwen2-1.5B (12 query heads, 2 K/V heads of 128), U = 4, R = 2, T = 16,000, bf16 with float32 dK/dV,
    by hand: S = 2,000 tokens, K/V heads repeated to 4. All-to-all of q (and of the output, dO, dQ):
    2,000 x 12 x 128 x 2 B x 3/4 = 4,608,000 B; of k (v, dK, dV): 2,000 x 4 x 128 x 2 x 3/4 = 1,536,000 B;
    each pass 2 x 4,608,000 + 2 x 1,536,000 = 12,288,000 B. Ring: K and V of a pair, 8,000 tokens x 1 head
    x 128 = 2 x 1,024,000 elements; forward one hop of bf16 = 4,096,000 B; backward that again plus two
    hops of float32 dK/dV = 4,096,000 + 2 x 8,192,000 = 20,480,000 B."""
    got = attention_comm_bytes(
        PRESETS["1.5b"].llm,
        batch=1,
        total_len=16_000,
        ulysses_degree=4,
        ring_degree=2,
        element_bytes=2,
        accumulation_bytes=4,
    )
    assert got == {
        "forward": {"all_to_all": 12_288_000, "ring_p2p": 4_096_000},
        "backward": {"all_to_all": 12_288_000, "ring_p2p": 20_480_000},
    }


def _step(layout, model="7b", **links):
    hardware = H100.with_links(**links)
    return evaluate(PRESETS[model], layout, Workload(tokens=PAPER_TOKENS), hardware)


def test_2d_beats_zigzag_ring_across_nodes_at_64_gpus():
    # The planner's defaults: the ring's cross-node hops at the efficiency fitted to the paper's
    # measured ring (benchmarks/plan_ring_fit.py), the kernel slowed by the measured overlap cost.
    ring = _step(Layout(ulysses=1, ring=64))
    two_d = _step(Layout(ulysses=4, ring=16))
    assert ring.fits and two_d.fits
    assert ring.time.ring_link == "infiniband"
    assert ring.time.total >= 2 * two_d.time.total  # 7B (Qwen2, 4 KV heads)
    eight_b = _step(Layout(ulysses=8, ring=8), "8b")
    eight_b_ring = _step(Layout(ulysses=1, ring=64), "8b")
    assert 3.5 * eight_b.time.total <= eight_b_ring.time.total <= 5.7 * eight_b.time.total
    # With the hops at the full 50 GB/s the ring is compute-bound and hides its traffic: 2D still
    # wins (by the ring's exposed per-step costs), but only narrowly.
    full_ring = _step(Layout(ulysses=1, ring=64), ring_p2p_efficiency=1.0)
    full_two_d = _step(Layout(ulysses=4, ring=16), ring_p2p_efficiency=1.0)
    assert full_two_d.time.total < full_ring.time.total < 1.2 * full_two_d.time.total
    assert full_two_d.time.ring_exposed * 3 < full_ring.time.ring_exposed
    # The ring is what separates them: the matmuls and vision are the same work per GPU.
    assert ring.time.linear == pytest.approx(two_d.time.linear)


def test_ring_overlap_slowdown_follows_the_measured_points():
    assert H100.ring_overlap_slowdown(4096) == pytest.approx(0.186)
    assert H100.ring_overlap_slowdown(32768) == pytest.approx(0.042)
    assert H100.ring_overlap_slowdown(1024) == pytest.approx(0.186)
    assert H100.ring_overlap_slowdown(1 << 20) == 0.0
    values = [H100.ring_overlap_slowdown(t) for t in (4096, 8192, 16384, 32768, 65536)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="ring_p2p_efficiency"):
        H100.with_links(ring_p2p_efficiency=0.0)


def test_shipped_ring_efficiency_is_the_fit_to_the_paper():
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "plan_ring_fit.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--check"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fitted ring_p2p_efficiency" in done.stdout


def test_pure_ulysses_is_capped_by_heads_and_node():
    # 28 query heads: Ulysses 8 (a full node) does not divide them, nor does 64.
    assert layout_problems(SEVEN_B, Layout(ulysses=8), H100)
    assert any("query heads" in p for p in layout_problems(SEVEN_B, Layout(ulysses=64), H100))
    assert not layout_problems(SEVEN_B, Layout(ulysses=4), H100)
    assert not layout_problems(PRESETS["8b"], Layout(ulysses=8), H100)  # KV heads 8 | 8
    # Ulysses 8 on 1.5B (2 KV heads): K/V replicated, valid except for the 12 query heads.
    assert any("query heads" in p for p in layout_problems(PRESETS["1.5b"], Layout(ulysses=8), H100))
    result = plan(SEVEN_B, Workload(tokens=PAPER_TOKENS), 64, H100)
    ulysses_only = [c for c in result.candidates if c.role == "Ulysses only"]
    assert all(not c.fits for c in ulysses_only if c.layout.ulysses > 4)


def test_longest_sequence_on_256_gpus_is_millions_without_checkpointing():
    tokens, cand = max_sequence_length(SEVEN_B, 256, H100, checkpointing=False)
    assert 1_000_000 <= tokens < 4_000_000
    assert cand is not None and not cand.layout.checkpointing and cand.layout.sp == 256
    longer, _ = max_sequence_length(SEVEN_B, 256, H100, checkpointing=True)
    assert longer > tokens


def test_plan_7b_2048_frames_on_32_nodes():
    result = plan(SEVEN_B, Workload.from_frames(2048), 256, H100)
    best = result.best
    assert best is not None and best.fits
    lay = best.layout
    assert lay.world == 256 and 256 % lay.sp == 0
    assert SEVEN_B.llm.q_heads % lay.ulysses == 0 and lay.ulysses <= 8
    assert best.memory.peak <= H100.memory_bytes
    text = result.explain()
    assert "Chosen" in text and f"Ulysses {lay.ulysses}" in text
    assert lay.overrides()[:4] == [
        "--parallel.ulysses_degree",
        str(lay.ulysses),
        "--parallel.ring_degree",
        str(lay.ring),
    ]


def test_memory_parts_scale_as_expected():
    workload = Workload.from_frames(1024)
    small = predict_memory(SEVEN_B, Layout(ulysses=4, ring=8), workload)
    large = predict_memory(SEVEN_B, Layout(ulysses=4, ring=16), workload)
    assert large.activations == pytest.approx(small.activations / 2, rel=0.01)
    ckpt = predict_memory(SEVEN_B, Layout(ulysses=4, ring=8, checkpointing=True), workload)
    assert ckpt.activations < small.activations / 10


def test_cli_plan_prints_table_and_overrides(capsys):
    from longvila.cli import main

    assert main(["plan", "--model", "7b", "--frames", "2048", "--gpus", "256", "--emit-overrides"]) == 0
    out = capsys.readouterr().out
    assert "ring only" in out and "Chosen" in out
    assert out.strip().splitlines()[-1].startswith("--parallel.ulysses_degree")
    assert main(["plan", "--model", "nope", "--frames", "8", "--gpus", "8"]) == 2
    assert main(["plan", "--frames", "8", "--gpus", "12"]) == 2  # not whole nodes


def test_plan_package_does_not_import_torch():
    code = "import sys, longvila.plan, longvila.commands.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "fitting"),
    [
        (28, 4, {1, 2, 4, 28}),  # Qwen2-7B: 7 and 14 do not fit the 4 K/V heads; 8 does not divide 28
        (12, 2, {1, 2, 4, 6, 12}),  # Qwen2-1.5B: U 4, 6, 12 replicate the 2 K/V heads
        (14, 2, {1, 2, 14}),  # Qwen2-0.5B
        (32, 8, {1, 2, 4, 8, 16, 32}),  # Llama-3-8B
    ],
)
def test_one_head_rule_for_runtime_and_planner(q_heads, kv_heads, fitting):
    from longvila.parallel.ulysses import check_heads
    from longvila.plan.rules import ulysses_head_problems

    for ulysses in range(1, 33):
        # the rule, written independently: U | Nq, and Nk | U or U | Nk
        fits = q_heads % ulysses == 0 and (kv_heads % ulysses == 0 or ulysses % kv_heads == 0)
        assert fits == (ulysses in fitting)
        problems = ulysses_head_problems(q_heads, kv_heads, ulysses)
        assert (not problems) == fits
        if fits:
            check_heads(q_heads, kv_heads, ulysses)
        else:
            with pytest.raises(ValueError, match="heads"):
                check_heads(q_heads, kv_heads, ulysses)
    with pytest.raises(ValueError, match="not a multiple of K/V heads"):
        check_heads(28, 3, 1)
