"""`longvila ask` as a user runs it: a subprocess on a video and an image written here."""

import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
from _models import lively_tiny_model
from PIL import Image

from longvila import LongVILA, LongVILAProcessor
from longvila.chat import ChatSession

TIMEOUT = 120


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ask")
    lively_tiny_model().save_pretrained(root / "model", processor=LongVILAProcessor.tiny())
    rng = np.random.default_rng(0)
    video = root / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 8)
        for _ in range(10):
            frame = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    image = root / "picture.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    broken = root / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 50)
    return {"root": root, "model": root / "model", "video": video, "image": image, "broken": broken}


def ask(*args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "longvila.cli", "ask", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def expected(files, questions, **media):
    model = LongVILA.from_pretrained(files["model"]).eval()
    processor = LongVILAProcessor.from_pretrained(files["model"])
    session = ChatSession(model, processor, num_frames=4, max_new_tokens=8)
    answers = [session.ask(questions[0], **media)]
    answers += [session.ask(q) for q in questions[1:]]
    return answers


def test_ask_about_a_video_streams_the_greedy_answer(files):
    result = ask(
        files["video"], "What happens?", "--model", files["model"], "--frames", 4, "--max-new-tokens", 8
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected(files, ["What happens?"], video=str(files["video"]))[0] + "\n"


def test_ask_about_an_image_in_a_chat(files):
    result = ask(
        files["image"],
        "What is it?",
        "--model",
        files["model"],
        "--frames",
        4,
        "--max-new-tokens",
        8,
        "--chat",
        stdin="And the colour?\n\nnot asked\n",
    )
    assert result.returncode == 0, result.stderr
    answers = expected(files, ["What is it?", "And the colour?"], image=str(files["image"]))
    assert result.stdout == "".join(a + "\n" for a in answers)


@pytest.mark.parametrize("name", ["missing.mp4", "broken"])
def test_bad_media_fail_cleanly(files, name):
    path = files.get(name, files["root"] / name)
    result = ask(path, "What happens?", "--model", files["model"])
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("longvila ask: error:")
