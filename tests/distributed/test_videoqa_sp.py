"""`longvila eval videoqa` under torchrun with MM-SP writes the single-process predictions (rank 0
alone writes and reports), and resumes the same way."""

from __future__ import annotations

import json
import sys

from _torchrun import TORCHRUN, run_command


def test_eval_videoqa_under_torchrun_matches_one_process(tmp_path):
    from _models import lively_checkpoint

    from longvila.eval.videoqa import PREDICTIONS, SUMMARY, write_synthetic_videoqa

    ckpt = lively_checkpoint(tmp_path / "ckpt")
    data = write_synthetic_videoqa(tmp_path / "data", num_questions=4, num_frames=4)
    with open(data, "a") as handle:  # one question whose video is missing: an error record, retried
        missing = {"question_id": "gone", "video": "videos/missing.mp4", "question": "Which colour?"}
        handle.write(json.dumps({**missing, "options": ["A. red", "B. blue"], "answer": "A"}) + "\n")
    cli = ["-m", "longvila.cli", "eval", "videoqa", "--model", str(ckpt), "--data", str(data), "--frames", "3",
           "--no-progress"]  # fmt: skip
    torchrun = [*TORCHRUN, "--nproc-per-node", "2"]

    def run(prefix, out, *extra):
        done = run_command([*prefix, *cli, "--out", str(out), *extra], timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done, [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]

    _, single = run([sys.executable], tmp_path / "one")
    shown, parallel = run(torchrun, tmp_path / "sp", "--ulysses", "2")
    assert len(single) == 5 and sum("error" in r for r in single) == 1
    assert len({r.get("response") for r in single if "error" not in r}) > 1  # varied replies
    strip = lambda records: [{k: v for k, v in r.items() if k != "error"} for r in records]  # noqa: E731
    assert strip(parallel) == strip(single)
    assert shown.stdout.count("accuracy") == 1  # rank 0 alone reports
    one = json.loads((tmp_path / "one" / SUMMARY).read_text())
    sp = json.loads((tmp_path / "sp" / SUMMARY).read_text())
    assert {k: v for k, v in sp.items() if k != "data"} == {k: v for k, v in one.items() if k != "data"}
    # Resume under torchrun: only the failed question is asked again, once.
    _, again = run(torchrun, tmp_path / "sp", "--ulysses", "2")
    assert again[:5] == parallel and len(again) == 6 and again[5]["question_id"] == "gone"
