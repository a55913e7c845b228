"""Multi-turn chat over videos and images, with answers streamed as text while they are decoded.

    session = ChatSession(model, processor, num_frames=32)
    session.ask("What happens?", video="clip.mp4", stream=lambda piece: print(piece, end=""))
    session.ask("And then?")            # the video stays in the history

Media are decoded once, when first asked about, and kept in the history as frame arrays, so later turns
reuse the same frames. `TextStreamer` turns the token ids that `model.generate` hands its streamer into
text pieces; a piece is only released once its bytes form whole characters (byte-level BPE splits
multi-byte characters across tokens).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
REPLACEMENT_CHAR = "\ufffd"


class ContextLengthError(ValueError):
    """The prompt and the tokens asked for do not fit the LLM's context window."""


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name's extension is an image's (otherwise it is treated as a video)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def max_context(model) -> int | None:
    """The LLM's `max_position_embeddings` (None when the config does not say)."""
    value = model.config.llm.get("max_position_embeddings")
    return int(value) if value else None


def check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise ContextLengthError when `prompt_tokens + max_new_tokens` exceeds the LLM's context."""
    limit = max_context(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for, "
            f"but the model's context holds {limit} (use fewer frames or fewer new tokens)"
        )


def load_video_frames(
    path: str | os.PathLike, num_frames: int | None, fps: float | None, max_frames: int | None
) -> np.ndarray:
    """Decode a video the way the processor would: `num_frames` uniform, or `fps` capped by `max_frames`.

    Raises FileNotFoundError for a missing file and a ValueError naming the file if it does not decode.
    """
    from longvila.data.video import decode_frames

    frames, _ = decode_frames(path, num_frames=None if fps else num_frames, fps=fps, max_frames=max_frames)
    return np.asarray(frames)


def load_image_array(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3); FileNotFoundError / ValueError name the file."""
    from longvila.data.image import load_image

    return np.array(load_image(path))  # a writable copy: torch warns on read-only arrays


class TextStreamer:
    """A `model.generate` streamer that turns new token ids into text pieces for `on_text`.

    Only the first prompt of the batch is followed. The text decoded so far is re-decoded on every
    token and the new suffix is released, except while it ends in U+FFFD: then the last token ended
    inside a multi-byte character and the rest of its bytes are still to come. Decoding stops at the
    first end-of-turn or padding token.
    """

    def __init__(self, processor, on_text: Callable[[str], None]) -> None:
        self.processor = processor
        self.on_text = on_text
        self.stop_ids = set(processor.stop_token_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.released = 0
        self.stopped = False

    def put(self, ids: torch.Tensor) -> None:
        if self.stopped:
            return
        token = int(ids.reshape(-1)[0])
        if token in self.stop_ids:
            self.stopped = True
            return
        self.token_ids.append(token)
        self.text = self.processor.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if not self.text.endswith(REPLACEMENT_CHAR):
            self._release()

    def end(self) -> None:
        self._release()
        self.stopped = True

    def _release(self) -> None:
        if len(self.text) > self.released:
            piece = self.text[self.released :]
            self.released = len(self.text)
            self.on_text(piece)


class ChatSession:
    """A conversation with one model: the history of turns, with the media each user turn carried."""

    def __init__(
        self,
        model,
        processor,
        *,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        system_prompt: str | None = None,
        seed: int | None = None,
        sp=None,
    ) -> None:
        """`sp`: a SequenceParallel group (torchrun): every prompt is prefilled with MM-SP across its
        ranks, which must all ask the same questions; all get the same answer, and only SP rank 0
        streams it. Sampling then needs the same random stream on every rank: without `seed`, rank
        0 draws one and shares it."""
        self.model = model
        self.sp = sp if sp is not None and sp.sp_degree > 1 else None
        if self.sp is not None and seed is None:
            drawn = torch.tensor(
                [int(torch.randint(0, 2**31 - 1, ()).item()) if self.sp.sp_rank == 0 else 0],
                dtype=torch.float64,
                device=model.device,
            )
            seed = int(self.sp.all_reduce_sum(drawn).item())
        self.processor = processor
        self.num_frames = num_frames or processor.num_frames
        self.fps = fps
        self.max_frames = max_frames
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.system_prompt = system_prompt
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.history: list[dict[str, Any]] = []

    def reset(self) -> None:
        """Forget every turn (and its media)."""
        self.history = []

    def user_message(self, question: str, video: Any = None, image: Any = None) -> dict[str, Any]:
        """The user turn for `question`, its media decoded now (paths) or checked (arrays)."""
        parts: list[dict[str, Any]] = []
        if video is not None:
            if isinstance(video, (str, os.PathLike)):
                video = load_video_frames(video, self.num_frames, self.fps, self.max_frames)
            else:
                video = self._sample_array(video)
            parts.append({"type": "video", "video": video})
        if image is not None:
            if isinstance(image, (str, os.PathLike)):
                image = load_image_array(image)
            parts.append({"type": "image", "image": image})
        parts.append({"type": "text", "text": question})
        return {"role": "user", "content": parts}

    def _sample_array(self, frames: Any) -> Any:
        """Frames given as an array are sampled as the processor samples them (no timestamps: an fps
        request keeps at most `max_frames`)."""
        from longvila.data.sampling import sample_frame_array

        if not hasattr(frames, "shape"):
            return frames
        return sample_frame_array(frames, None if self.fps else self.num_frames, self.max_frames)

    def messages(self, pending: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return head + self.history + ([pending] if pending else [])

    def prompt(self, pending: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The collated prompt of the whole history plus `pending`, ending with the generation prompt."""
        # Frames were sampled when the media were first read (`user_message`): take them as they are.
        sample = self.processor(self.messages(pending), frames_sampled=True)
        return self.processor.collate([sample])

    def ask(
        self,
        question: str,
        video: Any = None,
        image: Any = None,
        stream: Callable[[str], None] | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> str:
        """Ask `question` (about `video` / `image`, a path or a uint8 array); returns the answer.

        `stream` receives the answer's text piece by piece as it is generated. The question and the
        answer join the history only when generation succeeds.
        """
        pending = self.user_message(question, video=video, image=image)
        batch = self.prompt(pending)
        max_new_tokens = max_new_tokens or self.max_new_tokens
        check_context(self.model, batch["input_ids"].shape[1], max_new_tokens)
        temperature = self.temperature if temperature is None else temperature
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)
            if stream is not None:
                stream(piece)

        streams = self.sp is None or self.sp.sp_rank == 0
        new_ids = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=self.top_p if top_p is None else top_p,
            generator=self.generator,
            eos_token_id=self.processor.stop_token_ids,
            streamer=TextStreamer(self.processor, on_text) if streams else None,
            sp=self.sp,
        )
        answer = self.processor.decode(new_ids[0])
        self.history.append(pending)
        self.history.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer
