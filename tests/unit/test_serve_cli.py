"""`longvila serve` as a user runs it: a subprocess on loopback with a key and a media root, stopped by
Ctrl-C; and `--export-llm`."""

import json
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from _models import lively_checkpoint

from longvila.cli import main as cli_main
from longvila.data.synthetic import write_mp4 as write_video

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return lively_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ckpt")


def read_line(stream, timeout: float) -> str:
    """The next line of `stream`, or '' after `timeout` seconds."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else ""


def test_serve_subprocess_with_key_and_media_root(ckpt, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    video = write_video(
        media / "clip.mp4", np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    )
    command = [sys.executable, "-m", "longvila.cli", "serve", "--model", str(ckpt), "--port", "0"]
    command += ["--api-key", "k1", "--allowed-local-media-path", str(media), "--frames", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(process.stdout, 120)
        assert line.startswith("serving tiny-ckpt on http://127.0.0.1:"), (line, process.poll())
        url = line.split(" on ")[1].strip()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", timeout=60, max_retries=0)
        part = {"type": "video_url", "video_url": {"url": str(video)}}
        reply = client.chat.completions.create(
            model="tiny-ckpt", messages=[{"role": "user", "content": [part]}], max_tokens=3
        )
        assert reply.usage.prompt_tokens > 2 * 16
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="k2", max_retries=0).models.list()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, process.stderr.read()


def test_serve_refuses_a_media_root_that_is_not_a_directory(ckpt, tmp_path, capsys):
    code = cli_main(["serve", "--model", str(ckpt), "--allowed-local-media-path", str(tmp_path / "none")])
    assert code == 1
    assert "--allowed-local-media-path" in capsys.readouterr().err


def test_export_llm_writes_a_plain_checkpoint(ckpt, tmp_path, capsys):
    out = tmp_path / "llm"
    assert cli_main(["serve", "--model", str(ckpt), "--export-llm", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert str(out) in capsys.readouterr().out
