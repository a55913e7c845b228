"""Calibrate the scale planner's memory model against measured peaks of real training steps on CPU.

Each case builds a LongVILA model (the tiny embedded default, or Qwen2 shapes of a few layers with the
real 151,936-token vocabulary), runs one training step (forward, backward, AdamW step) on a packed
row of a few thousand tokens with video frames, and measures the peak resident memory of that step
in a subprocess:
- glibc is told to serve every allocation of 64 KiB or more with mmap (MALLOC_MMAP_THRESHOLD_), so
  freed tensors go back to the OS at once and resident memory tracks live tensors;
- the libraries' one-time set-up (thread pools, kernels) is paid by a throw-away warm-up step
  first; before each case the kernel's peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`)
  and the measured peak is VmHWM after the step minus the resident size before the model is built,
  so that several cases share one process (importing torch costs more than a case);
- a first step on a short input creates the AdamW moments, so the measured step is a steady one.
torch 2.13 has no CPU allocator statistics (torch.cpu has no memory_stats), hence this method.

    python benchmarks/plan_calibration.py            # every case; writes plan_calibration.json
    python benchmarks/plan_calibration.py tiny mid   # some cases, printed only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "plan_calibration.json"

MID_LLM = dict(
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=64,
)
"""The mid-size LLM (Qwen2 layout, 4 layers) of several calibration cases."""

# name -> llm: overrides of LongVILAConfig.tiny's LLM; vocab; dtype; tokens, frames and supervised tokens of
# the packed row; ckpt: activation checkpointing of the LLM layers.
CASES: dict[str, dict] = {
    "small": dict(
        llm=dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
        ),
        vocab=151936,
        dtype="float32",
        tokens=2048,
        frames=8,
        supervised=128,
        ckpt=False,
    ),
    "tiny": dict(llm={}, vocab=151936, dtype="float32", tokens=4096, frames=16, supervised=256, ckpt=False),
    "mid": dict(
        llm=MID_LLM,
        vocab=151936,
        dtype="float32",
        tokens=4096,
        frames=16,
        supervised=256,
        ckpt=False,
    ),
    "mid-long": dict(
        llm=dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
        ),
        vocab=32000,
        dtype="float32",
        tokens=8192,
        frames=32,
        supervised=512,
        ckpt=False,
    ),
    "mid-bf16": dict(
        llm=MID_LLM,
        vocab=151936,
        dtype="bfloat16",
        tokens=4096,
        frames=16,
        supervised=256,
        ckpt=False,
    ),
    "mid-ckpt": dict(
        llm=MID_LLM,
        vocab=151936,
        dtype="float32",
        tokens=4096,
        frames=16,
        supervised=256,
        ckpt=True,
    ),
}
QUICK_CASES = ("tiny", "small")
"""Cases the unit test runs (a few seconds each)."""


def case_config(name: str):
    """The LongVILAConfig of a case."""
    from longvila.config import LongVILAConfig

    case = CASES[name]
    config = LongVILAConfig.tiny(vocab_size=case["vocab"])
    config.llm.update(case["llm"])
    return config


def predict_case(name: str) -> dict:
    """The planner's prediction for a case (single process, no sharding)."""
    from longvila.plan import BF16_SINGLE, FP32_SINGLE, Layout, Workload, predict_memory, shape_from_config

    case = CASES[name]
    shape = shape_from_config(case_config(name).to_dict(), name=name)
    policy = FP32_SINGLE if case["dtype"] == "float32" else BF16_SINGLE
    workload = Workload(tokens=case["tokens"], frames=case["frames"], supervised_tokens=case["supervised"])
    breakdown = predict_memory(shape, Layout(checkpointing=case["ckpt"]), workload, policy)
    return {"predicted_bytes": breakdown.peak, "predicted_phase": breakdown.peak_phase}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _batch(config, tokens: int, frames: int, supervised: int, generator):
    import torch

    tpf = config.tokens_per_frame
    newline = 198 % config.llm["vocab_size"]
    ids = torch.randint(1000, 2000, (tokens,), generator=generator)
    video = torch.tensor(([config.image_token_id] * tpf + [newline]) * frames)
    ids[: video.numel()] = video
    labels = torch.full((tokens,), -100)
    labels[tokens - supervised :] = ids[tokens - supervised :]
    size = config.image_size
    pixels = torch.randn(frames, 3, size, size, generator=generator)
    return {"input_ids": ids[None], "labels": labels[None], "pixel_values": pixels}


def _step(model, optimizer, batch) -> None:
    out = model(**batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def _warm_up(generator) -> None:
    """A small model through the same code pays the libraries' one-time costs (both dtypes)."""
    import torch

    from longvila import LongVILA

    config = case_config("tiny")
    config.llm["vocab_size"] = 4096
    for dtype in (torch.float32, torch.bfloat16):
        model = LongVILA(config).to(dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = _batch(config, 256, 2, 16, generator)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        _step(model, optimizer, batch)
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _step(model, optimizer, batch)


def run_case(name: str, generator) -> dict:
    """Measure one case in this process (after `_warm_up`)."""
    import gc

    import torch

    from longvila import LongVILA

    case = CASES[name]
    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    config = case_config(name)
    batch = _batch(config, case["tokens"], case["frames"], case["supervised"], generator)
    first = _batch(config, 64, 1, 8, generator)
    for b in (batch, first):
        b["pixel_values"] = b["pixel_values"].to(dtype)
    gc.collect()
    _reset_peak()
    baseline = _memory_kib("VmRSS")
    model = LongVILA(config).to(dtype)
    model.train()
    if case["ckpt"]:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _step(model, optimizer, first)  # creates the AdamW moments
    start = time.perf_counter()
    _step(model, optimizer, batch)
    seconds = time.perf_counter() - start
    peak = _memory_kib("VmHWM")
    result = {
        "case": name,
        **{k: v for k, v in case.items() if k != "llm"},
        "llm": {
            k: config.llm[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
            )
        },
        "params": sum(p.numel() for p in model.parameters()),
        "measured_bytes": (peak - baseline) * 1024,
        "step_seconds": round(seconds, 2),
    }
    del model, optimizer
    gc.collect()
    return result


def run_cases(names: list[str]) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(0)
    _warm_up(generator)
    return [run_case(name, generator) for name in names]


def measure_cases(names, threads: int = 2, timeout: float = 600) -> list[dict]:
    """Run `run_cases` in a fresh subprocess with the allocator settings above; add the predictions."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, __file__, "--in-process", *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"calibration cases {names} failed:\n{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for result in results:
        result.update(predict_case(result["case"]))
        result["error"] = result["predicted_bytes"] / result["measured_bytes"] - 1
    return results


def machine() -> dict:
    import torch
    import transformers

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"cases to run (default: all of {', '.join(CASES)})")
    parser.add_argument("--in-process", action="store_true", help="measure here (internal)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = args.cases or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    if args.in_process:
        print(json.dumps(run_cases(names)))
        return 0
    results = measure_cases(names)
    for r in results:
        print(
            f"{r['case']:>9}: measured {r['measured_bytes'] / 2**20:8.1f} MiB, predicted "
            f"{r['predicted_bytes'] / 2**20:8.1f} MiB ({r['predicted_phase']}), error {r['error']:+.1%}, "
            f"step {r['step_seconds']} s"
        )
    if not args.cases:
        payload = {**machine(), "command": "python benchmarks/plan_calibration.py", "cases": results}
        args.output.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
