"""`ask` under MM-SP: ChatSession with `sp` answers what one process answers (greedy and seeded
sampling, over a follow-up turn), only SP rank 0 streams, and unseeded sampling agrees across ranks;
`longvila ask` under torchrun prints the single-process answer once."""

from __future__ import annotations

import subprocess
import sys

from _chat_cases import chat_case
from _launch import run_distributed
from _torchrun import TORCHRUN, run_command


def test_chat_session_under_sp_answers_as_one_process():
    results = run_distributed(chat_case, 2, [(2, 1), (1, 2)], timeout=600)
    assert all(text.strip() for text in results[0]["ref_greedy"])  # varied text: a real comparison
    assert results[0]["ref_sampled"] != results[0]["ref_greedy"]
    for rank, r in enumerate(results):
        for name, got in r["sp"].items():
            assert got["greedy"] == r["ref_greedy"], (rank, name)
            assert got["sampled"] == r["ref_sampled"], (rank, name)
            assert got["streamed"] == (got["greedy"][0] if rank == 0 else ""), (rank, name)
    for name in results[0]["sp"]:
        assert results[0]["sp"][name]["unseeded"] == results[1]["sp"][name]["unseeded"], name


def test_ask_cli_under_torchrun_prints_the_single_process_answer(tmp_path):
    import numpy as np
    from _models import lively_checkpoint

    from longvila.data.synthetic import write_mp4 as write_video

    ckpt = lively_checkpoint(tmp_path / "ckpt")
    frames = np.random.default_rng(1).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    video = write_video(tmp_path / "clip.mp4", frames)
    ask = ["-m", "longvila.cli", "ask", str(video), "What happens?", "--model", str(ckpt), "--frames", "8",
           "--max-new-tokens", "8"]  # fmt: skip
    single = subprocess.run([sys.executable, *ask], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert single.stdout.strip()
    torchrun = [*TORCHRUN, "--nproc-per-node", "2"]
    parallel = run_command([*torchrun, *ask, "--ring", "2"], timeout=300)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout  # printed once, by rank 0
    chat = run_command([*torchrun, *ask, "--ring", "2", "--chat"], timeout=300)
    assert chat.returncode != 0 and "--chat" in chat.stderr
