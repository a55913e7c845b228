"""Cut a long video into clips: fixed-length windows, or scene changes found by a cheap detector.

The detector (`detect_scene_cuts`) samples frames at `sample_fps` (2 by default), shrinks each to a
`size` × `size` thumbnail (area average), and scores each step by the mean absolute difference of
consecutive thumbnails (0..1). A step is a cut when its score is above `threshold` and also
`ratio` times the median score of its neighbourhood (so steady motion or noise, which differs
everywhere, is not cut all the time); cuts closer than `min_scene_seconds` are merged.
Thumbnails, not full frames, make it cheap: decoding dominates, and frames are fetched in windows
of `window_frames` so memory stays bounded on long videos.

Clips (`plan_clips`) are [start, end) intervals in seconds covering the video: each scene (the whole
video without cuts) is cut into `clip_seconds` windows from its start, and a piece shorter than
`min_clip_seconds` joins the clip before it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from longvila.data.video import VideoInfo, probe_video


def video_duration(info: VideoInfo) -> float:
    """Seconds covered by the frames: last timestamp plus one frame time."""
    if info.num_frames == 0:
        return 0.0
    frame_time = 1.0 / info.rate if info.rate > 0 else 0.0
    return float(info.timestamps[-1]) + frame_time


def frames_at(
    path: str | os.PathLike, times: Sequence[float], window_frames: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Frames on screen at `times` (seconds, sorted), in windows of at most `window_frames`.

    Yields (frames uint8 (W, H, W, 3), their real timestamps (W,)) per window, in order. Each window
    is one `decode_frames`-style fetch (seek or one pass, whichever is cheaper), so memory is bounded
    by one window of source-resolution frames.
    """
    # The PyAV sampler with a selector of our own (frames by time, not the uniform/fps rules).
    from longvila.data.video import _decode_pyav

    times = np.asarray(times, dtype=np.float64)
    for start in range(0, len(times), window_frames):
        targets = times[start : start + window_frames]

        def select(timestamps: np.ndarray, targets=targets) -> np.ndarray:
            # The frame on screen at each target: the last one stamped at or before it.
            index = np.searchsorted(timestamps, targets + 1e-6, side="right") - 1
            return np.clip(index, 0, len(timestamps) - 1)

        yield _decode_pyav(os.fspath(path), select, "auto")


def thumbnails(frames: np.ndarray, size: int) -> np.ndarray:
    """float32 (T, size, size, 3) in [0, 1]: area average over a grid of the frame (cropped to fit)."""
    t, h, w, c = frames.shape
    bh, bw = max(h // size, 1), max(w // size, 1)
    rows, cols = min(size, h), min(size, w)
    cropped = frames[:, : rows * bh, : cols * bw].astype(np.float32)
    return cropped.reshape(t, rows, bh, cols, bw, c).mean(axis=(2, 4)) / 255.0


def frame_differences(thumbs: np.ndarray) -> np.ndarray:
    """(T - 1,) mean absolute difference of consecutive thumbnails."""
    if len(thumbs) < 2:
        return np.zeros(0, dtype=np.float32)
    return np.abs(np.diff(thumbs, axis=0)).mean(axis=(1, 2, 3))


def pick_cuts(
    times: np.ndarray,
    scores: np.ndarray,
    threshold: float = 0.12,
    ratio: float = 3.0,
    min_scene_seconds: float = 1.0,
    neighbourhood: int = 8,
) -> list[float]:
    """Cut times (the later frame of each step) where the score is high in absolute and relative terms."""
    cuts: list[float] = []
    for i, score in enumerate(scores):
        lo, hi = max(0, i - neighbourhood), min(len(scores), i + neighbourhood + 1)
        around = np.delete(scores[lo:hi], i - lo)
        local = float(np.median(around)) if len(around) else 0.0
        if score <= threshold or score <= ratio * local:
            continue
        t = float(times[i + 1])
        if cuts and t - cuts[-1] < min_scene_seconds:
            continue
        if t < min_scene_seconds:
            continue
        cuts.append(t)
    return cuts


def detect_scene_cuts(
    path: str | os.PathLike,
    sample_fps: float = 2.0,
    size: int = 16,
    threshold: float = 0.12,
    ratio: float = 3.0,
    min_scene_seconds: float = 1.0,
    info: VideoInfo | None = None,
) -> list[float]:
    """Times (seconds) where a new scene starts; see the module doc."""
    info = info or probe_video(path)
    duration = video_duration(info)
    times = np.arange(0.0, duration, 1.0 / sample_fps)
    thumbs, stamps = [], []
    for frames, real_times in frames_at(path, times):
        thumbs.append(thumbnails(frames, size))
        stamps.append(real_times)
    if not thumbs:
        return []
    all_thumbs, all_times = np.concatenate(thumbs), np.concatenate(stamps)
    return pick_cuts(all_times, frame_differences(all_thumbs), threshold, ratio, min_scene_seconds)


def plan_clips(
    duration: float,
    clip_seconds: float = 10.0,
    cuts: Sequence[float] = (),
    min_clip_seconds: float = 1.0,
) -> list[tuple[float, float]]:
    """[start, end) clips covering [0, duration): split at `cuts`, then into `clip_seconds` windows."""
    if clip_seconds <= 0:
        raise ValueError(f"clip_seconds must be > 0, got {clip_seconds}")
    if duration <= 0:
        return []
    edges = [0.0] + sorted(c for c in cuts if 0 < c < duration) + [duration]
    clips: list[tuple[float, float]] = []
    for start, end in zip(edges[:-1], edges[1:]):
        at = start
        while end - at > 1e-6:
            clips.append((at, min(at + clip_seconds, end)))
            at += clip_seconds
    merged: list[tuple[float, float]] = []
    for start, end in clips:
        if merged and end - start < min_clip_seconds:
            merged[-1] = (merged[-1][0], end)  # too short to caption: joins the previous clip
        else:
            merged.append((start, end))
    if len(merged) > 1 and merged[0][1] - merged[0][0] < min_clip_seconds:
        merged[1] = (merged[0][0], merged[1][1])
        merged.pop(0)
    return [(round(s, 3), round(e, 3)) for s, e in merged]


def clip_frame_times(clip: tuple[float, float], num_frames: int) -> np.ndarray:
    """`num_frames` times spread over a clip: the centres of equal slices."""
    start, end = clip
    return start + (np.arange(num_frames) + 0.5) * (end - start) / num_frames
