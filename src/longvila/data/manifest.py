"""JSONL manifests in the LLaVA/VILA layout, turned into chat messages and tokenised samples.

A line:
    {"id": "clip-1", "video": "clips/a.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]}
`"image"` (a path or a list) instead of `"video"`; neither for text-only samples. `<video>` and `<image>`
mark where each medium goes in the text, in order; a record with media but no placeholders gets
them in front of its first human turn (the LLaVA convention). Relative paths resolve against the
media root (default: the manifest's folder).

Bad data under `on_error="skip"`: `ManifestDataset.__getitem__` returns a `Skipped` marker naming
`file:line` and the reason instead of a sample. Wrap the collate function with an `ErrorCounter`
so the markers travel from DataLoader workers to the main process, which counts them:

    counter = ErrorCounter()
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=counter.collate(proc.collate))
    for batch in counter.epoch(loader):   # plain batches; skips counted, warned about at the end
        ...
    counter.last_epoch_skipped
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.utils.data

from longvila.data.errors import ManifestError
from longvila.data.image import load_image
from longvila.data.video import decode_frames

log = logging.getLogger(__name__)

PLACEHOLDERS = {"video": "<video>", "image": "<image>"}
_PLACEHOLDER_RE = re.compile("(<video>|<image>)")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ON_ERROR = ("skip", "raise")


@dataclass(frozen=True)
class ManifestRecord:
    """One manifest line: its parsed object, or why it did not parse."""

    source: str
    line: int
    data: dict | None = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_manifest(path: str | os.PathLike, on_error: str = "raise") -> Iterator[ManifestRecord]:
    """Yield the records of a JSONL manifest, skipping blank lines.

    A line that is not a JSON object with a `conversations` list raises ManifestError naming
    `file:line` (on_error="raise"), is logged and dropped ("skip"), or is yielded with `.error`
    set and `.data` None ("keep", used by ManifestDataset so a bad line keeps its index).
    """
    if on_error not in ("raise", "skip", "keep"):
        raise ValueError(f"on_error must be 'raise', 'skip' or 'keep', got {on_error!r}")
    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(f"manifest not found: {source}")
    with open(source, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
                _check_record(data)
            except (json.JSONDecodeError, ValueError) as exc:
                record = ManifestRecord(source, number, error=str(exc))
                if on_error == "raise":
                    raise ManifestError(f"{record.where}: {exc}") from exc
                if on_error == "skip":
                    log.warning("%s: skipped: %s", record.where, exc)
                    continue
                yield record
                continue
            yield ManifestRecord(source, number, data)


def _check_record(data: Any) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"a record must be a JSON object, got {type(data).__name__}")
    turns = data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}] must be an object with a string 'value'")
        if turn.get("from") not in ROLES:
            raise ValueError(
                f"conversations[{i}]: 'from' must be one of {sorted(ROLES)}, got {turn.get('from')!r}"
            )
    for kind in PLACEHOLDERS:
        paths = data.get(kind)
        if paths is None:
            continue
        items = [paths] if isinstance(paths, str) else paths
        if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
            raise ValueError(f"'{kind}' must be a path or a list of paths")


def _media_paths(data: dict, kind: str, media_root: str | None) -> list[str]:
    paths = data.get(kind)
    if paths is None:
        return []
    paths = [paths] if isinstance(paths, str) else list(paths)
    if media_root is None:
        return paths
    return [p if os.path.isabs(p) else os.path.join(media_root, p) for p in paths]


def record_to_messages(
    record: dict | ManifestRecord,
    media_root: str | os.PathLike | None = None,
    *,
    load_video: Callable[[str], Any] | None = None,
    load_image: Callable[[str], Any] | None = None,
) -> list[dict]:
    """Convert a manifest record to typed-content chat messages (docs/architecture.md, "Data formats").

    Each `<video>`/`<image>` placeholder becomes a `{"type": "video", "video": …}` part at its place
    in the turn; the text around it becomes `{"type": "text", "text": …}` parts (stripped of the
    surrounding whitespace, empty ones dropped). A part holds the resolved path, or what
    `load_video(path)` / `load_image(path)` returns when given. Raises ManifestError (naming
    `file:line` for a ManifestRecord) when placeholders and media do not match or loading fails.
    """
    where = record.where if isinstance(record, ManifestRecord) else str(record.get("id", "record"))
    data = record.data if isinstance(record, ManifestRecord) else record
    if data is None:
        raise ManifestError(f"{where}: {record.error}")
    try:
        _check_record(data)
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from exc
    root = None if media_root is None else os.fspath(media_root)
    media = {kind: _media_paths(data, kind, root) for kind in PLACEHOLDERS}
    turns = [(ROLES[t["from"]], t["value"]) for t in data["conversations"]]
    turns = _add_missing_placeholders(turns, media, where)
    loaders = {"video": load_video, "image": load_image}
    used = {kind: 0 for kind in PLACEHOLDERS}
    messages = []
    for role, text in turns:
        content = []
        for piece in _PLACEHOLDER_RE.split(text):
            kind = {"<video>": "video", "<image>": "image"}.get(piece)
            if kind is None:
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
                continue
            if role != "user":
                raise ManifestError(
                    f"{where}: {piece} placeholder in a turn of the {role}; only user turns hold media"
                )
            path = media[kind][used[kind]]
            used[kind] += 1
            content.append({"type": kind, kind: _load(loaders[kind], path, where)})
        messages.append({"role": role, "content": content})
    return messages


def _add_missing_placeholders(turns: list, media: dict, where: str) -> list:
    counts = {kind: sum(text.count(tag) for _, text in turns) for kind, tag in PLACEHOLDERS.items()}
    prefix = ""
    for kind, tag in PLACEHOLDERS.items():
        have, need = counts[kind], len(media[kind])
        if have == 0 and need:
            prefix += f"{tag}\n" * need
        elif have != need:
            raise ManifestError(f"{where}: {have} {tag} placeholders but {need} {kind} path(s)")
    if prefix:
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise ManifestError(f"{where}: media given but no human turn to put it in")
        role, text = turns[first_user]
        turns = [*turns[:first_user], (role, prefix + text), *turns[first_user + 1 :]]
    return turns


def _load(loader: Callable[[str], Any] | None, path: str, where: str) -> Any:
    if loader is None:
        return path
    try:
        return loader(path)
    except (OSError, ValueError) as exc:  # FileNotFoundError, MediaDecodeError, …
        raise ManifestError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Dataset and error accounting


@dataclass(frozen=True)
class Skipped:
    """Returned by ManifestDataset in place of a sample that could not be built."""

    where: str
    reason: str

    def __bool__(self) -> bool:
        return False


def skip_none(samples: Sequence[Any]) -> list[Any]:
    """Drop skipped samples (None or Skipped) from a list, e.g. before collating."""
    return [s for s in samples if s is not None and not isinstance(s, Skipped)]


class ManifestDataset(torch.utils.data.Dataset):
    """A manifest as a map-style dataset; media are decoded lazily, per item (safe in workers).

    `processor(messages, num_frames=…)` turns the messages into one sample (a dict). Videos are
    decoded here (uniform `num_frames`, or `fps` capped by `max_frames`) so a bad file is reported
    with its manifest `file:line`; the processor gets uint8 arrays (T, H, W, 3) and `num_frames`
    = the frames decoded for the first video (or `num_frames` when there is none).
    Under on_error="skip" a bad line or medium gives a `Skipped` marker (see ErrorCounter);
    under "raise" a ManifestError naming `file:line` (at construction for lines that do not parse).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        processor: Callable[..., Any],
        media_root: str | os.PathLike | None = None,
        num_frames: int | None = 8,
        fps: float | None = None,
        max_frames: int | None = None,
        on_error: str = "skip",
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.path = os.fspath(path)
        self.processor = processor
        self.media_root = os.fspath(media_root) if media_root is not None else os.path.dirname(self.path)
        self.num_frames = None if fps is not None else num_frames
        self.fps = fps
        self.max_frames = max_frames
        self.on_error = on_error
        self.records = list(read_manifest(self.path, on_error="keep" if on_error == "skip" else "raise"))
        self.num_skipped = 0  # in this process only; use ErrorCounter with DataLoader workers

    def __len__(self) -> int:
        return len(self.records)

    def _load_video(self, path: str) -> np.ndarray:
        frames, _ = decode_frames(path, num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames)
        return frames

    def messages(self, index: int) -> list[dict]:
        """The decoded chat messages of item `index` (raises ManifestError on bad data)."""
        return record_to_messages(
            self.records[index], self.media_root, load_video=self._load_video, load_image=load_image
        )

    def __getitem__(self, index: int) -> Any:
        record = self.records[index]
        try:
            messages = self.messages(index)
            videos = [p["video"] for m in messages for p in m["content"] if p["type"] == "video"]
            num_frames = len(videos[0]) if videos else self.num_frames
            try:
                return self.processor(messages, num_frames=num_frames)
            except ValueError as exc:  # e.g. more placeholders than media, sample too long
                raise ManifestError(f"{record.where}: {exc}") from exc
        except ManifestError as exc:
            if self.on_error == "raise":
                raise
            self.num_skipped += 1
            log.warning("skipped %s", exc)
            reason = str(exc).removeprefix(f"{record.where}: ")
            return Skipped(record.where, reason)


@dataclass
class CountedBatch:
    """What `ErrorCounter.collate` returns: the batch (None if every sample was skipped) and skips."""

    batch: Any
    num_samples: int
    skipped: list[Skipped]


class SkipCollate:
    """Collate wrapper (picklable, runs in the workers): drops Skipped markers, keeps them aside."""

    def __init__(self, inner: Callable[[list], Any] | None = None):
        self.inner = inner

    def __call__(self, samples: list) -> CountedBatch:
        kept = skip_none(samples)
        skipped = [s for s in samples if isinstance(s, Skipped)]
        skipped += [Skipped("?", "the dataset returned None") for s in samples if s is None]
        batch = (self.inner(kept) if self.inner else kept) if kept else None
        return CountedBatch(batch, len(samples), skipped)


class ErrorCounter:
    """Counts skipped samples in the main process, whatever the number of DataLoader workers."""

    def __init__(self, max_examples: int = 5):
        self.max_examples = max_examples
        self.last_epoch_skipped = 0
        self.last_epoch_samples = 0
        self.total_skipped = 0
        self.examples: list[Skipped] = []

    def collate(self, inner: Callable[[list], Any] | None = None) -> SkipCollate:
        """A collate_fn for DataLoader that wraps `inner` (default: return the list of samples)."""
        return SkipCollate(inner)

    def epoch(self, loader) -> Iterator[Any]:
        """Iterate one epoch of `loader`, yielding plain batches and counting skips."""
        skipped = samples = 0
        examples: list[Skipped] = []
        for item in loader:
            if not isinstance(item, CountedBatch):
                raise TypeError(
                    "ErrorCounter.epoch needs a DataLoader built with collate_fn=counter.collate(...)"
                )
            samples += item.num_samples
            skipped += len(item.skipped)
            examples.extend(item.skipped[: self.max_examples - len(examples)])
            if item.batch is not None:
                yield item.batch
        self.last_epoch_skipped, self.last_epoch_samples = skipped, samples
        self.total_skipped += skipped
        self.examples = examples
        if skipped:
            shown = "; ".join(f"{s.where}: {s.reason}" for s in examples)
            log.warning("skipped %d of %d samples this epoch (e.g. %s)", skipped, samples, shown)
