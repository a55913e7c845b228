"""Multiple-choice video QA in Video-MME's format: accuracy overall, by duration and by category.

Input: JSONL or parquet, one question per line/row, with `video` (or Video-MME's `videoID`), `question`,
`options` (a list, "A. text" or bare text), `answer` (a letter) and optionally `question_id`,
`duration` (short / medium / long), `task_type`, `domain`. Relative video paths resolve against a media
root (default: the data file's folder); a name without a suffix also tries ".mp4".

Output (in `out_dir`): `predictions.jsonl`, one record per question, appended as answers come, so an
interrupted run resumes where it stopped; `summary.json` with the accuracies. A malformed line or a
video that cannot be read is reported with `file:line`, counted, and recorded so that a later run
retries it; it never stops the evaluation.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from longvila.data.synthetic import COLOURS as SYNTHETIC_COLOURS
from longvila.data.synthetic import write_mp4
from longvila.eval.letters import build_prompt, extract_letter, option_letters
from longvila.files import write_json_atomic

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
CATEGORY_FIELDS = ("duration", "task_type", "domain")


@dataclass
class Question:
    question_id: str
    video: str
    question: str
    options: list[str]
    answer: str
    where: str
    """`file:line` of the question in the data file, for messages."""
    categories: dict[str, str] = field(default_factory=dict)


class QuestionError(ValueError):
    """A data line that is not a usable question; the message starts with `file:line`."""


# ---- reading ---------------------------------------------------------------------------------------
def _rows(path: Path):
    """(line number, parsed row or the exception) for each line/row of a JSONL or parquet file."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, row
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, exc


def _parse(row: Any, where: str) -> Question:
    if isinstance(row, Exception):
        raise QuestionError(f"{where}: not valid JSON ({row})")
    if not isinstance(row, dict):
        raise QuestionError(f"{where}: expected an object, got {type(row).__name__}")
    video = row.get("video") or row.get("videoID") or row.get("video_id")
    missing = [name for name, value in (("video", video), ("question", row.get("question"))) if not value]
    options = row.get("options")
    if isinstance(options, np.ndarray):
        options = options.tolist()
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        missing.append("options (a non-empty list of strings)")
    if missing:
        raise QuestionError(f"{where}: missing or malformed field(s): {', '.join(missing)}")
    answer = str(row.get("answer", "")).strip().upper()
    if answer not in option_letters(len(options)) or len(answer) != 1:
        raise QuestionError(f"{where}: answer {row.get('answer')!r} is not one of the option letters")
    categories = {name: str(row[name]) for name in CATEGORY_FIELDS if row.get(name) not in (None, "")}
    return Question(
        question_id=str(row.get("question_id") or row.get("id") or where),
        video=str(video),
        question=str(row["question"]),
        options=list(options),
        answer=answer,
        where=where,
        categories=categories,
    )


def load_questions(path: str | os.PathLike) -> tuple[list[Question], list[str]]:
    """The questions of a data file, and one `file:line: problem` message per unusable line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    questions, problems = [], []
    for number, row in _rows(path):
        try:
            questions.append(_parse(row, f"{path}:{number}"))
        except QuestionError as exc:
            problems.append(str(exc))
    return questions, problems


def resolve_video(video: str, media_root: Path) -> Path:
    """The path of a question's video: absolute, or under `media_root`; a bare name tries ".mp4"."""
    path = Path(video) if os.path.isabs(video) else media_root / video
    if not path.exists() and not path.suffix:
        with_suffix = path.with_suffix(".mp4")
        if with_suffix.exists():
            return with_suffix
    return path


# ---- results ---------------------------------------------------------------------------------------
def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """The last record per question id of an earlier run (unreadable lines are skipped)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the last run was killed
            if isinstance(record, dict) and "question_id" in record:
                records[str(record["question_id"])] = record
    return records


def summarize(records: list[dict[str, Any]], data_problems: list[str] | None = None) -> dict[str, Any]:
    """Accuracy over the answered questions, overall and per value of each category field."""
    answered = [r for r in records if "error" not in r]
    errors = [r for r in records if "error" in r]

    def accuracy(group: list[dict[str, Any]]) -> dict[str, Any]:
        correct = sum(bool(r["correct"]) for r in group)
        return {"accuracy": correct / len(group) if group else 0.0, "correct": correct, "total": len(group)}

    summary: dict[str, Any] = {
        **accuracy(answered),
        "no_letter": sum(r.get("prediction") is None for r in answered),
        "errors": len(errors) + len(data_problems or []),
        "error_messages": [r["error"] for r in errors] + list(data_problems or []),
    }
    for name in CATEGORY_FIELDS:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in answered:
            if record.get(name) is not None:
                groups[str(record[name])].append(record)
        if groups:
            summary[f"by_{name}"] = {value: accuracy(group) for value, group in sorted(groups.items())}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"accuracy {summary['accuracy']:.2%} ({summary['correct']}/{summary['total']})"]
    for name in CATEGORY_FIELDS:
        for value, entry in summary.get(f"by_{name}", {}).items():
            lines.append(f"  {name}={value}: {entry['accuracy']:.2%} ({entry['correct']}/{entry['total']})")
    if summary["no_letter"]:
        lines.append(f"{summary['no_letter']} replies named no option")
    if summary["errors"]:
        lines.append(f"{summary['errors']} questions could not be evaluated")
    return "\n".join(lines)


# ---- the run ---------------------------------------------------------------------------------------
def answer_question(
    model,
    processor,
    question: Question,
    video_path: Path,
    *,
    num_frames,
    fps,
    max_frames,
    max_new_tokens,
    sp=None,
) -> tuple[str, str | None]:
    """Greedy reply of the model to one question, and the letter extracted from it."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(video_path)},
                {"type": "text", "text": build_prompt(question.question, question.options)},
            ],
        }
    ]
    sample = processor(messages, num_frames=num_frames, fps=fps, max_frames=max_frames)
    new_ids = model.generate(
        **processor.collate([sample]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=processor.stop_token_ids,
        sp=sp,
    )
    response = processor.decode(new_ids[0])
    return response, extract_letter(response, question.options)


def run_videoqa(
    model,
    processor,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    media_root: str | os.PathLike | None = None,
    limit: int | None = None,
    max_new_tokens: int = 16,
    progress: bool = True,
    log=None,
    sp=None,
) -> dict[str, Any]:
    """Evaluate `model` on a Video-MME-format file; writes predictions and summary to `out_dir`.

    Questions already answered in `out_dir/predictions.jsonl` are skipped (those that failed are
    retried). Returns the summary (also written to `out_dir/summary.json`).

    `sp`: a SequenceParallel group (torchrun, data-parallel degree 1): every question's prompt is
    prefilled with MM-SP across the ranks; SP rank 0 decides what is left to do, logs and writes,
    and every rank returns the same summary.
    """
    from tqdm import tqdm

    parallel = sp is not None and sp.sp_degree > 1
    if parallel and sp.dp_degree != 1:
        raise ValueError(
            f"video QA under sequence parallelism needs data-parallel degree 1; got dp={sp.dp_degree}"
        )
    writer = not parallel or sp.sp_rank == 0
    progress = progress and writer
    if not writer:
        log = lambda message: None  # noqa: E731
    log = log or (lambda message: print(message, file=sys.stderr))
    data = Path(data)
    root = Path(media_root) if media_root is not None else data.parent
    out = Path(out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    questions, problems = load_questions(data)
    for problem in problems:
        log(f"skipped {problem}")
    if limit is not None:
        questions = questions[:limit]
    done = read_predictions(out / PREDICTIONS) if writer else {}
    if parallel:  # the ranks must walk the same questions: rank 0's view of the file decides
        import torch.distributed as dist

        shared = [done]
        dist.broadcast_object_list(shared, group_src=0, group=sp.sp_group)
        done = shared[0]
    todo = [q for q in questions if "error" in done.get(q.question_id, {"error": None})]
    if len(todo) < len(questions):
        log(f"resuming: {len(questions) - len(todo)} of {len(questions)} questions already answered")
    with open(out / PREDICTIONS, "a", encoding="utf-8") if writer else open(os.devnull, "w") as sink:
        for question in tqdm(todo, desc="video QA", unit="q", disable=not progress):
            record: dict[str, Any] = {
                "question_id": question.question_id,
                "video": question.video,
                "answer": question.answer,
                **question.categories,
            }
            video_path = resolve_video(question.video, root)
            try:
                response, letter = answer_question(
                    model,
                    processor,
                    question,
                    video_path,
                    num_frames=num_frames,
                    fps=fps,
                    max_frames=max_frames,
                    max_new_tokens=max_new_tokens,
                    sp=sp,
                )
                record.update(response=response, prediction=letter, correct=letter == question.answer)
            except (FileNotFoundError, ValueError) as exc:
                record["error"] = f"{question.where}: {exc}"
                log(record["error"])
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            done[question.question_id] = record
    wanted = {q.question_id for q in questions}
    summary = summarize([r for qid, r in done.items() if qid in wanted], problems)
    summary.update(data=str(data), num_frames=num_frames, fps=fps)
    if writer:
        write_json_atomic(out / SUMMARY, summary)
    return summary


# ---- a synthetic file for tests and smoke runs ------------------------------------------------------
# One-colour videos use the synthetic sets' palette (six clearly distinct colours of it).
COLOURS = {name: SYNTHETIC_COLOURS[name] for name in ("red", "green", "blue", "yellow", "white", "black")}


def write_synthetic_videoqa(
    out_dir: str | os.PathLike, num_questions: int = 6, num_frames: int = 8, size: int = 64, seed: int = 0
) -> Path:
    """Videos of one colour each and "which colour?" questions with known answers, in Video-MME's
    format (options "A. red", answer letter, duration / task_type / domain). Returns the JSONL path."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    durations = ("short", "medium", "long")
    records = []
    for i in range(num_questions):
        choice = rng.choice(len(names), size=4, replace=False)
        options = [names[c] for c in choice]
        answer = int(rng.integers(4))
        frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
        frames[:] = COLOURS[options[answer]]
        noise = rng.integers(-12, 13, size=frames.shape)
        frames = np.clip(frames.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        video = f"videos/{i:03d}.mp4"
        write_mp4(out / video, frames)
        records.append(
            Question(
                question_id=f"synthetic-{i}",
                video=video,
                question="Which colour fills the video?",
                options=[f"{letter}. {name}" for letter, name in zip("ABCD", options)],
                answer="ABCD"[answer],
                where="",
                categories={
                    "duration": durations[i % 3],
                    "task_type": "Colour Recognition",
                    "domain": "Synthetic",
                },
            )
        )
    path = out / "videoqa.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for q in records:
            row = asdict(q)
            row.pop("where")
            row.update(row.pop("categories"))
            handle.write(json.dumps(row) + "\n")
    return path
