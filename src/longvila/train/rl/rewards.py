"""Verifiable rewards: a rule checks each sampled reply (no reward model).

- format: 1 when the reply is exactly `<think>...</think><answer>...</answer>` (whitespace around the
  parts allowed), else 0;
- accuracy, `exact`: 1 when the text inside `<answer>` equals the reference (case and surrounding
  whitespace ignored; inner runs of whitespace count as one space);
- accuracy, `choice`: 1 when the first option letter inside `<answer>` ("B", "(B)", "B) red", "b.") is the
  reference letter.

A reply without an `<answer>` part scores 0 accuracy. The reward of a reply is
`(1 - format_weight) * accuracy + format_weight * format` (docs/rl.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANSWER_KINDS = ("exact", "choice")
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LETTER = re.compile(r"^\s*\(?\s*([A-Za-z])\s*(?:[).:]|\s|$)")


@dataclass(frozen=True)
class Reward:
    """One reply's score: the total and its two parts (each 0 or 1)."""

    total: float
    accuracy: float
    format: float


def format_reward(text: str) -> float:
    return 1.0 if _FORMAT.match(text) else 0.0


def extract_answer(text: str) -> str | None:
    """The text inside the first `<answer>...</answer>`, or None."""
    match = _ANSWER.search(text)
    return match.group(1) if match else None


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_reward(text: str, reference: str) -> float:
    answer = extract_answer(text)
    return 1.0 if answer is not None and _normalise(answer) == _normalise(reference) else 0.0


def choice_reward(text: str, reference: str) -> float:
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    match = _LETTER.match(answer)
    return 1.0 if match and match.group(1).upper() == reference.strip().upper() else 0.0


def score(text: str, reference: str, kind: str, format_weight: float) -> Reward:
    """The reward of reply `text` to a question whose answer is `reference`, checked as `kind`."""
    if kind not in ANSWER_KINDS:
        raise ValueError(f"answer kind {kind!r} is not one of {list(ANSWER_KINDS)}")
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    accuracy = exact_reward(text, reference) if kind == "exact" else choice_reward(text, reference)
    fmt = format_reward(text)
    return Reward((1.0 - format_weight) * accuracy + format_weight * fmt, accuracy, fmt)
