"""Decoding 2,048-frame samples in DataLoader workers with prefetch, against what the model consumes.

    python benchmarks/loader.py --video /tmp/longvila_real_videos/bikes_20min.mp4 --samples 4
    python benchmarks/loader.py --video clip.mp4 --frames 64 --samples 2 --workers 0 1 --no-write   # smoke

1. The model's consumption: the scale planner's predicted step time (`longvila.plan`) for LongVILA-7B
   at `--frames` frames (each 196 tokens + "\\n", 512 text tokens) on `--gpus` H100s, best layout; one
   sample per SP group per step, so the pipeline must deliver frames / step seconds per SP group.
2. The pipeline: a Dataset whose `__getitem__` is `decode_frames(path, num_frames=F)` (what
   `ManifestDataset` does per video), in a `DataLoader` with 0 (main process) or W worker processes and
   `prefetch_factor` samples queued per worker, batch size 1. A consumer that takes each batch at once
   measures the pipeline's frames/s; a consumer that "computes" for the predicted step time (sleeps)
   measures how long each step waits for data (0 = the GPU never waits).
3. The processor's frame preprocessing (`LongVILAProcessor.preprocess_frames`: resize to 384 px,
   normalise) on a 64-frame chunk of the decoded frames, per frame, reported beside it (it runs on
   the same cores; the whole 2,048-frame float tensor is not built here, to stay within memory).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from longvila.data.video import decode_frames, probe_video

SECTION = "## Video decoding"
SUBSECTION = "### DataLoader workers with prefetch at 2,048 frames"


class DecodeDataset(Dataset):
    """`samples` items, each `frames` frames decoded from `path` (uint8 (F, H, W, 3) tensor)."""

    def __init__(self, path: str, frames: int, samples: int):
        self.path, self.frames, self.samples = path, frames, samples

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> torch.Tensor:
        frames, _ = decode_frames(self.path, num_frames=self.frames)
        return torch.from_numpy(frames)


def model_consumption(frames: int, gpus: int) -> tuple[float, str]:
    """Predicted seconds per step for LongVILA-7B at `frames` frames on `gpus` H100s, and the layout."""
    from longvila.plan.hardware import get_hardware
    from longvila.plan.memory import Workload
    from longvila.plan.search import plan
    from longvila.plan.shapes import load_shape

    result = plan(load_shape("7b"), Workload.from_frames(frames), gpus, get_hardware("h100"))
    best = result.best
    if best is None:
        raise SystemExit(f"no layout of {gpus} GPUs fits {frames} frames")
    return best.time.total, f"{best.layout.label} ({best.role or 'no SP'})"


def run_loader(dataset: Dataset, workers: int, prefetch: int, step_s: float) -> dict:
    """Frames/s with a consumer that takes batches at once, and the wait per step with one that
    computes for `step_s` seconds per batch."""
    kwargs = {"num_workers": workers, "batch_size": 1}
    if workers:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
    start = time.perf_counter()
    count = sum(batch.shape[1] for batch in DataLoader(dataset, **kwargs))
    free_s = time.perf_counter() - start
    waits = []
    loader = iter(DataLoader(dataset, **kwargs))
    for _ in range(len(dataset)):
        t0 = time.perf_counter()
        next(loader)
        waits.append(time.perf_counter() - t0)
        time.sleep(step_s)
    return {"workers": workers, "fps": count / free_s, "first_wait": waits[0], "later_waits": waits[1:]}


def preprocess_rate(path: str) -> float:
    """Frames/s of the processor's preprocessing on 64 decoded frames (384 px, as SigLIP-so400m)."""
    from longvila.processor import LongVILAProcessor
    from longvila.text.tokenizer import load_tokenizer, tiny_tokenizer_dir

    processor = LongVILAProcessor(load_tokenizer(tiny_tokenizer_dir()), tokens_per_frame=196, image_size=384)
    frames, _ = decode_frames(path, num_frames=64)
    start = time.perf_counter()
    processor.preprocess_frames(frames)
    return len(frames) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", required=True, help="a long video (benchmarks/real_videos.py makes some)")
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4, help="samples per loader run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch_factor (samples queued per worker)")
    parser.add_argument("--gpus", type=int, default=32, help="GPUs for the model's predicted step time")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    step_s, layout = model_consumption(args.frames, args.gpus)
    need = args.frames / step_s
    print(f"model: {step_s:.2f} s per {args.frames}-frame step ({layout}): {need:.0f} frames/s per SP group")
    info = probe_video(args.video)
    dataset = DecodeDataset(args.video, args.frames, args.samples)
    rows = []
    for workers in args.workers:
        r = run_loader(dataset, workers, args.prefetch, step_s)
        rows.append(r)
        print(r, flush=True)
    prep = preprocess_rate(args.video)
    lines = [
        "| workers | prefetch | pipeline frames/s | per worker | / model's need | wait before step 1 | mean wait after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = r["fps"] / max(r["workers"], 1)
        later = f"{np.mean(r['later_waits']):.2f} s" if r["later_waits"] else "–"
        prefetch = args.prefetch if r["workers"] else "–"
        lines.append(
            f"| {r['workers']} | {prefetch} | {r['fps']:.1f} | {per:.1f} | {r['fps'] / need:.2f} "
            f"| {r['first_wait']:.1f} s | {later} |"
        )
    command = " ".join(["python benchmarks/loader.py", *(sys.argv[1:] if argv is None else argv)])
    load = os.getloadavg()
    body = f"""`decode_frames(path, num_frames={args.frames})` as the `__getitem__` of a Dataset in a `DataLoader`
(batch 1, {args.samples} samples a run) on `{Path(args.video).name}` ({info.codec} {info.width}×{info.height},
{info.num_frames} frames), against the model's consumption: the planner's predicted step for
LongVILA-7B at {args.frames} frames on {args.gpus} H100s ({layout}) is {step_s:.2f} s, so each SP group
needs {need:.0f} frames/s. "pipeline frames/s": a consumer that takes each batch at once; "wait": a consumer
that sleeps the predicted step time after each batch, seconds blocked in `next()` (0 = the GPU never
waits; the first step always waits for the first sample).

{chr(10).join(lines)}

- The processor's preprocessing (`preprocess_frames`, bicubic resize to 384 px and normalisation, 64 frames
  at once) runs at {prep:.0f} frames/s on this machine, on the same cores as the decoding.
- Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average {load[0]:.1f} at
  the end), torch {torch.__version__}. A GPU node has many more cores per GPU; the per-worker rate is
  what scales with `num_workers`. Not measured on a GPU: the model's rate is the planner's prediction.
- Command: `{command}`
"""
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).parent))
        from decode_real import write_subsection

        write_subsection(args.results, SECTION, SUBSECTION, body)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
