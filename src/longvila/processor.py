"""LongVILAProcessor: chat messages with videos and images -> token ids, labels and normalised frames.

Layout of one sample (Qwen2 chat template; each frame is `tokens_per_frame` `<image>` ids then "\\n"):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>…<image>\\n … <image>…<image>\\nWhat happens?<|im_end|>\\n
    <|im_start|>assistant\\nA dog runs.<|im_end|>\\n

Labels are the token ids on assistant replies (and their `<|im_end|>`), -100 elsewhere.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longvila.config import IMAGE_TOKEN, LongVILAConfig
from longvila.data.sampling import sample_frame_array, uniform_indices  # noqa: F401 (re-export)
from longvila.model.loss import IGNORE_INDEX
from longvila.text.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    IM_START,
    load_tokenizer,
    tiny_tokenizer_dir,
)

PROCESSOR_CONFIG = "processor_config.json"
PLACEHOLDER = re.compile(r"(<video>|<image>)")
ROLES = ("system", "user", "assistant")


def check_frames(frames: Any, what: str = "video") -> np.ndarray:
    """Validate a uint8 (T, H, W, 3) frame array (or (H, W, 3) for one image)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{what}: expected a path or a uint8 numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{what}: frames must be uint8 RGB, got dtype {frames.dtype}")
    if frames.ndim == 3 and what == "image":
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what}: frames must have shape (T, H, W, 3), got {frames.shape}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"{what}: empty frame array of shape {frames.shape}")
    return frames


class LongVILAProcessor:
    """Tokeniser + frame preprocessing + packing, matched to one model config."""

    def __init__(
        self,
        tokenizer,
        *,
        tokens_per_frame: int,
        image_size: int,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        num_frames: int = 8,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        self.tokenizer = tokenizer
        self.tokens_per_frame = int(tokens_per_frame)
        self.image_size = int(image_size)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.num_frames = int(num_frames)
        self.system_prompt = system_prompt
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.im_start_id = tokenizer.convert_tokens_to_ids(IM_START)
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
        self.newline_ids = self._encode("\n")
        self.pad_token_id = tokenizer.pad_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a reply: `<|im_end|>`, the tokenizer's EOS and its padding token
        (`<|endoftext|>` in Qwen2). The one stop set: `generate` callers, streamers and `decode` use it."""
        ids = {self.im_end_id, self.tokenizer.eos_token_id, self.pad_token_id}
        return sorted(int(i) for i in ids if i is not None)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: LongVILAConfig, tokenizer, **kwargs) -> LongVILAProcessor:
        return cls(
            tokenizer,
            tokens_per_frame=config.tokens_per_frame,
            image_size=config.image_size,
            image_mean=config.image_mean,
            image_std=config.image_std,
            **kwargs,
        )

    @classmethod
    def tiny(cls, **kwargs) -> LongVILAProcessor:
        """The processor of `LongVILAConfig.tiny()`, with the embedded tokenizer."""
        return cls.from_config(LongVILAConfig.tiny(), load_tokenizer(tiny_tokenizer_dir()), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LongVILAProcessor:
        """From a longvila checkpoint directory, the official layout (llm/ + vision_tower/) or the
        NVILA -hf layout."""
        path = Path(path)
        if (path / PROCESSOR_CONFIG).exists():
            settings = json.loads((path / PROCESSOR_CONFIG).read_text())
            return cls(load_tokenizer(path), **settings)
        from longvila.model.checkpoint import CheckpointError, detect_layout, processor_settings

        try:
            detect_layout(path)
        except (FileNotFoundError, CheckpointError) as exc:
            raise ValueError(
                f"{path}: not a longvila checkpoint (no {PROCESSOR_CONFIG}) nor a known foreign layout ({exc})"
            ) from exc
        tokenizer_dir, settings = processor_settings(path)  # the official and NVILA -hf layouts
        return cls(load_tokenizer(tokenizer_dir), **settings)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        settings = {
            "tokens_per_frame": self.tokens_per_frame,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "num_frames": self.num_frames,
            "system_prompt": self.system_prompt,
        }
        (path / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")

    # ---- text ----------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids -> text, cut at the first end-of-turn token."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        stops = set(self.stop_token_ids)
        for i, token in enumerate(ids):
            if token in stops:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- frames --------------------------------------------------------------------------------
    def preprocess_frames(self, frames_THWC: np.ndarray) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float32 (T, 3, S, S), equal to Hugging Face's PIL SigLIP image processor:
        PIL bicubic resize to the tower's square size, then (x / 255 - mean) / std."""
        return preprocess_frames(frames_THWC, self.image_size, self.image_mean, self.image_std)

    def _load_video(
        self,
        item: Any,
        num_frames: int | None,
        fps: float | None,
        max_frames: int | None,
        frames_sampled: bool = False,
    ):
        if frames_sampled and not isinstance(item, (str, Path)):
            return check_frames(item, "video")
        if isinstance(item, (str, Path)):
            from longvila.data.video import decode_frames

            frames, _ = decode_frames(
                item, num_frames=None if fps else num_frames, fps=fps, max_frames=max_frames
            )
            return check_frames(frames, f"video {item}")
        frames = check_frames(item, "video")
        return sample_frame_array(frames, None if fps else num_frames, max_frames)

    @staticmethod
    def _load_image(item: Any) -> np.ndarray:
        if isinstance(item, (str, Path)):
            from longvila.data.image import load_image

            try:
                return check_frames(np.array(load_image(item)), "image")
            except ValueError as exc:
                raise ValueError(f"image {item}: {exc}") from exc
        if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
            return check_frames(np.array(item.convert("RGB")), "image")
        return check_frames(item, "image")

    # ---- one sample ----------------------------------------------------------------------------
    def __call__(
        self,
        messages: list[dict[str, Any]],
        *,
        videos: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        add_generation_prompt: bool | None = None,
        frames_sampled: bool = False,
    ) -> dict[str, Any]:
        """Tokenise one conversation with its media.

        Media come as typed content parts (`{"type": "video", "video": path | uint8 (T, H, W, 3)}`,
        `{"type": "image", "image": ...}`) or as `<video>` / `<image>` placeholders in the text, filled
        from `videos` / `images` in order. Returns `input_ids`, `labels` (T,), `pixel_values`
        (F, 3, S, S) and `num_frames` (frames per media item).

        Video arrays are sampled like paths (`num_frames`, or `fps` capped by `max_frames`) unless
        `frames_sampled=True`: then every array is taken as it is, its frames already chosen (a chat
        history, a server request's decoded media); paths are still decoded and sampled.
        """
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        num_frames = num_frames or self.num_frames
        queues = {"video": list(videos or []), "image": list(images or [])}
        counts = {"video": 0, "image": 0}
        given = {k: len(v) for k, v in queues.items()}
        ids: list[int] = []
        labels: list[int] = []
        frames: list[np.ndarray] = []
        media_frames: list[int] = []

        def add(tokens: list[int], supervised: bool) -> None:
            ids.extend(tokens)
            labels.extend(tokens if supervised else [IGNORE_INDEX] * len(tokens))

        def add_media(kind: str, item: Any, role: str) -> None:
            if role != "user" and role != "system":
                raise ValueError(f"a {kind} in a {role} turn: media may only stand in user turns")
            clip = (
                self._load_video(item, num_frames, fps, max_frames, frames_sampled)
                if kind == "video"
                else self._load_image(item)
            )
            frames.append(clip)
            media_frames.append(clip.shape[0])
            per_frame = [self.image_token_id] * self.tokens_per_frame + self.newline_ids
            add(per_frame * clip.shape[0], False)

        def add_text(text: str, role: str, supervised: bool) -> None:
            after_media = False
            for piece in PLACEHOLDER.split(text):
                if after_media and piece.startswith("\n"):
                    # "<video>\nQuestion": each frame already ends with "\n"; keep the typed-part layout.
                    piece = piece[1:]
                after_media = piece in ("<video>", "<image>")
                if piece in ("<video>", "<image>"):
                    kind = piece[1:-1]
                    counts[kind] += 1
                    if not queues[kind]:
                        raise ValueError(
                            f"more <{kind}> placeholders ({counts[kind]}) than {kind}s given ({given[kind]})"
                        )
                    add_media(kind, queues[kind].pop(0), role)
                elif piece:
                    add(self._encode(piece), supervised)

        system = self.system_prompt
        if messages[0].get("role") == "system":
            system = _text_of(messages[0], 0)
            messages = messages[1:]
        if system is not None:
            add(
                [self.im_start_id] + self._encode(f"system\n{system}") + [self.im_end_id] + self.newline_ids,
                False,
            )
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("user", "assistant"):
                raise ValueError(f"message {index}: role must be 'user' or 'assistant', got {role!r}")
            supervised = role == "assistant"
            add([self.im_start_id] + self._encode(f"{role}\n"), False)
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"message {index}: content must be a string or a list of parts")
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    add_text(part["text"], role, supervised)
                elif kind in ("video", "image"):
                    if kind not in part:
                        raise ValueError(f"message {index}: a {kind} part needs a {kind!r} field")
                    add_media(kind, part[kind], role)
                else:
                    raise ValueError(f"message {index}: unknown content part type {kind!r}")
            add([self.im_end_id], supervised)
            add(self.newline_ids, False)
        for kind, queue in queues.items():
            if queue:
                raise ValueError(
                    f"{given[kind]} {kind}s given but only {counts[kind]} <{kind}> placeholders in the text"
                )
        if add_generation_prompt is None:
            add_generation_prompt = messages[-1].get("role") == "user"
        if add_generation_prompt:
            add([self.im_start_id] + self._encode("assistant\n"), False)
        if frames:
            pixel_values = torch.cat([self.preprocess_frames(clip) for clip in frames])
        else:
            pixel_values = torch.zeros(0, 3, self.image_size, self.image_size)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "num_frames": media_frames,
        }

    # ---- batches -------------------------------------------------------------------------------
    def collate(
        self, samples: Sequence[dict[str, Any]], *, pad_to_multiple_of: int = 1
    ) -> dict[str, torch.Tensor]:
        """Pack samples into one row: position ids restart per sample, `cu_seqlens` marks the
        boundaries, labels never cross samples. Padding (pad id, label -100) extends the last sample up
        to a multiple of `pad_to_multiple_of` (the sequence-parallel layout's 2 x ulysses x ring)."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        ids, labels, positions, bounds = [], [], [], [0]
        for sample in samples:
            length = sample["input_ids"].shape[0]
            ids.append(sample["input_ids"])
            sample_labels = sample["labels"].clone()
            sample_labels[0] = IGNORE_INDEX  # the first token is never a target of the previous sample
            labels.append(sample_labels)
            positions.append(torch.arange(length))
            bounds.append(bounds[-1] + length)
        total = bounds[-1]
        pad = (-total) % pad_to_multiple_of
        if pad:
            ids.append(torch.full((pad,), self.pad_token_id, dtype=torch.long))
            labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
            positions.append(torch.arange(positions[-1].shape[0], positions[-1].shape[0] + pad))
            bounds[-1] += pad
        pixel_values = torch.cat([s["pixel_values"] for s in samples])
        return {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            "pixel_values": pixel_values,
        }


def _text_of(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"message {index}: a system message holds text only")


# ---- frames -> pixel values ------------------------------------------------------------------------
# The official models were trained on frames that transformers' PIL-based SiglipImageProcessor made
# (`SiglipImageProcessorPil` since transformers 5): PIL bicubic resize of the uint8 frame, then
# float64(x) * (1/255) cast to float32, then (x - mean) / std in float32. The resize is PIL's own; the
# rest depends only on the uint8 value and the channel, so a 3 x 256 table computed with exactly those
# operations gives the same bits as the processor at the cost of one lookup per value (numpy indexes
# with the uint8 values directly, about the cost of one float pass). Frames run in threads: PIL
# releases the GIL while resampling.
PREPROCESS_THREADS = min(8, os.cpu_count() or 1)


@functools.lru_cache(maxsize=8)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: row c, column v is channel c's normalised value of uint8 v."""
    values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    table = np.stack([(values - np.float32(m)) / np.float32(s) for m, s in zip(mean, std)])
    table.flags.writeable = False
    return table


def _resize_one(frame_HWC: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame_HWC))
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


def preprocess_frames(
    frames_THWC: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    threads: int = PREPROCESS_THREADS,
) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, S, S), bit-identical to the PIL SigLIP image processor."""
    count = frames_THWC.shape[0]
    table = _normalisation_table(tuple(float(x) for x in mean), tuple(float(x) for x in std))
    out = torch.empty(count, 3, size, size, dtype=torch.float32)
    out_np = out.numpy()
    resize = frames_THWC.shape[1:3] != (size, size)

    def one(index: int) -> None:
        frame = _resize_one(frames_THWC[index], size) if resize else frames_THWC[index]
        for channel in range(3):
            out_np[index, channel] = table[channel][frame[..., channel]]

    workers = min(threads, count)
    if workers <= 1:
        for index in range(count):
            one(index)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(count)))
    return out
