"""Decode and sample video frames (PyAV by default; decord, torchcodec, OpenCV when installed).

Sampling rules (LongVILA samples N frames uniformly over the whole video; REFERENCE.md):
- **uniform** (`num_frames=N`): frame indices `floor(linspace(0, total - 1, N) + 0.5)` (round half up;
  `longvila.data.sampling.uniform_indices`, the rule arrays and every backend share)
  over the frames that exist, in presentation order. `total` is counted from the packet index, never
  taken from the header, so a wrong or missing header count (WebM has none) cannot shift the
  sample. When N > total, indices repeat, so the result always has exactly N frames.
- **fps** (`fps=F`): target times `0, 1/F, 2/F, …` up to the last frame's timestamp; each picks the
  frame on screen at that time (the last one whose timestamp is <= the target). Timestamps are the
  real ones, so variable-frame-rate video is sampled by time. Repeats (F above the video's rate) are
  dropped. If more than `max_frames` remain, they are thinned with the uniform rule above.
- neither: every frame, thinned to `max_frames` if given.

How frames are fetched (PyAV): the packets are demuxed once without decoding (fast: no pixels are
touched) to learn every frame's timestamp and which frames are keyframes. A cost model then picks
between seeking to the keyframe before each target and decoding forward to it, and one sequential
pass up to the last target (see `plan_decode`). Only the sampled frames are converted to RGB.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from longvila.data import video_backends
from longvila.data.errors import VideoDecodeError
from longvila.data.sampling import uniform_indices  # the one rule (re-exported here)

log = logging.getLogger(__name__)

# A seek flushes the decoder and refills its pipeline; counted as this many decoded frames.
SEEK_COST_FRAMES = 4
# Give up on a file after this many consecutive packets fail to decode.
MAX_CONSECUTIVE_DECODE_ERRORS = 32
# FFmpeg's frame threading ("AUTO") copies decoder state for every frame and refills its pipeline
# after every seek; with fewer cores than this, slice threading decoded faster here (2 cores, 640x360
# H.264: 0.28 vs 0.38 ms per frame in one pass, 28 vs 34 s for 1,024 frames of a 1-hour video).
FRAME_THREADING_MIN_CORES = 4


def decoder_thread_type() -> str:
    """The FFmpeg threading `decode_frames` uses on this machine: "AUTO" (frame + slice) with at
    least FRAME_THREADING_MIN_CORES usable cores, else "SLICE"."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return "AUTO" if cores >= FRAME_THREADING_MIN_CORES else "SLICE"


Frames = np.ndarray  # uint8 (T, H, W, 3)
Timestamps = np.ndarray  # float64 seconds (T,), relative to the first frame


# --------------------------------------------------------------------------------------------------
# Sampling (pure functions of the frame timestamps)


def sample_indices(
    timestamps: np.ndarray,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Indices into `timestamps` (seconds, sorted, one per frame) chosen by the rules in the module doc."""
    _check_sampling_args(num_frames, fps, max_frames)
    total = len(timestamps)
    if total == 0:
        raise ValueError("cannot sample from a video with no frames")
    if num_frames is not None:
        return uniform_indices(total, num_frames)
    if fps is None:
        indices = np.arange(total, dtype=np.int64)
    else:
        ts = np.asarray(timestamps, dtype=np.float64) - float(timestamps[0])
        # Container timestamps are rounded (to 1 ms in Matroska): 2/30 s = 66.67 ms must still pick
        # the frame stamped 67 ms. Allow half a millisecond, or a quarter of the shortest frame.
        shortest = float(np.min(np.diff(ts))) if total > 1 else 1.0
        tol = max(1e-6, min(0.5e-3, shortest / 4))
        targets = np.arange(0.0, ts[-1] + tol, 1.0 / fps)
        indices = np.searchsorted(ts, targets + tol, side="right") - 1
        indices = np.clip(indices, 0, total - 1)
        keep = np.ones(len(indices), dtype=bool)
        keep[1:] = indices[1:] != indices[:-1]
        indices = indices[keep].astype(np.int64)
    if max_frames is not None and len(indices) > max_frames:
        indices = indices[uniform_indices(len(indices), max_frames)]
    return indices


def _check_sampling_args(num_frames: int | None, fps: float | None, max_frames: int | None) -> None:
    if num_frames is not None and fps is not None:
        raise ValueError(f"give num_frames ({num_frames}) or fps ({fps}), not both")
    if num_frames is not None and (not isinstance(num_frames, int | np.integer) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if max_frames is not None and (not isinstance(max_frames, int | np.integer) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")


# --------------------------------------------------------------------------------------------------
# Cost model


@dataclass(frozen=True)
class DecodePlan:
    """How to fetch sorted unique target frames, and what each strategy is predicted to cost.

    Costs are in decoded frames. `seek_from[i]` is the keyframe index to seek to before target i,
    or -1 to keep decoding forward from where the previous target left off.
    """

    strategy: str
    seek_cost: int
    sequential_cost: int
    num_seeks: int
    seek_from: tuple[int, ...]


def plan_decode(targets: Sequence[int], keyframe: np.ndarray, strategy: str = "auto") -> DecodePlan:
    """Simulate both strategies over the keyframe layout and choose the cheaper one.

    Seeking to target t costs decoding from its keyframe k to t (t - k + 1 frames) plus
    SEEK_COST_FRAMES; when the decoder already sits between k and t, or going on from there is
    cheaper than a seek, it just decodes forward. One sequential pass costs last target + 1. With
    N targets spread over a video of `total` frames and keyframes every K frames, this is the rule
    "seek when N × K / 2 < total". The "seek" plan is a hybrid: it decodes on wherever that is
    cheaper than a seek, so it never costs more frames than the pass; ties go to the pass.
    """
    if strategy not in ("auto", "seek", "sequential"):
        raise ValueError(f"strategy must be 'auto', 'seek' or 'sequential', got {strategy!r}")
    targets = [int(t) for t in targets]
    keyframe_index = np.where(np.asarray(keyframe, dtype=bool), np.arange(len(keyframe)), 0)
    prev_key = np.maximum.accumulate(keyframe_index) if len(keyframe_index) else keyframe_index
    position, cost, seeks, seek_from = -1, 0, 0, []
    for t in targets:
        k = int(prev_key[t])
        go_on = t - position if position < t else None
        by_seek = t - k + 1 + SEEK_COST_FRAMES
        if go_on is not None and (position >= k or go_on <= by_seek):
            cost += go_on
            seek_from.append(-1)
        else:
            cost += by_seek
            seeks += 1
            seek_from.append(k)
        position = t
    sequential_cost = (max(targets) + 1) if targets else 0
    if strategy == "auto":
        strategy = "seek" if cost < sequential_cost else "sequential"
    return DecodePlan(strategy, cost, sequential_cost, seeks, tuple(seek_from))


def estimate_keyframe_interval(keyframe: np.ndarray) -> float:
    """Mean number of frames between keyframes (the whole length if there is only one)."""
    count = int(np.count_nonzero(keyframe))
    return len(keyframe) / max(count, 1)


# --------------------------------------------------------------------------------------------------
# Probing: the packet index


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video, plus the frame table from its packets.

    `header_frames` is the container's frame count (0 when it has none, as in WebM);
    `estimated_frames` is that count, or duration × rate when it is 0 (an estimate: may be wrong).
    `pts` (sorted presentation timestamps in `time_base` units) and `keyframe` (per frame, in the
    same order) come from demuxing every packet, so `num_frames = len(pts)` is exact for an intact
    file. `rotation` is the counter-clockwise display rotation in degrees (a multiple of 90).
    """

    path: str
    codec: str
    width: int
    height: int
    rate: float
    time_base: Fraction
    header_frames: int
    estimated_frames: int
    duration: float
    rotation: int
    pts: np.ndarray
    keyframe: np.ndarray
    scan_error: str | None = None

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def timestamps(self) -> np.ndarray:
        """Seconds from the first frame, one per frame."""
        if not len(self.pts):
            return np.zeros(0)
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)


def _open(path: str) -> av.container.InputContainer:
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):
        raise VideoDecodeError(f"{path}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: file is empty")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise VideoDecodeError(f"{path}: cannot be read as a video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: has no video stream")
    return container


def _metadata_rotation(stream: av.video.stream.VideoStream) -> int:
    """Old-style `rotate` tag (clockwise degrees), as counter-clockwise degrees; 0 when absent."""
    try:
        return -int(float(stream.metadata.get("rotate", 0)))
    except (TypeError, ValueError):
        return 0


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read the header and demux every packet (no decoding) to build the frame table."""
    path = os.fspath(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        tb = stream.time_base or Fraction(1, 1_000_000)
        if stream.duration:
            duration = float(stream.duration * tb)
        elif container.duration:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        header_frames = int(stream.frames or 0)
        estimated = header_frames or int(round(duration * rate))
        pts, keys, scan_error = _scan_packets(container, stream)
        return VideoInfo(
            path=path,
            codec=ctx.name,
            width=int(ctx.width),
            height=int(ctx.height),
            rate=rate,
            time_base=Fraction(tb),
            header_frames=header_frames,
            estimated_frames=estimated,
            duration=duration,
            rotation=_metadata_rotation(stream),
            pts=pts,
            keyframe=keys,
            scan_error=scan_error,
        )
    finally:
        container.close()


def _scan_packets(container, stream) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Presentation timestamps and keyframe flags of every video packet, sorted by timestamp."""
    stamps: list[int] = []
    keys: list[bool] = []
    scan_error = None
    missing = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:  # no timestamp at all: number it after the previous one
                missing += 1
                ts = (stamps[-1] + 1) if stamps else 0
            stamps.append(int(ts))
            keys.append(bool(packet.is_keyframe))
    except av.error.FFmpegError as exc:  # truncated or damaged: keep what was read
        scan_error = str(exc)
    order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
    pts = np.asarray(stamps, dtype=np.int64)[order]
    key = np.asarray(keys, dtype=bool)[order]
    if missing:
        log.debug("%s: %d packets without timestamps", container.name, missing)
    return pts, key, scan_error


# --------------------------------------------------------------------------------------------------
# Decoding with PyAV


def _iter_frames(container, stream, errors: list[str]):
    """Decoded frames in presentation order; packets that fail to decode are skipped and noted."""
    consecutive = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = stream.decode(packet)
            except av.error.FFmpegError as exc:
                errors.append(str(exc))
                consecutive += 1
                if consecutive > MAX_CONSECUTIVE_DECODE_ERRORS:
                    return
                continue
            consecutive = 0
            yield from frames
    except av.error.FFmpegError as exc:  # demuxing stopped (truncated file)
        errors.append(str(exc))


class _Fetcher:
    """Collects target frames (by presentation timestamp) from one open container."""

    def __init__(self, path: str, info: VideoInfo):
        self.path = path
        self.info = info
        self.container = _open(path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = decoder_thread_type()
        self.errors: list[str] = []
        self.rotation = info.rotation
        self._rotation_read = False
        self.size: tuple[int, int] | None = None

    def close(self) -> None:
        self.container.close()

    def to_rgb(self, frame) -> np.ndarray:
        if not self._rotation_read:
            self._rotation_read = True
            frame_rotation = int(getattr(frame, "rotation", 0) or 0)
            if frame_rotation:
                self.rotation = frame_rotation
        if self.size is None:
            self.size = (frame.width, frame.height)
        w, h = self.size
        array = frame.to_ndarray(format="rgb24", width=w, height=h)
        quarter_turns = int(round(self.rotation / 90)) % 4
        if quarter_turns:
            array = np.ascontiguousarray(np.rot90(array, k=quarter_turns))
        return array

    def sequential(self, targets: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
        """One pass from the start; returns the frames found and the last frame index decoded."""
        index_of = {int(p): i for i, p in enumerate(self.info.pts)}
        wanted = set(int(t) for t in targets)
        last_target = max(wanted)
        found: dict[int, np.ndarray] = {}
        index = -1
        for frame in _iter_frames(self.container, self.stream, self.errors):
            # Match by timestamp; fall back to counting when a frame has none we know.
            by_pts = index_of.get(frame.pts) if frame.pts is not None else None
            index = by_pts if by_pts is not None and by_pts > index else index + 1
            if index in wanted and index not in found:
                found[index] = self.to_rgb(frame)
            if index >= last_target and len(found) == len(wanted):
                break
        return found, index

    def seek(self, targets: Sequence[int], plan: DecodePlan) -> dict[int, np.ndarray] | None:
        """Seek to keyframes as planned; None if the file misbehaves (then go sequential)."""
        pts = self.info.pts
        found: dict[int, np.ndarray] = {}
        frames = None
        for t, k in zip(targets, plan.seek_from):
            if k >= 0 or frames is None:
                if k >= 0:
                    self.container.seek(int(pts[k]), stream=self.stream, backward=True, any_frame=False)
                frames = _iter_frames(self.container, self.stream, self.errors)
            target_pts = int(pts[t])
            for frame in frames:
                if frame.pts is None or frame.pts > target_pts:
                    return None  # no timestamps, or the seek landed past the target
                if frame.pts == target_pts:
                    found[t] = self.to_rgb(frame)
                    break
            else:
                return None  # ran out of frames before the target
        return found


def _looks_truncated(info: VideoInfo) -> bool:
    """The packets stop early: a demux error, fewer than the header's count, or short of its duration."""
    if info.scan_error is not None or info.num_frames < info.header_frames:
        return True
    frame_time = 1.0 / info.rate if info.rate > 0 else 0.0
    covered = float(info.timestamps[-1]) + frame_time
    return info.duration > 0 and covered < 0.9 * info.duration


def _decode_pyav(path: str, select: Selector, strategy: str) -> tuple[Frames, Timestamps]:
    info = probe_video(path)
    if info.num_frames == 0:
        reason = f" ({info.scan_error})" if info.scan_error else ""
        raise VideoDecodeError(f"{path}: the video stream has no frames{reason}")
    truncated = _looks_truncated(info)
    timestamps = info.timestamps
    indices = select(timestamps)
    targets = sorted(set(int(i) for i in indices))
    plan = plan_decode(targets, info.keyframe, strategy)
    log.debug("%s: %s", path, plan)

    found: dict[int, np.ndarray] | None = None
    if plan.strategy == "seek":
        fetcher = _Fetcher(path, info)
        try:
            found = fetcher.seek(targets, plan)
        finally:
            fetcher.close()
    if found is None or len(found) < len(targets):
        fetcher = _Fetcher(path, info)
        try:
            found, last_index = fetcher.sequential(targets)
            if len(found) < len(targets):
                # The tail does not decode: sample again over the frames that do.
                decodable = last_index + 1
                if decodable <= 0:
                    why = fetcher.errors[-1] if fetcher.errors else "decoder returned nothing"
                    raise VideoDecodeError(f"{path}: no frame decodes ({why})")
                truncated = True
                timestamps = timestamps[:decodable]
                indices = select(timestamps)
                targets = sorted(set(int(i) for i in indices))
                fetcher.close()
                fetcher = _Fetcher(path, info)
                found, _ = fetcher.sequential(targets)
                if len(found) < len(targets):
                    raise VideoDecodeError(f"{path}: frames stop decoding at random places")
        finally:
            fetcher.close()
    if truncated:
        of_header = f" of the {info.header_frames} in its header" if info.header_frames else ""
        warnings.warn(
            f"{path}: truncated or damaged: {len(timestamps)} frames decode{of_header}; sampled over those",
            stacklevel=3,
        )
    frames = np.stack([found[int(i)] for i in indices])
    return frames, timestamps[indices].astype(np.float64)


# --------------------------------------------------------------------------------------------------
# Backends

# A backend takes a path and a selector (all frame timestamps in seconds -> indices to return)
# and returns (frames uint8 (T, H, W, 3), timestamps seconds (T,)).
Selector = Callable[[np.ndarray], np.ndarray]
Backend = Callable[[str, Selector], tuple[Frames, Timestamps]]


@dataclass(frozen=True)
class _Registered:
    decode: Backend
    is_available: Callable[[], bool]


_BACKENDS: dict[str, _Registered] = {}


def register_backend(name: str, decode: Backend, is_available: Callable[[], bool] = lambda: True) -> None:
    """Add (or replace) a decoding backend. `is_available` says whether its library is installed."""
    _BACKENDS[name] = _Registered(decode, is_available)


def available_backends() -> list[str]:
    """Names of the registered backends whose libraries are installed; "pyav" always."""
    return [name for name, entry in _BACKENDS.items() if entry.is_available()]


def _importable(module: str) -> Callable[[], bool]:
    def check() -> bool:
        import importlib.util

        return importlib.util.find_spec(module) is not None

    return check


def decode_frames(
    path: str | os.PathLike,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    backend: str = "pyav",
    *,
    strategy: str = "auto",
) -> tuple[Frames, Timestamps]:
    """Sample frames from a video: uniform `num_frames`, or `fps` capped by `max_frames`.

    Returns `frames` uint8 (T, H, W, 3), rotated as the file's display matrix says, and `timestamps`
    float64 seconds (T,) from the first frame. `strategy` ("auto", "seek", "sequential") forces how
    the PyAV backend fetches frames. Raises FileNotFoundError for a missing file and
    VideoDecodeError (a ValueError) for an unreadable file, one with no video stream, or one where
    no frame decodes; a truncated file is sampled over the part that decodes, with a warning.
    """
    path = os.fspath(path)
    _check_sampling_args(num_frames, fps, max_frames)
    select = lambda ts: sample_indices(ts, num_frames, fps, max_frames)
    if backend == "pyav":
        return _decode_pyav(path, select, strategy)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; registered: {', '.join(_BACKENDS)}")
    entry = _BACKENDS[backend]
    if not entry.is_available():
        raise ValueError(f"video backend {backend!r} is not installed; available: {available_backends()}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    return entry.decode(path, select)


def _pyav_backend(path: str, select: Selector) -> tuple[Frames, Timestamps]:
    return _decode_pyav(path, select, "auto")


register_backend("pyav", _pyav_backend)
register_backend("decord", video_backends.decode_decord, _importable("decord"))
register_backend("torchcodec", video_backends.decode_torchcodec, _importable("torchcodec"))
register_backend("opencv", video_backends.decode_opencv, _importable("cv2"))
