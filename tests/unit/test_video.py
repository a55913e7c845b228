"""Video decoding: exact frames in every codec/container, both strategies, VFR, rotation, bad files."""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from _video_helpers import (
    CODECS,
    available_encoders,
    code_frame,
    expected_fps_indices,
    read_codes,
    vfr_timestamps,
    write_video,
)

from longvila.data import video as video_mod
from longvila.data.errors import ImageDecodeError, VideoDecodeError
from longvila.data.image import load_image
from longvila.data.video import (
    available_backends,
    decode_frames,
    plan_decode,
    probe_video,
    register_backend,
    sample_indices,
    uniform_indices,
)

NUM = 47  # odd on purpose: linspace points fall between frames
STRATEGIES = ["seek", "sequential"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for codec in available_encoders():
        suffix = CODECS[codec][0]
        out[codec] = write_video(root / f"{codec}{suffix}", NUM, codec)
    return out


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_uniform_and_fps_exact_frames(videos, codec, strategy):
    if codec not in videos:
        pytest.skip(f"no {codec} encoder in this PyAV build")
    path = videos[codec]
    for n in (8, NUM, 60):  # fewer, as many as, and more than the frames (repeats)
        frames, ts = decode_frames(path, num_frames=n, strategy=strategy)
        expected = np.floor(np.linspace(0, NUM - 1, n) + 0.5).astype(int).tolist()
        assert frames.dtype == np.uint8 and frames.shape == (n, 64, 64, 3)
        assert read_codes(frames) == expected, (codec, strategy, n)
        np.testing.assert_allclose(ts, np.asarray(expected) / 30, atol=1e-3)
    for fps in (7, 30, 50):
        frames, ts = decode_frames(path, fps=fps, strategy=strategy)
        assert read_codes(frames) == expected_fps_indices(np.arange(NUM) / 30, fps), (codec, fps)
    frames, _ = decode_frames(path, fps=10, max_frames=4, strategy=strategy)
    fps_indices = expected_fps_indices(np.arange(NUM) / 30, 10)
    assert read_codes(frames) == [fps_indices[i] for i in uniform_indices(len(fps_indices), 4)]


def test_auto_strategy_picks_by_cost(videos):
    info = probe_video(videos["libx264"])
    assert info.num_frames == NUM and info.header_frames == NUM
    assert plan_decode([0, 46], info.keyframe).strategy == "seek"
    assert plan_decode(list(range(0, NUM, 2)), info.keyframe).strategy == "sequential"
    frames, _ = decode_frames(videos["libx264"], num_frames=3)
    assert read_codes(frames) == [0, 23, 46]


def test_plan_decode_cost_model():
    keyframe = np.zeros(1000, dtype=bool)
    keyframe[::100] = True
    sparse = plan_decode([50, 550, 950], keyframe)  # 3 × 100 / 2 < 1000: seek
    assert sparse.strategy == "seek" and sparse.num_seeks == 2 and sparse.sequential_cost == 951
    assert sparse.seek_cost == 51 + 2 * (51 + video_mod.SEEK_COST_FRAMES)
    # 100 × 100 / 2 > 1000: decoding on is never dearer than a seek here.
    dense = plan_decode(list(range(5, 1000, 10)), keyframe)
    assert dense.num_seeks == 0 and dense.seek_cost == dense.sequential_cost
    assert dense.strategy == "sequential"  # ties go to the simpler pass
    assert plan_decode([10, 990], np.eye(1, 1000, dtype=bool)[0]).strategy == "sequential"  # one keyframe
    assert plan_decode([50, 550], keyframe, "sequential").strategy == "sequential"
    with pytest.raises(ValueError, match="strategy"):
        plan_decode([1], keyframe, "fast")


def test_sample_indices_rules():
    assert uniform_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert uniform_indices(3, 5).tolist() == [0, 1, 1, 2, 2]  # 0.5 and 1.5 round up
    assert uniform_indices(1, 3).tolist() == [0, 0, 0]
    ts = np.arange(100) / 25
    assert sample_indices(ts, fps=1).tolist() == list(range(0, 100, 25))
    assert len(sample_indices(ts, fps=5, max_frames=7)) == 7
    assert sample_indices(ts, max_frames=3).tolist() == [0, 50, 99]
    with pytest.raises(ValueError, match="not both"):
        sample_indices(ts, num_frames=4, fps=1)
    with pytest.raises(ValueError, match="num_frames"):
        sample_indices(ts, num_frames=0)
    with pytest.raises(ValueError, match="fps"):
        sample_indices(ts, fps=-1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_variable_frame_rate_sampled_by_time(tmp_path, strategy):
    durations = [20, 50, 100, 30]
    n = 40
    path = write_video(tmp_path / "vfr.mkv", n, durations_ms=durations)
    ts_true = vfr_timestamps(n, durations)
    frames, ts = decode_frames(path, fps=4, strategy=strategy)
    assert read_codes(frames) == expected_fps_indices(ts_true, 4)
    np.testing.assert_allclose(ts, ts_true[read_codes(frames)], atol=1e-3)
    frames, _ = decode_frames(path, num_frames=5, strategy=strategy)
    assert read_codes(frames) == uniform_indices(n, 5).tolist()


def test_webm_without_header_count(videos):
    if "libvpx-vp9" not in videos:
        pytest.skip("no VP9 encoder")
    info = probe_video(videos["libvpx-vp9"])
    assert info.header_frames == 0  # WebM stores no frame count
    assert info.estimated_frames == NUM  # duration × rate
    assert info.num_frames == NUM  # from the packets


def test_rotation_is_applied(tmp_path):
    def marked(i):
        frame = np.zeros((64, 64, 3), dtype=np.uint8)
        frame[:16, :32] = (255, 0, 0)  # red band, top left
        return frame

    path = write_video(tmp_path / "rot.mp4", 5, rotation=90, frame_fn=marked)
    frames, _ = decode_frames(path, num_frames=2)
    # 90° counter-clockwise: the top-left band ends up at the bottom left, standing upright.
    red = (frames[0, ..., 0] > 128) & (frames[0, ..., 1] < 100)
    assert red[32:, :16].mean() > 0.9 and red[:32].mean() < 0.05


@pytest.mark.parametrize(
    "suffix,codec,opts", [(".mkv", "libx264", {}), (".mp4", "libx264", {"movflags": "+faststart"})]
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_truncated_file_warns_and_samples_what_decodes(tmp_path, suffix, codec, opts, strategy):
    full = write_video(tmp_path / f"full{suffix}", 60, codec, container_options=opts)
    cut = tmp_path / f"cut{suffix}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 4])
    with pytest.warns(UserWarning, match=r"cut\.(mkv|mp4).*truncated"):
        frames, _ = decode_frames(cut, num_frames=8, strategy=strategy)
    codes = read_codes(frames)
    decodable = codes[-1] + 1
    assert 10 < decodable < 60
    assert codes == uniform_indices(decodable, 8).tolist()


def test_intact_file_does_not_warn(videos):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_frames(videos["libx264"], num_frames=4)


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def test_bad_files_raise_naming_the_path(tmp_path, videos):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        decode_frames(tmp_path / "missing.mp4", num_frames=4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    head_only = tmp_path / "head_only.mp4"  # the first packet is cut: nothing decodes
    data = write_video(tmp_path / "src.mp4", 60, container_options={"movflags": "+faststart"}).read_bytes()
    head_only.write_bytes(data[: len(data) // 2])
    audio = _audio_only(tmp_path / "audio.wav")
    for bad, reason in [
        (empty, "empty"),
        (text, "cannot be read"),
        (garbage, "cannot be read"),
        (head_only, "no frame decodes"),
        (audio, "no video stream"),
        (tmp_path, "directory"),
    ]:
        with pytest.raises(VideoDecodeError, match=reason) as info:
            decode_frames(bad, num_frames=4)
        assert str(bad) in str(info.value)
        assert isinstance(info.value, ValueError)


def test_backend_registry(videos):
    assert "pyav" in available_backends()
    assert "decord" not in available_backends() or __import__("importlib").util.find_spec("decord")
    frames, _ = decode_frames(videos["libx264"], num_frames=3, backend="pyav")
    assert read_codes(frames) == [0, 23, 46]

    def fake(path, select):
        ts = np.arange(10) / 10
        idx = select(ts)
        return np.stack([code_frame(int(i)) for i in idx]), ts[idx]

    register_backend("fake-test", fake)
    try:
        frames, ts = decode_frames(videos["libx264"], num_frames=4, backend="fake-test")
        assert read_codes(frames) == [0, 3, 6, 9]
        register_backend("absent-test", fake, is_available=lambda: False)
        assert "absent-test" not in available_backends()
        with pytest.raises(ValueError, match="not installed"):
            decode_frames(videos["libx264"], num_frames=4, backend="absent-test")
    finally:
        video_mod._BACKENDS.pop("fake-test", None)
        video_mod._BACKENDS.pop("absent-test", None)
    with pytest.raises(ValueError, match="unknown video backend"):
        decode_frames(videos["libx264"], num_frames=4, backend="nope")


@pytest.mark.parametrize("backend", ["opencv", "decord", "torchcodec"])
def test_optional_backend_matches_pyav(videos, backend):
    """Each optional backend returns the frames PyAV returns (the indices encoded in the pixels) on
    every codec it can read. The package `longvila[video-backends]` (CI installs it) brings OpenCV
    and decord; torchcodec needs the system's FFmpeg libraries and is skipped without them."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    read = 0
    for codec, path in videos.items():
        try:
            frames, stamps = decode_frames(path, num_frames=5, backend=backend)
        except VideoDecodeError:
            continue  # a codec this library's build lacks (checked below: H.264 must work)
        read += 1
        assert frames.dtype == np.uint8 and frames.shape[0] == 5, codec
        assert read_codes(frames) == uniform_indices(NUM, 5).tolist(), codec
        _, pyav_stamps = decode_frames(path, num_frames=5)
        np.testing.assert_allclose(stamps, pyav_stamps, atol=1e-3, err_msg=codec)
    assert read >= 1
    frames, _ = decode_frames(videos["libx264"], num_frames=5, backend=backend)
    assert read_codes(frames) == uniform_indices(NUM, 5).tolist()


def test_load_image_honours_exif_orientation(tmp_path):
    from PIL import Image

    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :10] = (0, 0, 255)  # blue stripe on the left
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.shape == (40, 20, 3) and loaded.dtype == np.uint8
    assert loaded[:10, :, 2].mean() > 200  # left stripe is now on top
    Image.fromarray(array[..., 0]).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").shape == (20, 40, 3)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ImageDecodeError, match="bad.png"):
        load_image(tmp_path / "bad.png")


# --------------------------------------------------------------------------------------------------
# The fast paths (non-reference frames skipped, seek runs on parallel decoders, frame threading)
# must return exactly the frames of a plain one-pass decode.

B_FRAMES = {"mpeg4": {"bf": "2"}}  # x264 (veryfast) and x265 (ultrafast) use B-frames by default
_TEXTURE = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)


def _textured_frame(i: int) -> np.ndarray:
    """The index code under a panning noise texture: every frame predicts from its neighbours, so
    decoding from a wrong reference shows in the pixels."""
    texture = np.roll(_TEXTURE, i, axis=1)[:, :64].astype(np.uint16)
    return (code_frame(i).astype(np.uint16) * 3 // 5 + texture * 2 // 5).astype(np.uint8)


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("textured")
    return {
        codec: write_video(
            root / f"{codec}{CODECS[codec][0]}",
            60,
            codec,
            options=B_FRAMES.get(codec),
            frame_fn=_textured_frame,
        )
        for codec in available_encoders()
    }


def _one_pass(path: Path) -> np.ndarray:
    """Every frame, decoded in order with nothing skipped, converted as PyAV converts by default."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize(
    "strategy,workers,frame_threading",
    [
        ("seek", 1, False),
        ("seek", 3, False),
        ("seek", 1, True),
        ("seek", 3, True),
        ("sequential", 1, False),
        ("sequential", 1, True),
    ],
)
def test_fast_paths_equal_one_pass_decode(textured, monkeypatch, codec, strategy, workers, frame_threading):
    if codec not in textured:
        pytest.skip(f"no {codec} encoder in this PyAV build")
    monkeypatch.setattr(video_mod, "seek_workers", lambda: workers)
    if frame_threading:
        monkeypatch.setattr(video_mod, "FRAME_THREADING_MIN_PIXELS", 0)
    reference = _one_pass(textured[codec])
    assert len(reference) == 60
    for n in (5, 13, 60, 90):
        frames, _ = decode_frames(textured[codec], num_frames=n, strategy=strategy)
        expected = reference[uniform_indices(60, n)]
        assert frames.shape == expected.shape and np.array_equal(frames, expected), (codec, n)


def _count_opens(monkeypatch) -> list[str]:
    """Record every file `video_mod` opens."""
    opened: list[str] = []
    real_open = video_mod._open

    def counting(path, hwaccel=None):
        opened.append(path)
        return real_open(path, hwaccel)

    monkeypatch.setattr(video_mod, "_open", counting)
    return opened


class _CountingReformatter:
    """A VideoReformatter that counts its conversions (the real one is a final Cython class)."""

    calls = 0
    real = av.video.reformatter.VideoReformatter

    def __init__(self):
        self.inner = self.real()

    def reformat(self, *args, **kwargs):
        type(self).calls += 1
        return self.inner.reformat(*args, **kwargs)


def test_one_pass_opens_once_and_converts_each_frame_once(textured, monkeypatch):
    """A one-pass decode reuses the probe's container and packets (one open of the file) and
    converts each distinct frame once, however often it is sampled; packets over the budget are
    not kept (the pass opens the file again), with the same frames."""
    path = textured["libx264"]
    expected = _one_pass(path)[uniform_indices(60, 90)]  # 90 rows of 60 frames: 30 repeats
    opens = _count_opens(monkeypatch)
    monkeypatch.setattr(video_mod, "VideoReformatter", _CountingReformatter)
    _CountingReformatter.calls = 0
    frames, _ = decode_frames(path, num_frames=90, strategy="sequential")
    assert np.array_equal(frames, expected)
    assert len(opens) == 1 and _CountingReformatter.calls == 60

    monkeypatch.setattr(video_mod, "KEEP_PACKET_BYTES", 100)
    opens.clear()
    again, _ = decode_frames(path, num_frames=90, strategy="sequential")
    assert np.array_equal(again, expected) and len(opens) == 2


def test_an_error_while_converting_is_raised_and_its_thread_ends(textured, monkeypatch):
    real_put = video_mod._FrameSink.put

    def failing(self, index, frame, reformatter=None):
        if index == 7:
            raise VideoDecodeError("frame 7 does not convert")
        real_put(self, index, frame, reformatter)

    monkeypatch.setattr(video_mod._FrameSink, "put", failing)
    with pytest.raises(VideoDecodeError, match="frame 7 does not convert"):
        decode_frames(textured["libx264"], num_frames=60, strategy="sequential")
    assert not [t for t in threading.enumerate() if t.name == "longvila-rgb"]


def test_frames_equal_one_pass_at_a_size_swscale_would_split(tmp_path):
    """The RGB conversion runs on one swscale thread; PyAV's default (`to_ndarray`) splits a frame
    over threads: the pixels are the same, here on 320x240 frames with fine texture and colour."""
    rng = np.random.default_rng(1)
    texture = rng.integers(0, 256, (240, 640, 3), dtype=np.uint8)
    path = tmp_path / "wide.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, 8 * i : 8 * i + 320]))
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    reference = _one_pass(path)
    assert reference.shape == (12, 240, 320, 3)
    for strategy in STRATEGIES:
        frames, _ = decode_frames(path, num_frames=12, strategy=strategy)
        assert np.array_equal(frames, reference), strategy


@pytest.mark.parametrize("codec", ["libx264", "libx265", "mpeg4"])
def test_non_reference_frames_are_skipped(textured, codec):
    """Decoding towards sparse targets skips frames nothing references: fewer frames come out of the
    decoder than a full pass, and every target is among them."""
    if codec not in textured:
        pytest.skip(f"no {codec} encoder in this PyAV build")
    info = probe_video(textured[codec])
    targets = {int(info.pts[i]) for i in (0, 29, 59)}
    decoder = video_mod._Decoder(str(textured[codec]), info, targets, "SLICE")
    try:
        out = [frame.pts for frame in decoder.frames()]
    finally:
        decoder.close()
    if not video_mod.decoder_skips(info):
        assert codec == "mpeg4" and info.missing_pts  # AVI without pts: nothing skipped
        assert len(out) == 60
        return
    assert targets <= set(out) and len(out) < 60


def test_seek_runs_and_their_split():
    keyframe = np.zeros(1000, dtype=bool)
    keyframe[::100] = True
    targets = [5, 150, 160, 420, 430, 990]
    plan = plan_decode(targets, keyframe, "seek")
    runs = video_mod._seek_runs(targets, plan)
    assert [t for run in runs for t, _ in run] == targets
    assert all(run[0][1] >= 0 or i == 0 for i, run in enumerate(runs))
    assert all(k == -1 for run in runs for _, k in run[1:])  # later targets of a run decode on
    for parts in (1, 2, 3, 10):
        groups = video_mod._split_runs(runs, parts)
        assert [run for group in groups for run in group] == runs  # contiguous, all runs, in order
        assert 1 <= len(groups) <= min(parts, len(runs))
    even = [[(i * 100 + 50, i * 100)] for i in range(8)]
    assert [len(g) for g in video_mod._split_runs(even, 2)] == [4, 4]


def test_frame_threading_chosen_by_decoded_pixels(videos):
    info = probe_video(videos["libx264"])
    small = plan_decode(list(range(NUM)), info.keyframe)
    assert video_mod.decoder_thread_type(info, small) == "SLICE"  # 47 frames of 64x64
    big = dataclasses.replace(info, width=3840, height=2160)
    assert video_mod.decoder_thread_type(big, small) == "AUTO"  # 47 frames of 4K: 390 Mpixels


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("backend", ["pyav-cuda", "torchcodec-cuda"])
def test_gpu_backends_say_what_is_missing_without_a_gpu(videos, backend):
    if backend not in video_mod._BACKENDS:
        pytest.fail(f"{backend} is not registered")
    if backend not in available_backends():  # FFmpeg without CUDA, or torchcodec absent
        with pytest.raises(ValueError, match="not installed"):
            decode_frames(videos["libx264"], num_frames=4, backend=backend)
        return
    with pytest.raises(RuntimeError, match=r"libx264\.mp4.*(NVIDIA GPU|CUDA).*backend='pyav'"):
        decode_frames(videos["libx264"], num_frames=4, backend=backend)


def test_resize_while_converting_is_opt_in_and_close_to_the_torch_resize(videos, tmp_path):
    """`size=` returns the same frames (index codes) at the requested size, rotated like the default
    path, within ~1 level of a bicubic antialiased torch resize of the full-size frames (the real
    clips in docs/data.md: 0.9-1.4 levels mean)."""
    import torch.nn.functional as F

    full, _ = decode_frames(videos["libx264"], num_frames=6)
    small, _ = decode_frames(videos["libx264"], num_frames=6, size=(96, 128))
    assert full.shape == (6, 64, 64, 3) and small.shape == (6, 128, 96, 3)
    assert read_codes(small) == read_codes(full) == uniform_indices(NUM, 6).tolist()
    x = torch.from_numpy(full).permute(0, 3, 1, 2).float()
    ref = F.interpolate(x, size=(128, 96), mode="bicubic", antialias=True).clamp(0, 255).permute(0, 2, 3, 1)
    diff = np.abs(small.astype(np.float32) - ref.numpy())
    assert diff.mean() < 1.0, diff.mean()  # 0.58 measured

    rotated = write_video(tmp_path / "rot.mp4", 5, rotation=90)
    turned, _ = decode_frames(rotated, num_frames=2, size=(40, 24))
    assert turned.shape == (2, 24, 40, 3)  # (width, height) of the displayed frame

    for bad in [(0, 5), (10,), "ab", (3.5, 4)]:
        with pytest.raises(ValueError, match="size must be"):
            decode_frames(videos["libx264"], num_frames=2, size=bad)
    if "opencv" in available_backends():
        with pytest.raises(ValueError, match="needs backend 'pyav'"):
            decode_frames(videos["libx264"], num_frames=2, size=(32, 32), backend="opencv")


@pytest.mark.parametrize("codec", list(CODECS))
def test_encoding_leaves_the_scheduling_policy_as_it_was(tmp_path, codec):
    """SVT-AV1 run as root makes the calling thread real-time (SCHED_FIFO); every process the pytest
    worker starts afterwards inherits it, and busy-waiting FIFO threads (a torchrun test's gloo ranks)
    then starve the rest of a 2-core machine forever. `write_video` restores the policy."""
    if codec not in available_encoders():
        pytest.skip(f"{codec} is not in this PyAV build")
    before = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
    write_video(tmp_path / f"v{CODECS[codec][0]}", 12, codec=codec)
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
