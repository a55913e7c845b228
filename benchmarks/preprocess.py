"""Frames per second of frame preprocessing (resize + normalise), against Hugging Face's PIL SigLIP image
processor in the same run, with the outputs checked bit-identical.

    python benchmarks/preprocess.py                                  # 720p and 360p frames -> 448 and 384 px
    python benchmarks/preprocess.py --frames 16 --cases 360p:64      # smoke test

Each case times `longvila.processor.preprocess_frames` (PIL bicubic in threads, one table gather for the
normalisation), `SiglipImageProcessorPil` called on the list of frames (the reference the official models
were trained with), and, for scale, the torch bicubic-antialias resize longvila used before (not equal
to the reference). `pil_resize_only` is PIL's resize alone on one thread: the floor for one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, machine  # noqa: E402

SOURCES = {"720p": (720, 1280), "360p": (360, 640), "240p": (240, 320)}


def interleaved_best(methods: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Fastest of `repeats` runs of each method, the methods taking turns so that all of them meet the
    same background load (the recorded machine is shared)."""
    best = {name: float("inf") for name in methods}
    outputs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def torch_bicubic(frames: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp_(0, 255)
    return (x / 255 - 0.5) / 0.5


def run_case(source: str, size: int, count: int, repeats: int) -> dict:
    from transformers import SiglipImageProcessorPil

    from longvila.processor import _resize_one, preprocess_frames

    height, width = SOURCES[source]
    frames = np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    hf = SiglipImageProcessorPil(size={"height": size, "width": size})
    half = (0.5, 0.5, 0.5)
    methods = {
        "longvila": lambda: preprocess_frames(frames, size, half, half),
        "longvila_1_thread": lambda: preprocess_frames(frames, size, half, half, threads=1),
        "hf_pil": lambda: torch.from_numpy(np.stack(hf(list(frames))["pixel_values"])),
        "torch_bicubic": lambda: torch_bicubic(frames, size),
        # the floor: PIL's resize alone, one thread (the reference algorithm; normalising adds to it)
        "pil_resize_only": lambda: [_resize_one(frame, size) for frame in frames],
    }
    seconds, outputs = interleaved_best(methods, repeats)
    return {
        "source": source,
        "size": size,
        "frames": count,
        "identical": bool(torch.equal(outputs["longvila"], outputs["hf_pil"]))
        and bool(torch.equal(outputs["longvila_1_thread"], outputs["hf_pil"])),
        **{f"{name}_fps": count / t for name, t in seconds.items()},
        "speedup_vs_hf": seconds["hf_pil"] / seconds["longvila"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=256, help="frames per case")
    parser.add_argument("--cases", default="720p:448,360p:448,360p:384", help="source:size, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per method")
    parser.add_argument("--out")
    args = parser.parse_args()
    from longvila.processor import PREPROCESS_THREADS

    results = {"machine": machine(), "threads": PREPROCESS_THREADS, "cases": []}
    for case in args.cases.split(","):
        source, size = case.split(":")
        entry = run_case(source, int(size), args.frames, args.repeats)
        results["cases"].append(entry)
        print(
            f"{source} -> {size}px, {args.frames} frames: longvila {entry['longvila_fps']:.0f} fps "
            f"(1 thread {entry['longvila_1_thread_fps']:.0f}), "
            f"HF PIL {entry['hf_pil_fps']:.0f} fps ({entry['speedup_vs_hf']:.1f}x), torch bicubic "
            f"{entry['torch_bicubic_fps']:.0f} fps, identical={entry['identical']}",
            file=sys.stderr,
        )
    dump(results, args.out)


if __name__ == "__main__":
    main()
