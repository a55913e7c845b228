"""Multiple-choice prompts and answer-letter extraction, as Video-MME evaluations do them.

The prompt is the question, the options one per line ("A. ..."), then
"Answer with the option's letter from the given choices directly."

A reply is matched against ranked patterns; the first rank that yields exactly one valid letter wins:
  1. an explicit answer phrase: "Answer: B", "The answer is (B)", "best answer is B"
  2. a bracketed letter: "(B)", "[B]"
  3. a letter opening the reply: "B", "B.", "B)", "B:", "B -"
  4. the option's text: the reply contains exactly one option's text
  5. a lone capital letter standing as a word anywhere in the reply
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
_LABELLED = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.*)$", re.S)


def option_letters(count: int) -> str:
    if not 1 <= count <= 26:
        raise ValueError(f"a multiple-choice question needs 1 to 26 options, got {count}")
    return string.ascii_uppercase[:count]


def split_option(option: str, letter: str) -> str:
    """The text of an option given as "A. text" (Video-MME's form) or as bare "text"."""
    match = _LABELLED.match(option)
    if match and match.group(1) == letter:
        return match.group(2).strip()
    return option.strip()


def format_options(options: Sequence[str]) -> list[str]:
    """Options as "A. text" lines, whether they came labelled or bare."""
    letters = option_letters(len(options))
    return [f"{letter}. {split_option(str(option), letter)}" for letter, option in zip(letters, options)]


def build_prompt(question: str, options: Sequence[str]) -> str:
    """Video-MME's prompt: the question, the options one per line, the answer instruction."""
    return "\n".join([question.strip(), *format_options(options), PROMPT_SUFFIX])


def _unique(found: list[str]) -> str | None:
    distinct = set(found)
    return found[0] if len(distinct) == 1 else None


def _is_article(text: str, end: int) -> bool:
    """'A' followed by a lower-case word reads as the article ("A dog runs"), not option A."""
    return re.match(r"\s+(?!(?:or|and)\b)[a-z]", text[end:]) is not None


def _letters_at(pattern: str, text: str, letters: str) -> list[str]:
    found = []
    for match in re.finditer(pattern, text):
        letter = match.group(1).upper()
        if letter in letters and not (letter == "A" and _is_article(text, match.end(1))):
            found.append(letter)
    return found


def extract_letter(response: str, options: Sequence[str]) -> str | None:
    """The option letter a reply chose, or None when it names none (or several) unambiguously."""
    letters = option_letters(len(options))
    valid = f"[{letters}]"
    text = response.strip()
    if not text:
        return None
    phrase = rf"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*[\(\[]?({valid})(?![\w'])"
    # "the answer is d." — a lower-case letter only when it ends the reply (else "answer is a dog").
    lower = rf"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*[\(\[]?({valid.lower()})[\)\]]?[.!]?\s*$"
    for pattern in (phrase, lower, rf"[\(\[]({valid})[\)\]]"):
        choice = _unique(_letters_at(pattern, text, letters))
        if choice:
            return choice
    opening = _letters_at(rf"^({valid})(?:\s*$|\s*[.):,]|\s+-|\s)", text, letters)
    if opening:
        return opening[0]
    lowered = text.lower()
    texts = [split_option(str(option), letter).lower() for letter, option in zip(letters, options)]
    matches = [letter for letter, body in zip(letters, texts) if body and body in lowered]
    if len(matches) > 1:
        # "red" inside "dark red": keep the longest option text when it contains all the others.
        longest = max(matches, key=lambda letter: len(texts[letters.index(letter)]))
        body = texts[letters.index(longest)]
        if all(texts[letters.index(m)] in body for m in matches):
            matches = [longest]
    if len(matches) == 1:
        return matches[0]
    return _unique(_letters_at(rf"(?<![\w'])({valid})(?![\w'])", text, letters))
