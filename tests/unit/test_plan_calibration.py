"""The planner's memory model against measured peaks of real CPU training steps (subprocess-isolated)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plan_calibration.py"


def _calibration():
    spec = importlib.util.spec_from_file_location("plan_calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_prediction_within_10_percent_of_measured_peak():
    calibration = _calibration()
    results = calibration.measure_cases(list(calibration.QUICK_CASES))
    for r in results:
        assert abs(r["error"]) <= 0.10, (
            f"{r['case']}: measured {r['measured_bytes']}, predicted {r['predicted_bytes']}"
        )
