"""Tokenizers: the Qwen2 chat layout, the media placeholder token, and the tiny embedded tokenizer.

The tiny tokenizer is a byte-level BPE (any text encodes) trained by `scripts/build_tiny_tokenizer.py`
on the vocabulary of the synthetic tasks, and shipped as `assets/tiny_tokenizer/tokenizer.json`;
nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

IMAGE_TOKEN = "<image>"
"""Placeholder token, one per frame in the text, expanded to `tokens_per_frame` ids by the processor."""
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, IMAGE_TOKEN]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def tiny_tokenizer_dir() -> Path:
    return Path(str(resources.files("longvila") / "assets" / "tiny_tokenizer"))


@functools.cache
def tiny_tokenizer_vocab_size() -> int:
    data = json.loads((tiny_tokenizer_dir() / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    added = [t["id"] for t in data.get("added_tokens", [])]
    return max([*vocab.values(), *added]) + 1


def tiny_tokenizer_token_id(token: str) -> int:
    data = json.loads((tiny_tokenizer_dir() / "tokenizer.json").read_text())
    for added in data.get("added_tokens", []):
        if added["content"] == token:
            return int(added["id"])
    return int(data["model"]["vocab"][token])


def load_tokenizer(path: str | Path):
    """A Hugging Face fast tokenizer from a directory, with `<image>` present as a special token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer_config.json")
    if _is_longvila_dir(path) and (path / "tokenizer.json").exists():
        # AutoTokenizer would try to read our config.json as a Hugging Face model config.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    missing = [t for t in (IM_START, IM_END, IMAGE_TOKEN) if t not in tokenizer.get_vocab()]
    if IMAGE_TOKEN in missing:
        # Official VILA checkpoints add <image>; plain Qwen2 tokenizers don't. Its embedding row is never
        # read (frame embeddings replace it), so an id inside Qwen2's padded vocabulary is enough.
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        missing.remove(IMAGE_TOKEN)
    if missing:
        raise ValueError(
            f"{path}: tokenizer lacks the chat tokens {missing} (a Qwen2-style tokenizer is needed)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TEXT if END_OF_TEXT in tokenizer.get_vocab() else IM_END
    return tokenizer


def _is_longvila_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.exists():
        return path == tiny_tokenizer_dir()
    try:
        return json.loads(config.read_text()).get("model_type") == "longvila"
    except (json.JSONDecodeError, AttributeError):
        return False


def load_tiny_tokenizer():
    return load_tokenizer(tiny_tokenizer_dir())
