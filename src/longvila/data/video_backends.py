"""Adapters for optional video libraries; registered in `longvila.data.video` when installed.

Each takes a path and `select(timestamps_seconds) -> indices` and returns (frames uint8 (T, H, W, 3),
timestamps seconds (T,)). `pip install longvila[video-backends]` brings OpenCV and decord (CI installs
them; tests/unit/test_video.py compares each with PyAV on every codec); torchcodec needs the system's
FFmpeg libraries and is tested only where it imports. GPU decoding: "torchcodec-cuda" here, and
"pyav-cuda" (PyAV's hwaccel) in `longvila.data.video`; both raise a RuntimeError without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from longvila.data.errors import VideoDecodeError

Selector = Callable[[np.ndarray], np.ndarray]


def decode_decord(path: str, select: Selector) -> tuple[np.ndarray, np.ndarray]:
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=0)
    except Exception as exc:  # decord raises its own DECORDError
        raise VideoDecodeError(f"{path}: decord cannot read it ({exc})") from exc
    timestamps = reader.get_frame_timestamp(range(len(reader)))[:, 0].astype(np.float64)
    indices = select(timestamps - timestamps[0])
    return reader.get_batch(list(indices)).asnumpy(), timestamps[indices] - timestamps[0]


def decode_torchcodec(path: str, select: Selector, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    from torchcodec.decoders import VideoDecoder

    try:
        decoder = VideoDecoder(path, dimension_order="NHWC", device=device)
    except Exception as exc:
        raise VideoDecodeError(f"{path}: torchcodec cannot read it ({exc})") from exc
    total = decoder.metadata.num_frames
    rate = decoder.metadata.average_fps or 1.0
    timestamps = np.arange(total, dtype=np.float64) / rate  # constant rate assumed by this backend
    indices = select(timestamps)
    batch = decoder.get_frames_at([int(i) for i in indices])
    return batch.data.cpu().numpy(), timestamps[indices]


def decode_torchcodec_cuda(path: str, select: Selector) -> tuple[np.ndarray, np.ndarray]:
    """torchcodec's NVDEC decoder (`device="cuda"`); frames come back to the CPU as uint8."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{path}: backend 'torchcodec-cuda' decodes on an NVIDIA GPU (NVDEC), and torch sees no CUDA "
            "device here; use backend='pyav' or 'torchcodec' to decode on the CPU"
        )
    return decode_torchcodec(path, select, device="cuda")


def decode_opencv(path: str, select: Selector) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    # Pass 1 grabs (demux + decode, no conversion) to learn the timestamps; pass 2 retrieves targets.
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise VideoDecodeError(f"{path}: OpenCV cannot read it")
    stamps = []
    while capture.grab():
        stamps.append(capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
    capture.release()
    if not stamps:
        raise VideoDecodeError(f"{path}: no frame decodes (OpenCV)")
    timestamps = np.asarray(stamps) - stamps[0]
    indices = select(timestamps)
    wanted = set(int(i) for i in indices)
    found = {}
    capture = cv2.VideoCapture(path)
    for i in range(max(wanted) + 1):
        if not capture.grab():
            break
        if i in wanted:
            ok, bgr = capture.retrieve()
            if ok:
                found[i] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    capture.release()
    missing = wanted - set(found)
    if missing:
        raise VideoDecodeError(f"{path}: OpenCV could not decode frames {sorted(missing)[:5]}")
    return np.stack([found[int(i)] for i in indices]), timestamps[indices]
