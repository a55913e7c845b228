"""Test videos whose frame index is written in the pixels, so a test can read back which frame it got.

The index is an 8-bit binary code in 2 × 4 big black/white blocks (16 × 32 px each on a 64 × 64
frame): flat areas survive lossy coding in every codec, so reading the code back is exact.
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SIZE = 64
BITS = 8


def code_frame(index: int, size: int = SIZE) -> np.ndarray:
    """An RGB frame (size, size, 3) carrying `index` (0-255) as 8 black/white blocks."""
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    bh, bw = size // 2, size // 4
    for bit in range(BITS):
        if (index >> bit) & 1:
            r, c = divmod(bit, 4)
            frame[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw] = 255
    return frame


def read_code(frame: np.ndarray) -> int:
    """Inverse of `code_frame`: the index written in a decoded frame."""
    size = frame.shape[0]
    bh, bw = size // 2, frame.shape[1] // 4
    gray = frame.astype(np.float32).mean(axis=2)
    value = 0
    for bit in range(BITS):
        r, c = divmod(bit, 4)
        block = gray[r * bh + 4 : (r + 1) * bh - 4, c * bw + 4 : (c + 1) * bw - 4]
        if block.mean() > 127:
            value |= 1 << bit
    return value


def read_codes(frames: np.ndarray) -> list[int]:
    return [read_code(f) for f in frames]


# codec -> (container suffix, encoder options). GOP of 10 frames so seeking has keyframes to use.
CODECS: dict[str, tuple[str, dict[str, str]]] = {
    "libx264": (".mp4", {"g": "10", "crf": "12", "preset": "veryfast", "threads": "1"}),
    "libx265": (
        ".mkv",
        {"crf": "12", "preset": "ultrafast", "x265-params": "keyint=10:min-keyint=10:log-level=error"},
    ),
    "libvpx-vp9": (".webm", {"g": "10", "crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    "libsvtav1": (
        ".mkv",
        {"g": "10", "crf": "20", "preset": "8", "svtav1-params": "lp=1"},
    ),  # preset 12 drops frames at 64 px
    "mpeg4": (".avi", {"g": "10", "qscale": "2"}),
}


@contextlib.contextmanager
def _scheduling_policy_kept():
    """Restore the calling thread's scheduling policy on leaving (see `write_video`)."""
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, param)


def write_video(
    path: str | Path,
    num_frames: int = 30,
    codec: str = "libx264",
    rate: int = 30,
    durations_ms: list[int] | None = None,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    frame_fn=code_frame,
) -> Path:
    """Encode frames `frame_fn(i)`; `durations_ms` gives each frame's duration (variable rate).

    The calling thread's scheduling policy is restored afterwards: SVT-AV1 (libsvtav1), run as root, turns
    it into real-time SCHED_FIFO, which every process started later inherits; on a 2-core machine two
    busy-waiting FIFO threads (gloo's, in a torchrun test run later by the same pytest worker) then starve
    everything else forever."""
    path = Path(path)
    with _scheduling_policy_kept():
        opts = dict(CODECS.get(codec, ("", {}))[1])
        opts.update(options or {})
        with av.open(str(path), "w", options=container_options or {}) as container:
            stream = container.add_stream(codec, rate=rate, options=opts)
            stream.width = stream.height = SIZE
            stream.pix_fmt = "yuv420p"
            if codec == "mpeg4":
                stream.codec_context.qmin = stream.codec_context.qmax = 2
            if durations_ms is not None:
                stream.codec_context.time_base = Fraction(1, 1000)
            if rotation is not None:
                stream.set_display_rotation(rotation)
            t = 0
            for i in range(num_frames):
                frame = av.VideoFrame.from_ndarray(frame_fn(i), format="rgb24")
                if durations_ms is not None:
                    frame.pts, frame.time_base = t, Fraction(1, 1000)
                    t += durations_ms[i % len(durations_ms)]
                else:
                    frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path


def vfr_timestamps(num_frames: int, durations_ms: list[int]) -> np.ndarray:
    """Seconds at which each frame of a `write_video(..., durations_ms=...)` video starts."""
    steps = [durations_ms[i % len(durations_ms)] for i in range(num_frames - 1)]
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.float64) / 1000


def expected_fps_indices(timestamps: np.ndarray, fps: float) -> list[int]:
    """Reference for fps sampling: the frame on screen at 0, 1/fps, 2/fps, …, repeats dropped."""
    out: list[int] = []
    k = 0
    while k / fps <= timestamps[-1] + 1e-9:
        t = k / fps
        index = max(i for i, s in enumerate(timestamps) if s <= t + 1e-6)
        if not out or out[-1] != index:
            out.append(index)
        k += 1
    return out


def available_encoders() -> list[str]:
    out = []
    for name in CODECS:
        try:
            av.Codec(name, "w")
        except Exception:
            continue
        out.append(name)
    return out
