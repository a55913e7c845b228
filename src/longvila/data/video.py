"""Decode and sample video frames (PyAV by default; decord, torchcodec, OpenCV when installed).

Sampling rules (LongVILA samples N frames uniformly over the whole video; docs/reference.md):
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
pass up to the last target (see `plan_decode`). Seek runs are decoded by parallel threads, each with
its own container; a one pass decodes the packets the probe kept, on the probe's container, with the
RGB conversion on a second thread; non-reference frames that are not targets are skipped by the
decoder; each distinct sampled frame is converted to RGB once, straight into the output array
(docs/data.md, "How").
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.codec.hwaccel import HWAccel, hwdevices_available
from av.video.reformatter import VideoReformatter

from longvila.data import video_backends
from longvila.data.errors import VideoDecodeError
from longvila.data.sampling import uniform_indices  # the one rule (re-exported here)

log = logging.getLogger(__name__)

# A seek flushes the decoder and refills its pipeline; counted as this many decoded frames.
SEEK_COST_FRAMES = 4
# Give up on a file after this many consecutive packets fail to decode.
MAX_CONSECUTIVE_DECODE_ERRORS = 32
# Threading (measured on the 2-core machine here, shared with other jobs; docs/data.md, "How"):
# - A seek plan's runs go to usable cores + 1 threads (as FFmpeg's automatic thread count), each with
#   its own container and decoder: runs that start at different keyframes share nothing.
# - Each decoder uses frame threading ("AUTO") when the plan decodes at least
#   FRAME_THREADING_MIN_PIXELS pixels, slice threading for tiny decodes, where starting the frame
#   threads costs more than they save. Slice threading leaves a single-slice stream (most H.264) on
#   one core: one pass over 64 frames of the 5-10 s real clips took 0.61 vs 1.46 s (640x272 H.264),
#   1.29 vs 5.48 s (1280x720), 0.21 vs 0.97 s (VP9) with frame vs slice threading (medians of 7), and
#   16 frames of the 30-minute 720p loop took 5.7-6.1 s with 3 frame-threaded seek threads against
#   12.1-14.4 s with 3 slice-threaded ones, for the same CPU time.
FRAME_THREADING_MIN_PIXELS = 10_000_000
MAX_SEEK_WORKERS = 4
# The probe keeps the demuxed packets of a file up to this many bytes (a few minutes of 720p H.264),
# so a one-pass decode reuses its container and packets instead of opening and demuxing the file
# again (~15 ms on the 5 s 720p clip here, as much as 10% of its whole decode).
KEEP_PACKET_BYTES = 32 << 20
# Each RGB conversion runs on one swscale thread (swscale's own threads cost more than they save:
# 0.42 vs 0.51 ms a 1280x720 frame, 0.07 vs 0.17 ms at 640x272, one vs automatic, on the 2 cores
# here; same pixels); parallelism comes from the decoder's threads, the conversion thread of a one
# pass (`_Converter`) and the seek workers. PyAV < 17 has no `threads` argument and uses one.
_SWS_ONE_THREAD = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def seek_workers() -> int:
    """Threads that decode a seek plan's runs at once: usable cores + 1, at most MAX_SEEK_WORKERS."""
    return max(1, min(usable_cores() + 1, MAX_SEEK_WORKERS))


def decoder_thread_type(info: VideoInfo, plan: DecodePlan) -> str:
    """FFmpeg threading for a one-pass decode (or a seek plan with a single run): "AUTO" (frame +
    slice) when the plan decodes at least FRAME_THREADING_MIN_PIXELS pixels, else "SLICE"."""
    frames = min(plan.seek_cost, plan.sequential_cost) if plan.strategy == "seek" else plan.sequential_cost
    return "AUTO" if frames * info.width * info.height >= FRAME_THREADING_MIN_PIXELS else "SLICE"


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
    file; `missing_pts` counts packets without a pts (their dts is used, or they are numbered after
    the previous one). `rotation` is the counter-clockwise display rotation in degrees (a multiple of 90).
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
    missing_pts: int = 0

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def timestamps(self) -> np.ndarray:
        """Seconds from the first frame, one per frame."""
        if not len(self.pts):
            return np.zeros(0)
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)


def _open(path: str, hwaccel: str | None = None) -> av.container.InputContainer:
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):
        raise VideoDecodeError(f"{path}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: file is empty")
    try:
        accel = None if hwaccel is None else HWAccel(device_type=hwaccel, allow_software_fallback=False)
        container = av.open(path, metadata_errors="ignore", hwaccel=accel)
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
    with _open(path) as container:
        return _probe(container, path)[0]


def _probe(
    container: av.container.InputContainer, path: str, keep_bytes: int = 0
) -> tuple[VideoInfo, list[av.Packet] | None]:
    """The frame table of an open container (demuxed to its end), and its video packets in file
    order when they total at most `keep_bytes` (else None), so one pass can decode them without
    opening and demuxing the file again."""
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
    scan = _scan_packets(container, stream, keep_bytes)
    info = VideoInfo(
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
        pts=scan.pts,
        keyframe=scan.keyframe,
        scan_error=scan.error,
        missing_pts=scan.missing,
    )
    return info, scan.packets


@dataclass(frozen=True)
class _Scan:
    """What demuxing every video packet found: `pts` and `keyframe` sorted by timestamp, the demux
    error that stopped it (None if it finished), the packets without a pts, and the packets
    themselves in file order when kept (else None)."""

    pts: np.ndarray
    keyframe: np.ndarray
    error: str | None
    missing: int
    packets: list[av.Packet] | None


def _scan_packets(container, stream, keep_bytes: int = 0) -> _Scan:
    """Demux every video packet of `container` (no decoding), keeping them while they total at
    most `keep_bytes`."""
    stamps: list[int] = []
    keys: list[bool] = []
    kept: list[av.Packet] | None = [] if keep_bytes > 0 else None
    kept_bytes = 0
    scan_error = None
    missing = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end
                continue
            ts = packet.pts
            if ts is None:  # use the dts, or number it after the previous one
                missing += 1
                ts = packet.dts if packet.dts is not None else (stamps[-1] + 1) if stamps else 0
            stamps.append(int(ts))
            keys.append(bool(packet.is_keyframe))
            if kept is not None:
                kept_bytes += packet.size
                if kept_bytes > keep_bytes:
                    kept = None  # too big to hold: a pass demuxes the file again
                else:
                    kept.append(packet)
    except av.error.FFmpegError as exc:  # truncated or damaged: keep what was read
        scan_error = str(exc)
    order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
    pts = np.asarray(stamps, dtype=np.int64)[order]
    key = np.asarray(keys, dtype=bool)[order]
    if missing:
        log.debug("%s: %d packets without a pts", container.name, missing)
    return _Scan(pts, key, scan_error, missing, kept)


# --------------------------------------------------------------------------------------------------
# Decoding with PyAV


class _FrameSink:
    """The output array, filled in place: each decoded target is converted to RGB once and copied
    into every row that samples it (repeats included), so no per-frame array is kept and nothing
    is stacked at the end.

    The RGB conversion is PyAV's `to_ndarray(format="rgb24")` (swscale, bilinear flags, the frame's
    own size), done by one `VideoReformatter` for all frames: `VideoFrame.to_ndarray` builds a new
    reformatter (a new swscale context, its tables and threads) for every frame.
    """

    def __init__(self, indices: np.ndarray, rotation: int, size: tuple[int, int] | None = None):
        rows: dict[int, list[int]] = {}
        for row, index in enumerate(np.asarray(indices).tolist()):
            rows.setdefault(int(index), []).append(row)
        self.rows = {index: np.asarray(where) for index, where in rows.items()}  # frame -> output rows
        self.count = len(indices)
        self.rotation = rotation
        self.resize = size  # (width, height) after rotation, or None: the video's own size
        self.interpolation = "BICUBIC" if size is not None else None  # None: PyAV's default
        self.size: tuple[int, int] | None = None  # (width, height) the frames are converted to
        self.out: np.ndarray | None = None
        self.filled: set[int] = set()
        self._reformatter = VideoReformatter()
        self._lock = threading.Lock()

    def put(self, index: int, frame: av.VideoFrame, reformatter: VideoReformatter | None = None) -> None:
        """Convert `frame` (the video's frame `index`) and write it to its rows. Threads that fill
        one sink at once pass a reformatter each."""
        if self.out is None:
            with self._lock:
                if self.out is None:
                    self._first_frame(frame)
        w, h = self.size
        rgb = (reformatter or self._reformatter).reformat(
            frame, width=w, height=h, format="rgb24", interpolation=self.interpolation, **_SWS_ONE_THREAD
        )
        array = rgb.to_ndarray()  # a view of the converted frame (padding skipped), not a copy
        quarter_turns = int(round(self.rotation / 90)) % 4
        if quarter_turns:
            array = np.rot90(array, k=quarter_turns)
        if array.shape != self.out.shape[1:]:
            raise VideoDecodeError(f"frame {index} converts to {array.shape}, not {self.out.shape[1:]}")
        rows = self.rows[index]
        if len(rows) == 1:
            self.out[rows[0]] = array
        else:
            self.out[rows] = array
        self.filled.add(index)

    def _first_frame(self, frame: av.VideoFrame) -> None:
        """Fix the rotation (the frame's display matrix wins over the stream's tag) and the size
        every frame is converted to (the first target's, or the requested size turned back by
        the rotation), and allocate the output."""
        frame_rotation = int(getattr(frame, "rotation", 0) or 0)
        if frame_rotation:
            self.rotation = frame_rotation
        turned = int(round(self.rotation / 90)) % 2 == 1
        if self.resize is None:
            self.size = (frame.width, frame.height)
        else:
            self.size = self.resize[::-1] if turned else self.resize
        w, h = self.size
        self.out = np.empty((self.count, *((w, h) if turned else (h, w)), 3), dtype=np.uint8)

    @property
    def complete(self) -> bool:
        return len(self.filled) == len(self.rows)


# Codecs whose FFmpeg decoders honour `skip_frame` per packet and skip only frames that no other
# frame references (H.264/HEVC: nal_ref_idc 0 / sub-layer non-reference NAL units; MPEG-4: B-VOPs).
# libdav1d reads the setting once when it opens, so AV1 is left out; VP9 streams rarely have
# non-reference frames. tests/unit/test_video.py checks the frames equal a full decode per codec.
SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "mpeg4"})


def decoder_skips(info: VideoInfo) -> bool:
    """Whether non-target, non-reference frames of this video are skipped (see `_Decoder`)."""
    return info.codec in SKIP_NONREF_CODECS and info.missing_pts == 0


class _Decoder:
    """One open container decoding towards target timestamps.

    Packets whose frame is not a target are sent with `skip_frame = "NONREF"`: the decoder parses
    them but does not reconstruct frames that nothing references (115 of the 250 frames of the
    x264 clip `bikes.mp4` with B-frames), so they are neither decoded nor returned. Target packets are
    decoded in full, and reference frames always are, so every returned frame is bit-identical to
    a full decode.

    `opened` is an open container (the probe's) and its video packets, kept by the scan: decoding
    them needs no second open and demux of the file. The caller closes that container.
    """

    def __init__(
        self,
        path: str,
        info: VideoInfo,
        target_pts: set[int],
        thread_type: str,
        hwaccel: str | None = None,
        opened: tuple[av.container.InputContainer, list[av.Packet]] | None = None,
    ):
        self.container, self.packets = opened if opened is not None else (_open(path, hwaccel), None)
        self.owns_container = opened is None
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = thread_type
        self.context = self.stream.codec_context
        self.errors: list[str] = []
        self.target_pts = target_pts
        self.skipping = decoder_skips(info)
        self._skip_mode = "DEFAULT"

    def close(self) -> None:
        if self.owns_container:
            self.container.close()

    def _set_skip(self, packet: av.Packet) -> None:
        mode = "NONREF" if packet.pts is not None and packet.pts not in self.target_pts else "DEFAULT"
        if mode != self._skip_mode:
            self.context.skip_frame = mode
            self._skip_mode = mode

    def _packets(self):
        """The kept packets then None (the decoder's flush), or the container's demuxer."""
        if self.packets is None:
            return self.container.demux(self.stream)
        return [*self.packets, None]

    def frames(self):
        """Decoded frames in presentation order from the current position; packets that fail to
        decode are skipped and noted (give up after MAX_CONSECUTIVE_DECODE_ERRORS in a row)."""
        consecutive = 0
        try:
            for packet in self._packets():
                if self.skipping and packet is not None:
                    self._set_skip(packet)
                try:
                    frames = self.stream.decode(packet)
                except av.error.FFmpegError as exc:
                    self.errors.append(str(exc))
                    consecutive += 1
                    if consecutive > MAX_CONSECUTIVE_DECODE_ERRORS:
                        return
                    continue
                consecutive = 0
                yield from frames
        except av.error.FFmpegError as exc:  # demuxing stopped (truncated file)
            self.errors.append(str(exc))

    def seek_to(self, pts: int) -> None:
        self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)


class _Converter:
    """Converts frames into a sink on a thread of its own while the caller goes on decoding, so the
    RGB conversion and the copies overlap the decoder's work (swscale and numpy's copies release
    the GIL). Frames wait in a short queue (each holds one of the decoder's buffers). An error in
    the thread is raised in the caller by its next call or by `close`."""

    QUEUE = 4

    def __init__(self, sink: _FrameSink):
        self.sink = sink
        self.queue: queue.Queue = queue.Queue(self.QUEUE)
        self.error: BaseException | None = None
        self.raised = False
        self.thread = threading.Thread(target=self._run, name="longvila-rgb", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        reformatter = VideoReformatter()
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error, only drain the queue
                try:
                    self.sink.put(*item, reformatter)
                except BaseException as exc:
                    self.error = exc

    def _raise(self) -> None:
        if self.error is not None and not self.raised:
            self.raised = True
            raise self.error

    def __call__(self, index: int, frame: av.VideoFrame) -> None:
        self._raise()
        self.queue.put((index, frame))

    def close(self) -> None:
        """Wait for the queued frames; raise the thread's error if it has not been raised."""
        self.queue.put(None)
        self.thread.join()
        self._raise()


def _sequential(decoder: _Decoder, info: VideoInfo, sink: _FrameSink) -> int:
    """One pass from the start into `sink`; returns the last frame index decoded (-1: none).

    Frames are matched by timestamp, falling back to counting for a frame without a known one
    (never with skipping on, which needs every packet's pts: `VideoInfo.missing_pts == 0`)."""
    index_of = {int(p): i for i, p in enumerate(info.pts)}
    last_target = max(sink.rows)
    index = -1
    sent = 0  # `index` only grows, so no wanted frame is sent twice
    convert = _Converter(sink)
    try:
        for frame in decoder.frames():
            by_pts = index_of.get(frame.pts) if frame.pts is not None else None
            index = by_pts if by_pts is not None and by_pts > index else index + 1
            if index in sink.rows:
                sent += 1
                convert(index, frame)
            if index >= last_target and sent == len(sink.rows):
                break
    finally:
        convert.close()
    return index


def _seek_runs(targets: Sequence[int], plan: DecodePlan) -> list[list[tuple[int, int]]]:
    """The plan cut into runs: each starts with a seek (or, for the first, at the file's start) and
    decodes on through its later targets. A run is a list of (target, keyframe or -1)."""
    runs: list[list[tuple[int, int]]] = []
    for t, k in zip(targets, plan.seek_from):
        if k >= 0 or not runs:
            runs.append([])
        runs[-1].append((int(t), int(k)))
    return runs


def _split_runs(runs: list[list[tuple[int, int]]], parts: int) -> list[list[list[tuple[int, int]]]]:
    """Contiguous groups of runs with about equal decoding work (frames from each run's keyframe,
    or the file's start, to its last target)."""
    work = np.asarray(
        [run[-1][0] - max(run[0][1], 0) + 1 + SEEK_COST_FRAMES for run in runs], dtype=np.float64
    )
    middle = (np.cumsum(work) - work / 2) / work.sum() * parts
    group = np.minimum(middle.astype(np.int64), parts - 1)
    return [[run for run, g in zip(runs, group) if g == p] for p in range(parts) if np.any(group == p)]


def _seek_group(
    path: str,
    info: VideoInfo,
    runs: list[list[tuple[int, int]]],
    sink: _FrameSink,
    thread_type: str,
    hwaccel: str | None = None,
) -> bool:
    """Decode `runs` with one container of its own into `sink`; False if the file misbehaves (a
    seek lands past its target, frames without timestamps, or frames run out)."""
    pts = info.pts
    decoder = _Decoder(path, info, {int(pts[t]) for run in runs for t, _ in run}, thread_type, hwaccel)
    reformatter = VideoReformatter()
    try:
        for run in runs:
            if run[0][1] >= 0:
                decoder.seek_to(int(pts[run[0][1]]))
            frames = decoder.frames()
            for t, _ in run:
                target_pts = int(pts[t])
                for frame in frames:
                    if frame.pts is None or frame.pts > target_pts:
                        return False
                    if frame.pts == target_pts:
                        sink.put(t, frame, reformatter)
                        break
                else:
                    return False
        return True
    finally:
        decoder.close()


def _seek(
    path: str,
    info: VideoInfo,
    targets: Sequence[int],
    plan: DecodePlan,
    sink: _FrameSink,
    hwaccel: str | None,
) -> bool:
    """Fetch the targets by seeking as planned, the runs split over `seek_workers()` threads, each
    with its own container and decoder (threaded by `decoder_thread_type`): runs that start at
    different keyframes share nothing. False if the file misbehaves (then go sequential)."""
    runs = _seek_runs(targets, plan)
    workers = 1 if hwaccel else min(seek_workers(), len(runs))  # one device decoder does it all
    groups = _split_runs(runs, workers)
    if len(groups) == 1:
        return _seek_group(path, info, groups[0], sink, decoder_thread_type(info, plan), hwaccel)
    with ThreadPoolExecutor(len(groups)) as pool:
        thread_type = decoder_thread_type(info, plan)
        results = list(pool.map(lambda g: _seek_group(path, info, g, sink, thread_type, hwaccel), groups))
    return all(results)


def _looks_truncated(info: VideoInfo) -> bool:
    """The packets stop early: a demux error, fewer than the header's count, or short of its duration."""
    if info.scan_error is not None or info.num_frames < info.header_frames:
        return True
    frame_time = 1.0 / info.rate if info.rate > 0 else 0.0
    covered = float(info.timestamps[-1]) + frame_time
    return info.duration > 0 and covered < 0.9 * info.duration


def _fetch_sequential(
    path: str,
    info: VideoInfo,
    indices: np.ndarray,
    thread_type: str,
    hwaccel: str | None,
    size: tuple[int, int] | None,
    skip: bool = True,
    opened: tuple[av.container.InputContainer, list[av.Packet]] | None = None,
) -> tuple[_FrameSink, int, list[str]]:
    """One pass collecting the frames at `indices`: (sink, last frame index decoded, decode errors).
    With `skip` False every frame is decoded, so the last index is the last frame that decodes.
    `opened`: the probe's container and kept packets to decode instead of opening the file."""
    targets = set(int(i) for i in indices)
    sink = _FrameSink(indices, info.rotation, size)
    decoder = _Decoder(path, info, {int(info.pts[t]) for t in targets}, thread_type, hwaccel, opened)
    decoder.skipping &= skip
    try:
        last = _sequential(decoder, info, sink)
    finally:
        decoder.close()
    return sink, last, decoder.errors


def _check_hwaccel(path: str, hwaccel: str) -> None:
    """Decode the first frame on the device, or raise a RuntimeError that says what is missing."""
    try:
        with _open(path, hwaccel) as container:
            next(container.decode(video=0))
    except (av.error.FFmpegError, StopIteration, ValueError) as exc:
        raise RuntimeError(
            f"{path}: cannot decode on the {hwaccel!r} device ({type(exc).__name__}: {exc}). GPU decoding "
            "needs an NVIDIA GPU with NVDEC, its driver, and an FFmpeg build with CUDA (this FFmpeg "
            f"supports {', '.join(hwdevices_available())}); use backend='pyav' to decode on the CPU"
        ) from exc


def _decode_pyav(
    path: str,
    select: Selector,
    strategy: str,
    hwaccel: str | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[Frames, Timestamps]:
    """The PyAV sampler: probe, plan, fetch (`hwaccel`: an FFmpeg device type such as "cuda" to
    decode on the device, frames downloaded for the RGB conversion; `size`: (width, height) of the
    returned frames, resized while converting)."""
    with _open(path) as container:
        keep = KEEP_PACKET_BYTES if hwaccel is None else 0
        info, packets = _probe(container, path, keep)
        opened = (container, packets) if packets is not None else None
        return _sample_pyav(path, info, select, strategy, hwaccel, size, opened)


def _sample_pyav(
    path: str,
    info: VideoInfo,
    select: Selector,
    strategy: str,
    hwaccel: str | None,
    size: tuple[int, int] | None,
    opened: tuple[av.container.InputContainer, list[av.Packet]] | None,
) -> tuple[Frames, Timestamps]:
    """Plan and fetch the selected frames of a probed video (`opened`: the probe's container and
    its kept packets, for the first one-pass decode)."""
    if info.num_frames == 0:
        reason = f" ({info.scan_error})" if info.scan_error else ""
        raise VideoDecodeError(f"{path}: the video stream has no frames{reason}")
    if hwaccel is not None:
        _check_hwaccel(path, hwaccel)
    truncated = _looks_truncated(info)
    timestamps = info.timestamps
    indices = np.asarray(select(timestamps))
    targets = sorted(set(int(i) for i in indices))
    plan = plan_decode(targets, info.keyframe, strategy)
    thread_type = decoder_thread_type(info, plan)
    log.debug("%s: %s, %s threading", path, plan, thread_type)

    sink = None
    if plan.strategy == "seek":
        sink = _FrameSink(indices, info.rotation, size)
        if not _seek(path, info, targets, plan, sink, hwaccel):
            sink = None
    if sink is None or not sink.complete:
        sink, last_index, errors = _fetch_sequential(
            path, info, indices, thread_type, hwaccel, size, opened=opened
        )
        if not sink.complete:
            # The tail does not decode: sample again over the frames that do. Skipped frames
            # after the last target found are not seen, so count the decodable ones without skipping.
            if decoder_skips(info):
                _, last_index, errors = _fetch_sequential(
                    path, info, indices, thread_type, hwaccel, size, skip=False
                )
            decodable = last_index + 1
            if decodable <= 0:
                why = errors[-1] if errors else "decoder returned nothing"
                raise VideoDecodeError(f"{path}: no frame decodes ({why})")
            truncated = True
            timestamps = timestamps[:decodable]
            indices = np.asarray(select(timestamps))
            sink, _, _ = _fetch_sequential(path, info, indices, thread_type, hwaccel, size)
            if not sink.complete:
                raise VideoDecodeError(f"{path}: frames stop decoding at random places")
    if truncated:
        of_header = f" of the {info.header_frames} in its header" if info.header_frames else ""
        warnings.warn(
            f"{path}: truncated or damaged: {len(timestamps)} frames decode{of_header}; sampled over those",
            stacklevel=4,  # the caller of decode_frames
        )
    return sink.out, timestamps[indices].astype(np.float64)


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
    size: tuple[int, int] | None = None,
) -> tuple[Frames, Timestamps]:
    """Sample frames from a video: uniform `num_frames`, or `fps` capped by `max_frames`.

    Returns `frames` uint8 (T, H, W, 3), rotated as the file's display matrix says, and `timestamps`
    float64 seconds (T,) from the first frame. `strategy` ("auto", "seek", "sequential") forces how
    the PyAV backend fetches frames. `size=(width, height)` (opt-in, PyAV backends only) resizes the
    frames with FFmpeg's bicubic scaler during the RGB conversion, several times cheaper than the
    processor's resize of full-size frames but not identical to it (docs/data.md, "Resizing while
    converting"); by default frames keep the video's size. Raises FileNotFoundError for a missing file
    and VideoDecodeError (a ValueError) for an unreadable file, one with no video stream, or one where
    no frame decodes; a truncated file is sampled over the part that decodes, with a warning.
    """
    path = os.fspath(path)
    _check_sampling_args(num_frames, fps, max_frames)
    size = _check_size(size)
    select = lambda ts: sample_indices(ts, num_frames, fps, max_frames)
    if backend == "pyav":
        return _decode_pyav(path, select, strategy, size=size)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; registered: {', '.join(_BACKENDS)}")
    entry = _BACKENDS[backend]
    if not entry.is_available():
        raise ValueError(f"video backend {backend!r} is not installed; available: {available_backends()}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if backend == "pyav-cuda":
        return _decode_pyav(path, select, strategy, hwaccel="cuda", size=size)
    if size is not None:
        raise ValueError(
            f"size= (resizing while converting) needs backend 'pyav' or 'pyav-cuda', not {backend!r}"
        )
    return entry.decode(path, select)


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        width, height = (int(v) for v in size)
        valid = (width, height) == tuple(size) and width > 0 and height > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"size must be (width, height), two positive integers; got {size!r}")
    return width, height


def _pyav_backend(path: str, select: Selector) -> tuple[Frames, Timestamps]:
    return _decode_pyav(path, select, "auto")


def _pyav_cuda_backend(path: str, select: Selector) -> tuple[Frames, Timestamps]:
    return _decode_pyav(path, select, "auto", hwaccel="cuda")


register_backend("pyav", _pyav_backend)
register_backend("decord", video_backends.decode_decord, _importable("decord"))
register_backend("pyav-cuda", _pyav_cuda_backend, lambda: "cuda" in hwdevices_available())
register_backend("torchcodec", video_backends.decode_torchcodec, _importable("torchcodec"))
register_backend("torchcodec-cuda", video_backends.decode_torchcodec_cuda, _importable("torchcodec"))
register_backend("opencv", video_backends.decode_opencv, _importable("cv2"))
