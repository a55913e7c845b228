"""Per-step metrics: JSONL in the run directory, TensorBoard when installed, and memory readings."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl`; on resume, drops the lines of steps
    after the checkpoint (a killed run may have logged past it), so the file reads as one clean curve."""

    def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.handle = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            if self.tb is not None:
                self.tb.close()
