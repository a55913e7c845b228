"""The one-GPU benchmark scripts run end to end at a CPU size and report what they promise."""

import json
import subprocess
import sys
from pathlib import Path

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
