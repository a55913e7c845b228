"""The real-video benchmark's helpers: stream-copy loops decode to the clip's frames repeated, the
contenders return the frames decode_frames returns, and benchmarks/RESULTS.md subsections are replaced in place."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pytest
from _video_helpers import read_codes, write_video

from longvila.data.video import available_backends, decode_frames, probe_video, uniform_indices

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import decode_real  # noqa: E402
import real_videos  # noqa: E402


def test_stream_copy_loop_repeats_the_clip(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", 20, "libx264")
    loop = tmp_path / "loop.mp4"
    real_videos.loop_by_stream_copy(clip, loop, 3)
    info = probe_video(loop)
    assert info.num_frames == 60 and int(info.keyframe.sum()) == 3 * int(probe_video(clip).keyframe.sum())
    with av.open(str(loop)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert read_codes(frames) == list(range(20)) * 3
    np.testing.assert_allclose(np.diff(info.timestamps), 1 / 30, atol=1e-3)  # no gap at the seams


@pytest.mark.parametrize("name", ["decord", "OpenCV seek", "OpenCV one pass"])
def test_contenders_return_the_sampled_frames(tmp_path, name):
    runner = {
        "decord": decode_real.run_decord,
        "OpenCV seek": decode_real.run_opencv_seek,
        "OpenCV one pass": decode_real.run_opencv_pass,
    }[name]
    if ("decord" if name == "decord" else "opencv") not in available_backends():
        pytest.skip(f"{name} not installed")
    clip = write_video(tmp_path / "clip.mp4", 47, "libx264")
    indices = uniform_indices(47, 9)
    frames = runner(clip, indices)
    ours, _ = decode_frames(clip, num_frames=9)
    assert read_codes(frames) == indices.tolist()
    assert decode_real.digests(frames) == decode_real.digests(ours)


def test_write_subsection_replaces_only_its_part(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\n## Video decoding\n\n### A\n\nold a\n\n### B\n\nold b\n\n## Other\n\nkeep\n"
    )
    decode_real.write_subsection(results, "## Video decoding", "### A", "new a")
    decode_real.write_subsection(results, "## Video decoding", "### C", "new c")
    decode_real.write_subsection(results, "## Fresh", "### D", "new d")
    text = results.read_text()
    assert "old a" not in text and "new a" in text and "old b" in text and "keep" in text
    assert text.index("### A") < text.index("### B") < text.index("### C") < text.index("## Other")
    assert text.rstrip().endswith("### D\n\nnew d")


def _row(video: str, minutes: float, ours: float, decord: float, opencv: float) -> dict:
    return {
        "video": video,
        "size": "640×272",
        "codec": "h264",
        "frames": 250,
        "minutes": minutes,
        "n": 64,
        "plan": "sequential, 0 seeks",
        "seconds": {"longvila": ours, "decord": decord, "OpenCV one pass": opencv},
        "mismatches": {"longvila": 0, "decord": 0, "OpenCV one pass": 0},
        "one_pass_s": 1.0,
    }


def test_describe_summarises_the_ratios_and_the_load():
    rows = [_row("a.mp4", 0.2, 0.50, 0.75, 0.90), _row("b.mp4", 0.2, 0.50, 0.60, 0.40)]
    text = decode_real.describe(rows, 9, "clips", "python benchmarks/decode.py --real D --short", 0.5)
    assert "median of\n9 rounds" in text
    assert "0.80× at worst, 1.15× median" in text  # 0.75 / 0.50 and 0.40 / 0.50
    assert "in 1 of 2 cases" in text and "kept 0.5 of the" in text
    assert "| 1.50× (decord) | yes |" in text and "| 0.80× (OpenCV one pass) | **no** |" in text
    assert text.count("\n| a.mp4 |") == 1 and "--short`" in text


def test_short_needs_real(capsys):
    import decode

    with pytest.raises(SystemExit):
        decode.main(["--short"])
    assert "--short needs --real" in capsys.readouterr().err
