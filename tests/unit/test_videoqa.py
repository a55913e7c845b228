"""Video-MME-style evaluation: prompt, letter extraction, the run, its summary and resuming."""

import json

import pytest
from _models import lively_tiny_model

from longvila import LongVILA, LongVILAProcessor
from longvila.cli import main
from longvila.eval.letters import PROMPT_SUFFIX, build_prompt, extract_letter
from longvila.eval.videoqa import (
    PREDICTIONS,
    SUMMARY,
    answer_question,
    load_questions,
    resolve_video,
    write_synthetic_videoqa,
)

OPTIONS = ["A. a red ball", "B. a dark red ball", "C. a blue cube", "D. a green cone"]


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("(B)", "B"),
        ("B.", "B"),
        ("C", "C"),
        ("D) a green cone", "D"),
        ("Answer: B", "B"),
        ("The best answer is (C).", "C"),
        ("the answer is d", "D"),
        ("I would say [A], clearly.", "A"),
        ("It is a dark red ball.", "B"),
        ("a blue cube", "C"),
        ("Option C fits best.", "C"),
        ("A", "A"),
        ("A dog is running.", None),
        ("", None),
        ("I cannot tell.", None),
        ("Answer: Because of the light.", None),
        ("E", None),
    ],
)
def test_extract_letter(reply, letter):
    assert extract_letter(reply, OPTIONS) == letter


def test_prompt_is_video_mme_style():
    prompt = build_prompt("What moves?", ["A. a ball", "a cube"])
    assert prompt == f"What moves?\nA. a ball\nB. a cube\n{PROMPT_SUFFIX}"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("videoqa")
    lively_tiny_model().save_pretrained(root / "model", processor=LongVILAProcessor.tiny())
    data = write_synthetic_videoqa(root / "data", num_questions=6, num_frames=4)
    with open(data, "a") as handle:
        handle.write('{"question": "broken line", "options": [\n')
        missing = {"question_id": "gone", "video": "videos/missing.mp4", "question": "Which colour?"}
        handle.write(json.dumps({**missing, "options": ["A. red", "B. blue"], "answer": "A"}) + "\n")
    return root, data


def records(out):
    return [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]


def evaluate(bench, out, *extra):
    root, data = bench
    argv = ["eval", "videoqa", "--model", str(root / "model"), "--data", str(data), "--frames", "3"]
    return main([*argv, "--out", str(out), "--no-progress", *extra])


def test_run_writes_predictions_and_summary_and_resumes(bench, tmp_path, capsys):
    root, data = bench
    questions, problems = load_questions(data)
    assert len(questions) == 7 and len(problems) == 1 and f"{data}:7" in problems[0]

    assert evaluate(bench, tmp_path) == 0
    first = records(tmp_path)
    assert len(first) == 7
    answered = [r for r in first if "error" not in r]
    assert len(answered) == 6
    (failed,) = [r for r in first if "error" in r]
    assert (
        failed["question_id"] == "gone"
        and f"{data}:8" in failed["error"]
        and "missing.mp4" in failed["error"]
    )
    by_id = {q.question_id: q for q in questions}
    for record in answered:
        assert record["prediction"] == extract_letter(
            record["response"], by_id[record["question_id"]].options
        )
        assert record["correct"] == (record["prediction"] == record["answer"])

    # The reply is the model's greedy output for Video-MME's prompt.
    model = LongVILA.from_pretrained(root / "model").eval()
    processor = LongVILAProcessor.from_pretrained(root / "model")
    q = questions[0]
    video = resolve_video(q.video, data.parent)
    response, _ = answer_question(
        model, processor, q, video, num_frames=3, fps=None, max_frames=None, max_new_tokens=16
    )
    assert response == answered[0]["response"]

    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert summary["total"] == 6 and summary["errors"] == 2
    assert summary["correct"] == sum(r["correct"] for r in answered)
    assert set(summary["by_duration"]) == {"short", "medium", "long"}
    assert sum(v["total"] for v in summary["by_duration"].values()) == 6
    assert set(summary["by_task_type"]) == {"Colour Recognition"}
    assert "accuracy" in capsys.readouterr().out

    # Resume: answered questions are skipped, the failed one is retried.
    assert evaluate(bench, tmp_path) == 0
    second = records(tmp_path)
    assert second[:7] == first and len(second) == 8 and second[7]["question_id"] == "gone"
    write_synthetic_videoqa(root / "extra", num_questions=1, num_frames=4)
    (root / "extra" / "videos" / "000.mp4").rename(data.parent / "videos" / "missing.mp4")
    assert evaluate(bench, tmp_path) == 0
    third = records(tmp_path)
    assert len(third) == 9 and "error" not in third[8]
    assert json.loads((tmp_path / SUMMARY).read_text())["total"] == 7


def test_limit_and_parquet(bench, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, data = bench
    rows = [json.loads(line) for line in data.read_text().splitlines()[:6]]
    parquet = data.parent / "videoqa.parquet"
    pq.write_table(pyarrow.Table.from_pylist(rows), parquet)
    argv = ["eval", "videoqa", "--model", str(root / "model"), "--data", str(parquet), "--frames", "3"]
    assert main([*argv, "--out", str(tmp_path / "p"), "--limit", "2", "--no-progress"]) == 0
    assert [r["question_id"] for r in records(tmp_path / "p")] == ["synthetic-0", "synthetic-1"]


def test_missing_data_file_is_a_clean_error(bench, tmp_path, capsys):
    root, _ = bench
    argv = ["eval", "videoqa", "--model", str(root / "model"), "--data", str(tmp_path / "none.jsonl")]
    assert main(argv) == 1
    assert "none.jsonl" in capsys.readouterr().err


def test_eval_niah_runs_a_small_grid_and_rejects_bad_grids(bench, tmp_path, capsys):
    model = str(bench[0] / "model")
    out = tmp_path / "niah"
    argv = ["eval", "niah", "--model", model, "--frames", "2,4", "--depths", "0:100:50", "--num-needles", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["frame_counts"] == [2, 4] and report["depths"] == [0.0, 0.5, 1.0]
    assert len(list((out / "cells").glob("*.json"))) == 6 and (out / "niah.png").exists()
    assert main(["eval", "niah", "--model", model, "--frames", "10:2:1", "--out", str(out)]) == 1
    assert "--frames '10:2:1'" in capsys.readouterr().err
    assert (
        main(["eval", "niah", "--model", model, "--needles", str(tmp_path / "none.json"), "--out", str(out)])
        == 1
    )
    assert "none.json" in capsys.readouterr().err
