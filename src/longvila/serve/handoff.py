"""Handing the LLM to an existing engine (vLLM), as Long-RL does: the engine runs the language model,
longvila computes the prompt embeddings (vision tower + projector spliced into the text embeddings).

- `export_llm(model, processor, out_dir)` writes the LLM alone as a plain Hugging Face checkpoint
  (`Qwen2ForCausalLM`: config.json, safetensors, tokenizer), which vLLM and SGLang load as is.
- `prompt_embeds(model, processor, messages)` returns the (T, D) embeddings of a chat prompt, the tensor
  vLLM takes as `{"prompt_embeds": ...}` (offline `LLM.generate`, or `/v1/completions` with
  `--enable-prompt-embeds`, base64 of `torch.save` as `encode_prompt_embeds` writes it).

The engine itself needs a GPU; docs/serving.md gives the commands.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from longvila.serve.engine import stop_token_ids


def export_llm(model, processor, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `model.llm` and the tokenizer to `out_dir` as a standalone HF causal-LM checkpoint.

    The attention implementation is reset to the library default (the checkpoint must not name
    longvila's), and the write goes to a temporary folder renamed into place, so a failed export
    leaves nothing half-written. Refuses an existing non-empty `out_dir`.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        llm = model.llm
        config = llm.config
        saved = config._attn_implementation
        config._attn_implementation = "sdpa"  # the engine's own kernels, not longvila's registry entry
        try:
            llm.save_pretrained(tmp, safe_serialization=True)
        finally:
            config._attn_implementation = saved
        processor.tokenizer.save_pretrained(tmp)
        _write_generation_settings(
            tmp, sorted(stop_token_ids(model, processor)), processor.pad_token_id, dtype
        )
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_generation_settings(
    folder: Path, stop_ids: list[int], pad_id: int, dtype: torch.dtype | None
) -> None:
    """End-of-sequence ids (so the engine stops at `<|im_end|>` as we do), the pad id, and the dtype."""
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        settings = json.loads(path.read_text()) if path.exists() else {}
        settings["eos_token_id"] = stop_ids
        settings["pad_token_id"] = pad_id
        if dtype is not None and name == "config.json":
            settings["dtype"] = str(dtype).removeprefix("torch.")
        path.write_text(json.dumps(settings, indent=2) + "\n")


@torch.no_grad()
def prompt_embeds(
    model,
    processor,
    messages: list[dict[str, Any]],
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> torch.Tensor:
    """(T, D) embeddings of `messages` (processor parts) ending with the assistant's generation prompt:
    the text embeddings with each frame's tokens from the vision tower + projector at its `<image>`
    positions. Exactly what our LLM's decoder sees, so an engine fed these continues as we would."""
    sample = processor(messages, num_frames=num_frames, fps=fps, max_frames=max_frames)
    ids = sample["input_ids"][None].to(model.device)
    return model.embed(ids, sample["pixel_values"].to(model.device))[0]


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """Base64 of `torch.save(embeds)`: the `prompt_embeds` field of vLLM's /v1/completions."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu(), buffer)
    return base64.b64encode(buffer.getvalue()).decode()
