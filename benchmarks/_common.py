"""Shared helpers for the benchmarks: model shapes, timing, memory, machine description."""

from __future__ import annotations

import json
import platform
import resource
import time
from contextlib import contextmanager

import torch

from longvila.plan.shapes import PRESETS, TINY  # noqa: E402
from longvila.plan.shapes import SIGLIP_SO400M as _SIGLIP_SO400M

# Model shapes come from the one registry (longvila.plan.shapes); random weights are used. "tiny" is the
# CPU-sized stand-in so that tests can run every benchmark end to end.
QWEN2 = {name: PRESETS[name].llm for name in ("0.5b", "1.5b", "7b")} | {"tiny": TINY.llm}
SIGLIP_SO400M = _SIGLIP_SO400M.hf_config()
SIGLIP_TINY = TINY.vision.hf_config()
H100_BF16_DENSE_TFLOPS = 989.0  # the MFU denominator docs/reference.md uses


def qwen2_config(name: str, **overrides) -> dict:
    """The HF config dict of a `QWEN2` shape, with room for 2M positions (long prefills)."""
    return QWEN2[name].hf_config(**{"max_position_embeddings": 1 << 21, "rope_theta": 1e6, **overrides})


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def peak_memory(device: str, out: dict):
    """Peak bytes allocated on the GPU, or the process's peak RSS growth on CPU."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        yield
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield
        out["peak_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20


def timed(fn, device: str, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def dump(results, path: str | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
