"""Run benchmarks/memory_growth.py and read its rows (shared by tests/unit and tests/distributed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MAX_GROWTH = 2.3
"""Largest allowed peak-memory growth when T doubles: linear is ~2, a dense (T x T) tensor ~4."""
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_growth.py"


def growth(tmp_path: Path, *args: str) -> list[dict]:
    """The benchmark's rows (tokens, peak_step_mib, growth, ...) for `args`."""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], check=True, timeout=1800)
    return json.loads(out.read_text())["rows"]
