"""Hooks of the longvila_tiny_videoqa task: Video-MME's prompt and letter extraction from longvila."""

import os
from pathlib import Path

from longvila.eval.letters import build_prompt, extract_letter

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    root = Path(os.environ.get("LONGVILA_LMMS_MEDIA", HERE))
    return [str(root / doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return build_prompt(doc["question"], doc["options"])


def process_results(doc, results):
    letter = extract_letter(results[0], doc["options"])
    return {"accuracy": float(letter == doc["answer"])}
