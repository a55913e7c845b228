"""Shared helpers for the benchmarks: model shapes, timing, memory, machine description."""

from __future__ import annotations

import json
import platform
import resource
import time
from contextlib import contextmanager

import torch

# Qwen2 shapes (config.json of the released checkpoints); random weights are used.
QWEN2 = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # A CPU-sized stand-in so that tests can run every benchmark end to end.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
}
SIGLIP_SO400M = dict(
    image_size=384,
    patch_size=14,
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    vision_use_head=False,
)
SIGLIP_TINY = dict(
    image_size=64,
    patch_size=8,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    vision_use_head=False,
)
H100_BF16_DENSE_TFLOPS = 989.0  # the MFU denominator docs/reference.md uses


def qwen2_config(name: str, **overrides) -> dict:
    return {
        "model_type": "qwen2",
        "max_position_embeddings": 1 << 21,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        **QWEN2[name],
        **overrides,
    }


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
