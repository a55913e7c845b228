"""The parts of long-video SFT data building that run models: a longvila checkpoint captions the clips
(`LongVILACaptioner`) and a local Hugging Face causal LM writes the summary and QA (`HFWriter`).

`longvila.data.long_sft.Builder` takes any captioner and writer with these interfaces (its `Captioner`
protocol and `Writer` callable); this module sits above `model/` so that the data layer runs no model.
"""

from __future__ import annotations

import os

import numpy as np


def _device():
    """This process's device: its torchrun rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    from longvila.devices import resolve_device

    return resolve_device("auto", local_rank=int(os.environ.get("LOCAL_RANK", 0)))


class LongVILACaptioner:
    """Captions clips with a longvila checkpoint; a batch of clips is one packed `generate` call."""

    def __init__(self, path: str | os.PathLike, frames_per_clip: int = 8, max_new_tokens: int = 96):
        import torch

        from longvila.model.vlm import LongVILA
        from longvila.processor import LongVILAProcessor

        device = _device()
        dtype = torch.bfloat16 if device.type == "cuda" else None
        self.model = LongVILA.from_pretrained(path, dtype=dtype).to(device).eval()
        self.processor = LongVILAProcessor.from_pretrained(path)
        self.frames_per_clip = frames_per_clip
        self.max_new_tokens = max_new_tokens
        self.name = os.path.basename(os.path.normpath(os.fspath(path)))

    def caption(self, clips: list[np.ndarray], prompt: str) -> list[str]:
        samples = []
        for frames in clips:
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": frames}, {"type": "text", "text": prompt}],
                }
            ]
            samples.append(self.processor(messages, num_frames=self.frames_per_clip))
        batch = self.processor.collate(samples)
        new_ids = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [self.processor.decode(row).strip() for row in new_ids]


class HFWriter:
    """A local Hugging Face causal LM as the writer (its chat template when it has one; greedy)."""

    def __init__(self, path: str | os.PathLike, max_new_tokens: int = 1024):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = _device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
        self.model = AutoModelForCausalLM.from_pretrained(os.fspath(path), dtype=dtype).to(device).eval()
        self.max_new_tokens = max_new_tokens
        self.name = os.path.basename(os.path.normpath(os.fspath(path)))

    def format(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # No chat template (a base model): a plain transcript ending where the assistant speaks.
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def __call__(self, messages: list[dict[str, str]]) -> str:
        import torch

        encoded = self.tokenizer(self.format(messages), return_tensors="pt", add_special_tokens=False)
        encoded = {k: v.to(self.model.device) for k, v in encoded.items()}
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **encoded, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
            )
        return self.tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# Validating the writer's JSON
