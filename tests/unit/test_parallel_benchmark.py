"""benchmarks/attention.py runs at a tiny size on CPU and its simulated ring matches SDPA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_attention_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--device", "cpu", "--tokens", "256"]
    proc = subprocess.run(
        [*cmd, "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "ring/sdpa" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["tokens"] == 256 and rows[0]["ring_ratio"] > 0
    assert rows[0]["ring_max_err"] < 1e-4
