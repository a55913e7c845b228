"""The one-GPU benchmark scripts run end to end at a CPU size and report what they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script, *args, tmp_path):
    out = tmp_path / f"{script}.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_step_runs_every_stack_and_reports_ratios(tmp_path):
    result = run(
        "train_step.py",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--tokens",
        "64",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--variants",
        "longvila,longvila-sel,hf,hf-ckpt",
        tmp_path=tmp_path,
    )
    cases = {c["variant"]: c for c in result["cases"]}
    assert set(cases) == {"longvila", "longvila-sel", "hf", "hf-ckpt"}
    for case in cases.values():
        assert case["tokens_per_s"] > 0 and 0 < case["mfu"] < 1 and case["peak_gib"] >= 0
    assert "speed_vs_hf" in cases["longvila"] and "device" in result["machine"]


def test_train_step_find_max_stops_at_the_first_oom(tmp_path, monkeypatch):
    # On CPU nothing runs out of memory quickly; check the option's bookkeeping with a tiny start instead.
    result = run(
        "train_step.py",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--tokens",
        "32",
        "--variants",
        "longvila",
        "--steps",
        "1",
        "--warmup",
        "0",
        tmp_path=tmp_path,
    )
    assert result["cases"][0]["tokens"] == 32


def test_vision_and_prefill_benchmarks(tmp_path):
    vision = run(
        "vision.py",
        "--device",
        "cpu",
        "--tiny",
        "--frames",
        "8",
        "--batch",
        "4",
        "--steps",
        "1",
        tmp_path=tmp_path,
    )
    assert vision["longvila"]["frames_per_s"] > 0 and vision["speedup"] > 0
    prefill = run(
        "prefill.py",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--frames",
        "4",
        "--tokens-per-frame",
        "17",
        "--chunk",
        "32",
        tmp_path=tmp_path,
    )
    variants = {c["variant"] for c in prefill["cases"]}
    assert variants == {"hf", "longvila"} and all(c["ttft_s"] > 0 for c in prefill["cases"])


@pytest.mark.parametrize("ring_degree", [2, 3, 4])
@pytest.mark.parametrize("bounds", [None, (0, 10, 29, 41)], ids=["one-sample", "packed+padding"])
def test_simulated_ring_equals_masked_sdpa(ring_degree, bounds):
    """benchmarks/attention.py's ring: the library's ring loop run for every rank on one device
    (`simulate_ring_attention`) gives float64 SDPA's output and gradients, the mask built here: causal
    within each packed sample (the samples cut the zigzag chunks anywhere); tokens after the last bound
    are padding, which sees no key (output 0)."""
    import torch
    import torch.nn.functional as F

    from longvila.parallel.ring import simulate_ring_attention

    total, heads, kv_heads, dim = 48, 4, 2, 8
    end = bounds[-1] if bounds else total
    g = torch.Generator().manual_seed(ring_degree)
    q, dout = (torch.randn(1, heads, total, dim, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, kv_heads, total, dim, generator=g, dtype=torch.float64) for _ in range(2))
    dout[:, :, end:] = 0.0  # the padding's output takes no part in any loss
    sample = torch.zeros(total, dtype=torch.long)
    for start in (bounds or ())[1:]:
        sample[start:] += 1  # each bound opens the next sample (after the last one: padding)
    position = torch.arange(total)
    mask = (sample[:, None] == sample[None, :]) & (position[None, :] <= position[:, None])
    mask[end:, end:] = torch.eye(total - end, dtype=torch.bool)  # padding: itself only, so SDPA has no
    # empty row; with no output gradient it gives no gradient either
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True)
    want.backward(dout)

    out, dq, dk, dv = simulate_ring_attention(q, k, v, dout, ring_degree, boundaries=bounds)
    assert out.dtype == torch.float64
    assert torch.equal(out[:, :, end:], torch.zeros_like(out[:, :, end:]))
    pairs = [(out[:, :, :end], want.detach()[:, :, :end])] + list(zip((dq, dk, dv), (x.grad for x in leaves)))
    for name, (a, b) in zip(("out", "dq", "dk", "dv"), pairs):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max(), name
