"""LongVILA as an lmms-eval model: `lmms-eval --model longvila --model_args pretrained=DIR,num_frames=N`.

lmms-eval 0.7 finds plugin models through the `lmms_eval.models` entry-point group; each entry point
names a `ModelManifest` (or a callable returning one). `lmms_manifest` below is that callable:

    [project.entry-points."lmms_eval.models"]
    longvila = "longvila.eval.lmms_adapter:lmms_manifest"

lmms-eval ships a `longvila` model of its own (a "chat" model running the official remote code on
vLLM). Plugin manifests are merged over the built-in ones, and lmms-eval prefers a model's chat class,
so this manifest names both a chat class (`LongVILALmmsChat`, messages from `doc_to_messages`) and a
simple class (`LongVILALmms`, `doc_to_visual` + context; chosen by `--force_simple`): with longvila
installed, `--model longvila` runs this package.

`model_args`: `pretrained` (checkpoint directory), `num_frames` (default: the processor's), `fps` and
`max_frames` (sample by rate instead), `device` ("cpu", "cuda", ...), `dtype` ("float32", "bfloat16",
...), `max_new_tokens` (when a task does not say). Only `generate_until` is implemented: the model
answers each request greedily (or sampled, when the task's generation kwargs ask for it), one at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from longvila.chat import is_image_path

MODEL_ID = "longvila"


def lmms_manifest():
    """The entry point lmms-eval loads: LongVILA as a "simple" (doc_to_visual) model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path=f"{__name__}.LongVILALmms",
        chat_class_path=f"{__name__}.LongVILALmmsChat",
    )


def _visual_part(visual: Any) -> dict[str, Any]:
    """A processor content part for one item `doc_to_visual` returned."""
    if isinstance(visual, (str, os.PathLike)):
        path = Path(visual)
        if is_image_path(path):
            from longvila.chat import load_image_array

            return {"type": "image", "image": load_image_array(path)}
        return {"type": "video", "video": str(path)}
    if hasattr(visual, "convert") and hasattr(visual, "size"):  # a PIL image
        return {"type": "image", "image": visual}
    if isinstance(visual, dict) and (visual.get("url") or visual.get("path")):
        kind = visual.get("type")
        target = visual.get("url") or visual.get("path")
        if kind == "video" and isinstance(target, (str, os.PathLike)):
            return {"type": "video", "video": str(target)}
        return _visual_part(target)
    raise ValueError(f"unsupported visual of type {type(visual).__name__}: pass paths or PIL images")


class LongVILALmms(lmms):
    """lmms-eval's "simple" model interface over `LongVILA.generate`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        max_new_tokens: int = 128,
        batch_size: int | str = 1,
        **unused: Any,
    ) -> None:
        super().__init__()
        import torch

        from longvila.model.vlm import LongVILA
        from longvila.processor import LongVILAProcessor

        if int(batch_size) != 1:
            raise ValueError(f"longvila answers one request at a time; got batch_size={batch_size}")
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.model = LongVILA.from_pretrained(pretrained, dtype=torch_dtype).to(device).eval()
        self.processor = LongVILAProcessor.from_pretrained(pretrained)
        self.num_frames = int(num_frames) if num_frames else self.processor.num_frames
        self.fps = float(fps) if fps else None
        self.max_frames = int(max_frames) if max_frames else None
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = 1

    def _answer(self, messages: list[dict[str, Any]], gen_kwargs: dict[str, Any]) -> str:
        sample = self.processor(
            messages, num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames
        )
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample")) and temperature > 0
        new_ids = self.model.generate(
            **self.processor.collate([sample]),
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            eos_token_id=self.processor.stop_token_ids,
        )
        text = self.processor.decode(new_ids[0])
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            if stop:
                text = text.split(stop)[0]
        return text

    def _messages(self, request: Instance) -> list[dict[str, Any]]:
        """The user turn of a simple request: `doc_to_visual(doc)` media, then the context."""
        context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
        content = [_visual_part(v) for v in visuals] + [{"type": "text", "text": context}]
        return [{"role": "user", "content": content}]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        answers = []
        for request in tqdm(requests, desc="longvila", disable=self.rank != 0):
            context, gen_kwargs = request.args[0], request.args[1 if self.is_simple else 2]
            answer = self._answer(self._messages(request), dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            answers.append(answer)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "longvila's lmms-eval adapter implements generate_until only; use a generate_until task"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "longvila's lmms-eval adapter does not implement multi-round generation; use generate_until"
        )


class LongVILALmmsChat(LongVILALmms):
    """lmms-eval's "chat" interface: requests carry `doc_to_messages`, content parts typed
    `text`, `image` or `video` with a `url` (a path or a PIL image)."""

    is_simple = False

    def _messages(self, request: Instance) -> list[dict[str, Any]]:
        _context, doc_to_messages, _gen_kwargs, doc_id, task, split = request.args
        messages = []
        for message in doc_to_messages(self.task_dict[task][split][doc_id]):
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = []
            for part in content:
                if part.get("type") == "text":
                    parts.append({"type": "text", "text": part["text"]})
                elif part.get("type") in ("image", "video"):
                    parts.append(_visual_part(part))
                else:
                    raise ValueError(
                        f"unsupported content part {part.get('type')!r} (longvila reads text, images, videos)"
                    )
            messages.append({"role": message["role"], "content": parts})
        return messages
