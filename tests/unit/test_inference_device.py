"""`--device` / `--dtype` of the inference commands (ask, serve, eval): resolution, errors, loading."""

from __future__ import annotations

import pytest
import torch
from _models import lively_checkpoint

from longvila.cli import main as cli_main
from longvila.commands._model import load_for_inference, resolve_dtype
from longvila.devices import resolve_device


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return lively_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) is None  # the checkpoint's own dtype on CPU
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ValueError, match="expected cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_load_for_inference_places_and_casts(ckpt):
    model, processor = load_for_inference(str(ckpt), "cpu", "bfloat16")
    assert not model.training and model.device == torch.device("cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    kept, _ = load_for_inference(str(ckpt), "auto" if not torch.cuda.is_available() else "cpu", "auto")
    assert {p.dtype for p in kept.parameters()} == {torch.float32}
    with pytest.raises(FileNotFoundError, match="nope"):
        load_for_inference(str(ckpt / "nope"))


def test_ask_runs_the_model_in_the_dtype_asked_for(ckpt, tmp_path, capsys):
    import numpy as np

    from longvila.chat import ChatSession
    from longvila.data.synthetic import write_mp4 as write_video
    from longvila.data.video import decode_frames

    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    path = write_video(tmp_path / "clip.mp4", frames)
    code = cli_main(
        ["ask", str(path), "What is this?", "--model", str(ckpt), "--dtype", "bfloat16", "--device", "cpu",
         "--frames", "4", "--max-new-tokens", "5"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    # The same question on the frames the CLI decoded, through the library in bfloat16 and float32.
    decoded, _ = decode_frames(path, num_frames=4)
    answers = {}
    for dtype in ("bfloat16", "float32"):
        model, processor = load_for_inference(str(ckpt), "cpu", dtype)
        session = ChatSession(model, processor, num_frames=4, max_new_tokens=5)  # as --frames 4
        answers[dtype] = session.ask("What is this?", video=decoded)
    assert answers["bfloat16"].strip()  # varied text, not an empty answer
    assert printed.rstrip("\n") == answers["bfloat16"]
    # Without --dtype the CPU keeps the checkpoint's float32.
    default = [
        "ask",
        str(path),
        "What is this?",
        "--model",
        str(ckpt),
        "--frames",
        "4",
        "--max-new-tokens",
        "5",
    ]
    assert cli_main(default) == 0
    assert capsys.readouterr().out.rstrip("\n") == answers["float32"]
    assert cli_main(["ask", str(path), "hi", "--model", str(ckpt), "--device", "tpu"]) == 1
    assert "expected cpu, cuda" in capsys.readouterr().err
