"""benchmarks/serve.py runs end to end at a smoke size and reports what it promises."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


def test_serve_benchmark_smoke(tmp_path):
    out = tmp_path / "serve.json"
    args = ["--frames", "8", "--resolution", "64", "--requests", "3", "--tokens", "3", "--out", str(out)]
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    cached, off = result["reuse"]["cached"], result["reuse"]["caches_off"]
    assert cached["vision_tower_calls_second"] == 0 and off["vision_tower_calls_second"] == 1
    assert cached["prefix_tokens_reused"] > 8 * 16 and off["prefix_tokens_reused"] == 0
    batching = result["batching"]
    assert batching["serial_tokens_per_s"] > 0 and batching["batched_tokens_per_s"] > 0
    assert sum(batching["batch_sizes_concurrent_phase"]) == 3
