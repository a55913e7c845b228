"""benchmarks/ring_p2p.py (the planner's ring calibration on a cluster) runs on 2 gloo ranks and reports
consistent numbers."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ring_p2p.py"


def test_ring_p2p_benchmark_reports_efficiency(tmp_path):
    out = tmp_path / "ring.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--spawn",
            "2",
            "--mb",
            "0.5",
            "--iters",
            "2",
            "--matmul",
            "64",
            "--cpu",
            "--link-gbps",
            "1000",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["backend"] == "gloo"
    assert result["message_bytes"] == 500_000  # float32 on CPU: 0.5 MB = 125,000 elements x 4 B
    assert result["ring_p2p_gbps"] == result["message_bytes"] / result["ring_step_s"] / 1e9
    assert 0 < result["ring_p2p_efficiency"] <= 1
    assert result["ring_p2p_efficiency"] == min(1.0, result["ring_p2p_gbps"] / 1000)
    assert "--ring-p2p-efficiency" in done.stdout


def test_ring_p2p_benchmark_refuses_a_single_process():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--mb", "1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "torchrun" in done.stderr
