"""Long-video SFT data (stage 5), the LongVILA way: caption short clips, then let a text LLM write a
summary and questions about the whole video from the timed captions.

    longvila data long-sft --videos videos/ --captioner ckpt/ --writer qwen2-7b-instruct/ --out out/

Per video (`process_video`):
1. cut it into clips (`scene.plan_clips`: `clip_seconds` windows, optionally at scene cuts),
   sample `frames_per_clip` frames per clip and caption the clips with a longvila model, several
   clips per `generate` call (they are packed into one row and decoded as a batch);
2. send the ordered, timed captions to a writer LLM through the prompt templates
   (`prompts/*.txt`, overridable file by file with `prompts_dir`); it must answer with JSON:
       {"summary": str, "qa": [{"type": "when|order|count|cause|detail", "question": str,
                                "answer": str, "time": [start, end]  (optional, seconds)}]}
3. validate the JSON (`parse_writer_output`); on failure retry up to `max_retries` times with the
   errors as a repair hint; a video whose writer never gives valid JSON goes to the error report,
   never to the manifest.

Runs are resumable: each video's captions and result are cached in `out/cache/<key>.json` (written
atomically) and reused when the settings that produced them match. Runs are shardable
(`shard=(i, n)` takes videos i, i + n, …; under torchrun RANK / WORLD_SIZE split each shard
further); the shards' manifests are merged in video order when the last shard finishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from longvila.data.errors import MediaDecodeError
from longvila.data.scene import clip_frame_times, detect_scene_cuts, frames_at, plan_clips, video_duration
from longvila.data.video import probe_video
from longvila.files import write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
QUESTION_TYPES = ("when", "order", "count", "cause", "detail")
PROMPT_FILES = ("caption", "system", "write", "repair", "describe")
# Slack when checking a "time" field against the duration (container rounding, last frame time).
TIME_TOLERANCE_S = 1.0


# --------------------------------------------------------------------------------------------------
# Settings and prompts


@dataclass(kw_only=True)
class LongSFTConfig:
    """Settings of a long-SFT build (the `longvila data long-sft` flags)."""

    clip_seconds: float = 10.0
    """Length of the clips each caption describes (the paper: 10 s)."""
    scene_cuts: bool = False
    """Also cut at scene changes (frame-difference detector on thumbnails), then to clip_seconds."""
    frames_per_clip: int = 8
    """Frames sampled uniformly in time from each clip for the captioner."""
    clips_per_batch: int = 8
    """Clips packed into one captioner `generate` call."""
    caption_max_new_tokens: int = 96
    writer_max_new_tokens: int = 1024
    num_questions: int = 6
    """Question-answer pairs asked of the writer per video."""
    min_questions: int = 3
    """Fewer valid pairs than this is a failed attempt."""
    max_retries: int = 2
    """Extra writer attempts after malformed output (each gets the errors as a repair hint)."""
    prompts_dir: str | None = None
    """Folder whose *.txt files replace the default prompt templates of the same name."""
    media_root: str | None = None
    """Write video paths relative to this folder (default: absolute paths)."""
    progress: bool = True
    """tqdm progress bars."""

    def __post_init__(self) -> None:
        for name in ("frames_per_clip", "clips_per_batch", "num_questions", "min_questions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clip_seconds <= 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


@dataclass(frozen=True)
class PromptSet:
    """The prompt templates (`string.Template`: `$name` fields, so JSON braces need no escaping)."""

    caption: str
    system: str
    write: str
    repair: str
    describe: tuple[str, ...]
    source: str
    sha256: str

    @classmethod
    def load(cls, prompts_dir: str | os.PathLike | None = None) -> PromptSet:
        """The shipped defaults, with any `<name>.txt` in `prompts_dir` replacing its default."""
        default_dir = resources.files("longvila") / "data" / "prompts"
        texts = {}
        for name in PROMPT_FILES:
            override = Path(prompts_dir) / f"{name}.txt" if prompts_dir else None
            if override is not None and override.exists():
                texts[name] = override.read_text(encoding="utf-8")
            else:
                texts[name] = (default_dir / f"{name}.txt").read_text(encoding="utf-8")
        digest = hashlib.sha256()
        for name in PROMPT_FILES:
            digest.update(f"{name}\0{texts[name]}\0".encode())
        describe = tuple(line.strip() for line in texts["describe"].splitlines() if line.strip())
        if not describe:
            raise ValueError("describe.txt: needs at least one line (the summary question)")
        for name in ("caption", "system", "write", "repair"):
            texts[name] = texts[name].strip()
        return cls(
            caption=texts["caption"],
            system=texts["system"],
            write=texts["write"],
            repair=texts["repair"],
            describe=describe,
            source=str(prompts_dir) if prompts_dir else "default",
            sha256=digest.hexdigest(),
        )

    def render_write(self, clips: Sequence[dict], duration: float, num_questions: int) -> str:
        captions = "\n".join(
            f"[{c['start']:.1f}s - {c['end']:.1f}s] {c['caption'].strip() or '(no caption)'}" for c in clips
        )
        fields = {
            "duration": f"{duration:.1f}",
            "num_clips": str(len(clips)),
            "captions": captions,
            "num_questions": str(num_questions),
        }
        return string.Template(self.write).safe_substitute(fields)

    def render_repair(self, errors: Sequence[str]) -> str:
        listed = "\n".join(f"- {e}" for e in errors)
        return string.Template(self.repair).safe_substitute(errors=listed)


# --------------------------------------------------------------------------------------------------
# Captioner and writer


class Captioner(Protocol):
    name: str

    def caption(self, clips: list[np.ndarray], prompt: str) -> list[str]:
        """One caption per clip (uint8 frames (T, H, W, 3))."""
        ...


Writer = Callable[[list[dict[str, str]]], str]
"""Chat messages [{"role", "content"}] -> the reply text. A `name` attribute, if any, is recorded."""


# --------------------------------------------------------------------------------------------------
# Validating the writer's JSON


class WriterOutputError(ValueError):
    """The writer's reply is not usable; `errors` lists every problem found."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


def _normalise(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def extract_json(text: str) -> Any:
    """The JSON object in a reply: the whole reply, or the span from the first '{' to the last '}'
    (models like to wrap it in ``` fences or a sentence)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise WriterOutputError(["the reply holds no JSON object"])
    try:
        return json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise WriterOutputError([f"the reply is not valid JSON ({exc})"]) from exc


def _check_time(value: Any, duration: float, where: str) -> tuple[list[float] | None, list[str]]:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        return None, [f"{where}.time must be [start, end] in seconds, got {value!r}"]
    start, end = float(value[0]), float(value[1])
    if not (0 <= start <= end <= duration + TIME_TOLERANCE_S):
        return None, [f"{where}.time {value} is not within the video (0 to {duration:.1f} s)"]
    return [start, end], []


def _check_qa(item: Any, where: str, duration: float) -> tuple[dict | None, list[str]]:
    if not isinstance(item, dict):
        return None, [f"{where} must be an object, got {type(item).__name__}"]
    errors = []
    kind = item.get("type")
    if kind not in QUESTION_TYPES:
        errors.append(f"{where}.type must be one of {', '.join(QUESTION_TYPES)}, got {kind!r}")
    texts = {}
    for key in ("question", "answer"):
        value = item.get(key)
        if not isinstance(value, str) or not value.strip():
            errors.append(f"{where}.{key} must be a non-empty string, got {value!r}")
        else:
            texts[key] = value.strip()
    if len(texts) == 2 and _normalise(texts["answer"]) == _normalise(texts["question"]):
        errors.append(f"{where}.answer copies its question")
    qa = {"type": kind, **texts}
    if item.get("time") is not None:
        qa["time"], time_errors = _check_time(item["time"], duration, where)
        errors += time_errors
    return (None if errors else qa), errors


def parse_writer_output(text: str, duration: float, min_questions: int = 1) -> dict[str, Any]:
    """The validated {"summary", "qa"} of a writer reply, or WriterOutputError listing every problem.

    Checks: a JSON object with a non-empty string "summary" and a list "qa" of at least
    `min_questions` objects, each with a known "type", non-empty "question" and "answer", an answer
    that is not the question again, an optional "time" [start, end] inside [0, duration], and no
    question asked twice. Other keys are ignored (not written).
    """
    data = extract_json(text)
    if not isinstance(data, dict):
        raise WriterOutputError([f"the reply must be a JSON object, got {type(data).__name__}"])
    errors = []
    summary = data.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        errors.append(f"summary must be a non-empty string, got {summary!r}")
    items = data.get("qa")
    qa: list[dict] = []
    if not isinstance(items, list):
        errors.append(f"qa must be a list of question objects, got {type(items).__name__}")
        items = []
    seen = set()
    for i, item in enumerate(items):
        checked, item_errors = _check_qa(item, f"qa[{i}]", duration)
        errors += item_errors
        if checked is not None:
            key = _normalise(checked["question"])
            if key in seen:
                errors.append(f"qa[{i}] asks the same question again")
                continue
            seen.add(key)
            qa.append(checked)
    if isinstance(data.get("qa"), list) and len(items) < min_questions:
        errors.append(f"qa needs at least {min_questions} questions, got {len(items)}")
    if errors:
        raise WriterOutputError(errors)
    return {"summary": summary.strip(), "qa": qa}


@dataclass
class WriterFailure(Exception):
    """Every attempt of the writer failed validation; `attempts` holds each reply and its errors."""

    attempts: list[dict[str, Any]]

    def __str__(self) -> str:
        last = self.attempts[-1]["errors"] if self.attempts else []
        return f"writer output invalid after {len(self.attempts)} attempts: {'; '.join(last)}"


def write_qa(
    writer: Writer, prompts: PromptSet, clips: Sequence[dict], duration: float, config: LongSFTConfig
) -> tuple[dict[str, Any], int]:
    """Ask the writer for the summary and QA; retry malformed replies with a repair hint.

    Returns (validated result, attempts used); raises WriterFailure after 1 + max_retries attempts.
    """
    messages = [
        {"role": "system", "content": prompts.system},
        {"role": "user", "content": prompts.render_write(clips, duration, config.num_questions)},
    ]
    attempts = []
    for attempt in range(1 + config.max_retries):
        reply = writer(messages)
        try:
            return parse_writer_output(reply, duration, config.min_questions), attempt + 1
        except WriterOutputError as exc:
            attempts.append({"reply": reply[:2000], "errors": exc.errors})
            log.info("writer attempt %d rejected: %s", attempt + 1, exc)
            messages = messages + [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": prompts.render_repair(exc.errors)},
            ]
    raise WriterFailure(attempts)


# --------------------------------------------------------------------------------------------------
# Videos, shards, cache


def list_videos(videos: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A folder (searched recursively, sorted), a .txt list (one path a line, relative to the list's
    folder; '#' comments), a single video, or a Python list of paths."""
    if not isinstance(videos, (str, os.PathLike)):
        return [Path(v) for v in videos]
    path = Path(videos)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [
            p if p.is_absolute() else path.parent / p
            for p in (Path(line) for line in lines if line and not line.startswith("#"))
        ]
    if path.exists():
        return [path]
    raise FileNotFoundError(f"--videos: no such folder, list or video: {path}")


def video_key(path: Path) -> str:
    """A file-name-safe id, stable for a path: its stem plus a short hash of the absolute path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def resolve_shard(shard: str | tuple[int, int] | None, environ=os.environ) -> tuple[int, int]:
    """(index, count) from `--shard i/n` and torchrun's RANK / WORLD_SIZE: shard i of n, split over
    the world, is shard i × world + rank of n × world."""
    if shard is None:
        index, count = 0, 1
    elif isinstance(shard, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not match:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}")
        index, count = int(match[1]), int(match[2])
    else:
        index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in 0..{count - 1}, got {index} of {count}")
    world = int(environ.get("WORLD_SIZE", 1))
    rank = int(environ.get("RANK", 0))
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return index * world + rank, count * world


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # absent or half-written by a killed run: redo


# --------------------------------------------------------------------------------------------------
# One video


@dataclass
class Builder:
    """Everything one long-SFT run needs; `process_video` does one video."""

    captioner: Captioner
    writer: Writer
    out: Path
    config: LongSFTConfig = field(default_factory=LongSFTConfig)
    prompts: PromptSet | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.prompts = self.prompts or PromptSet.load(self.config.prompts_dir)
        self.cache_dir = self.out / "cache"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.stage = "caption"  # what process_video is doing, for the error report
        c = self.config
        self.captioner_name = str(getattr(self.captioner, "name", type(self.captioner).__name__))
        self.writer_name = str(getattr(self.writer, "name", type(self.writer).__name__))
        self.caption_fp = _fingerprint(
            {
                "captioner": self.captioner_name,
                "clip_seconds": c.clip_seconds,
                "scene_cuts": c.scene_cuts,
                "frames_per_clip": c.frames_per_clip,
                "prompt": self.prompts.caption,
            }
        )
        self.write_fp = _fingerprint(
            {
                "writer": self.writer_name,
                "prompts": self.prompts.sha256,
                "num_questions": c.num_questions,
                "min_questions": c.min_questions,
            }
        )

    # ---- captions ------------------------------------------------------------------------------
    def caption_video(self, path: Path) -> tuple[list[dict], float, list[float]]:
        """Clips with captions [{start, end, caption}], the duration, and the scene cuts used."""
        info = probe_video(path)
        duration = video_duration(info)
        if duration <= 0:
            raise ValueError(f"{path}: the video stream has no frames")
        cuts = detect_scene_cuts(path, info=info) if self.config.scene_cuts else []
        clips = [{"start": s, "end": e} for s, e in plan_clips(duration, self.config.clip_seconds, cuts)]
        k = self.config.frames_per_clip
        batch_size = self.config.clips_per_batch
        batches = range(0, len(clips), batch_size)
        if self.config.progress and len(batches) > 1:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"caption {path.name}", leave=False, unit="batch")
        for first in batches:
            group = clips[first : first + batch_size]
            times = np.concatenate([clip_frame_times((c["start"], c["end"]), k) for c in group])
            frames = np.concatenate([f for f, _ in frames_at(path, times)])
            captions = self.captioner.caption(
                [frames[i * k : (i + 1) * k] for i in range(len(group))], self.prompts.caption
            )
            if len(captions) != len(group):
                raise RuntimeError(f"captioner returned {len(captions)} captions for {len(group)} clips")
            for clip, caption in zip(group, captions):
                clip["caption"] = str(caption).strip()
        return clips, duration, cuts

    # ---- the whole video -----------------------------------------------------------------------
    def process_video(self, path: Path, key: str) -> dict[str, Any]:
        """The cache entry of a finished video (computed now, or read back from a previous run).

        Raises on failure after caching whatever finished (captions survive a writer failure).
        """
        cache_path = self.cache_dir / f"{key}.json"
        entry = _read_json(cache_path)
        self.stage = "caption"
        if not (isinstance(entry, dict) and entry.get("caption_fp") == self.caption_fp):
            clips, duration, cuts = self.caption_video(path)
            entry = {
                "video": str(path),
                "caption_fp": self.caption_fp,
                "duration": duration,
                "scene_cuts": cuts,
                "clips": clips,
                "status": "captioned",
            }
            write_json_atomic(cache_path, entry, indent=1)
        if entry.get("status") == "done" and entry.get("write_fp") == self.write_fp:
            return entry
        self.stage = "write"
        try:
            result, attempts = write_qa(
                self.writer, self.prompts, entry["clips"], entry["duration"], self.config
            )
        except WriterFailure as exc:
            entry.update(status="writer_failed", write_fp=self.write_fp, attempts=exc.attempts)
            write_json_atomic(cache_path, entry, indent=1)
            raise
        entry.update(status="done", write_fp=self.write_fp, result=result, writer_attempts=attempts)
        entry.pop("attempts", None)
        write_json_atomic(cache_path, entry, indent=1)
        return entry

    # ---- manifest record -----------------------------------------------------------------------
    def record(self, entry: dict[str, Any], key: str, video_index: int) -> dict[str, Any]:
        """A manifest line: the summary turn (with `<video>`), then one turn per QA pair."""
        result = entry["result"]
        describe = self.prompts.describe[
            int(hashlib.sha1(key.encode()).hexdigest(), 16) % len(self.prompts.describe)
        ]
        turns = [("<video>\n" + describe, result["summary"])]
        turns += [(qa["question"], qa["answer"]) for qa in result["qa"]]
        conversations = []
        for question, answer in turns:
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        video = entry["video"]
        if self.config.media_root:
            video = os.path.relpath(os.path.abspath(video), os.path.abspath(self.config.media_root))
        else:
            video = os.path.abspath(video)
        return {
            "id": key,
            "video": video,
            "conversations": conversations,
            "duration": round(entry["duration"], 3),
            "provenance": {
                "video_index": video_index,
                "clips": entry["clips"],
                "scene_cuts": entry.get("scene_cuts", []),
                "qa": [{k: v for k, v in qa.items() if k in ("type", "time")} for qa in result["qa"]],
                "captioner": self.captioner_name,
                "writer": self.writer_name,
                "writer_attempts": entry.get("writer_attempts", 1),
                "prompts": {"source": self.prompts.source, "sha256": self.prompts.sha256},
                "clip_seconds": self.config.clip_seconds,
                "frames_per_clip": self.config.frames_per_clip,
            },
        }


# --------------------------------------------------------------------------------------------------
# A run


@dataclass
class RunReport:
    """What a run (one shard) did."""

    shard: tuple[int, int]
    videos: int = 0
    done: int = 0
    reused: int = 0
    failed: int = 0
    manifest: str | None = None
    errors: str | None = None
    merged: str | None = None
    seconds: float = 0.0


def _shard_paths(out: Path, shard: tuple[int, int]) -> tuple[Path, Path, Path]:
    index, count = shard
    if count == 1:
        return out / "manifest.jsonl", out / "errors.jsonl", out / "report.json"
    tag = f"{index:05d}-of-{count:05d}"
    folder = out / "shards"
    return folder / f"manifest-{tag}.jsonl", folder / f"errors-{tag}.jsonl", folder / f"report-{tag}.json"


def build_long_sft(
    videos: str | os.PathLike | Sequence[str | os.PathLike],
    captioner: Captioner,
    writer: Writer,
    out: str | os.PathLike,
    config: LongSFTConfig | None = None,
    shard: str | tuple[int, int] | None = None,
    environ=os.environ,
) -> RunReport:
    """Build (or resume) the long-SFT manifest of this shard; merge when every shard is done.

    Writes `manifest.jsonl` and `errors.jsonl` (one shard) or `shards/manifest-i-of-n.jsonl` and
    `shards/errors-i-of-n.jsonl`, merged into `manifest.jsonl` / `errors.jsonl` by the last shard to
    finish. A video that fails (undecodable, writer never valid, …) is listed in the errors with
    the stage and reason and the run goes on.
    """
    start = time.perf_counter()
    config = config or LongSFTConfig()
    out = Path(out)
    builder = Builder(captioner=captioner, writer=writer, out=out, config=config)
    all_videos = list_videos(videos)
    shard = resolve_shard(shard, environ)
    mine = list(range(shard[0], len(all_videos), shard[1]))
    report = RunReport(shard=shard, videos=len(mine))
    records, errors = [], []
    iterator = mine
    if config.progress:
        from tqdm import tqdm

        rank = shard[0] % int(environ.get("WORLD_SIZE", 1))
        iterator = tqdm(mine, desc=f"long-sft {shard[0]}/{shard[1]}", unit="video", position=rank)
    for video_index in iterator:
        path = all_videos[video_index]
        key = video_key(path)
        cached = _read_json(builder.cache_dir / f"{key}.json")
        was_done = isinstance(cached, dict) and cached.get("status") == "done"
        try:
            entry = builder.process_video(path, key)
        except Exception as exc:  # one bad video never ends the run
            stage = builder.stage
            if isinstance(exc, (MediaDecodeError, FileNotFoundError)):
                stage = "decode"
            error = {"id": key, "video": str(path), "video_index": video_index, "stage": stage}
            error["error"] = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, WriterFailure):
                error["attempts"] = exc.attempts
            errors.append(error)
            report.failed += 1
            log.warning("skipped %s: %s", path, error["error"])
            continue
        report.done += 1
        report.reused += int(was_done and entry.get("write_fp") == builder.write_fp)
        records.append(builder.record(entry, key, video_index))
    manifest_path, errors_path, done_path = _shard_paths(out, shard)
    write_jsonl_atomic(manifest_path, records)
    write_jsonl_atomic(errors_path, errors)
    done_path.write_text(json.dumps(asdict(report)) + "\n")
    report.manifest, report.errors = str(manifest_path), str(errors_path)
    if shard[1] > 1:
        report.merged = str(merge_shards(out, shard[1])) if _all_done(out, shard[1]) else None
    report.seconds = time.perf_counter() - start
    return report


def _all_done(out: Path, count: int) -> bool:
    return all(_shard_paths(out, (i, count))[2].exists() for i in range(count))


def merge_shards(out: str | os.PathLike, count: int) -> Path:
    """Concatenate the shard manifests (and error reports) of `count` shards in video order."""
    out = Path(out)
    missing = [i for i in range(count) if not _shard_paths(out, (i, count))[0].exists()]
    if missing:
        raise FileNotFoundError(f"{out}: shards {missing} of {count} have no manifest yet")
    for kind, slot in (("manifest", 0), ("errors", 1)):
        rows = []
        for i in range(count):
            with open(_shard_paths(out, (i, count))[slot], encoding="utf-8") as handle:
                rows += [json.loads(line) for line in handle if line.strip()]
        order = (
            (lambda r: r["provenance"]["video_index"]) if kind == "manifest" else (lambda r: r["video_index"])
        )
        write_jsonl_atomic(out / f"{kind}.jsonl", sorted(rows, key=order))
    return out / "manifest.jsonl"
