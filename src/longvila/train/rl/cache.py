"""Frame embeddings computed once per video and reused: by all G rollouts of a question, by the
reference and policy forward passes, and across steps and epochs (a content-hashed, persistent cache).

Stage 6 freezes the vision tower and the projector, so a video's embeddings never change during the
stage; the key is a SHA-256 of the preprocessed pixels (shape, dtype, bytes) and of a fingerprint of the
frozen vision weights, so a cache directory written by other weights is never read by mistake.

Two layers: an in-memory LRU of `memory_items` videos (the current step's videos), and an optional
directory of one `.pt` file per video (written under a temporary name and renamed, so a killed run
never leaves half a file). Under sequence parallelism each SP rank encodes its share of the frames and
the group gathers them (MM-SP stage 1); the ranks of a group agree on hit or miss before encoding, so
their collectives stay matched.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import torch


def vision_fingerprint(model) -> str:
    """SHA-256 over the vision tower's and projector's parameters (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for prefix, module in (("vision_tower", model.vision_tower), ("mm_projector", model.mm_projector)):
        for name, tensor in sorted(module.state_dict().items()):
            full = getattr(tensor, "full_tensor", None)
            tensor = full() if callable(full) else tensor
            digest.update(f"{prefix}.{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def content_key(pixel_values: torch.Tensor, fingerprint: str) -> str:
    """The cache key of one video's preprocessed frames (F, 3, S, S)."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(f"{tuple(pixel_values.shape)}{pixel_values.dtype}".encode())
    digest.update(pixel_values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """`get(pixel_values)` -> (F, P, D) frame embeddings, encoding only on a miss.

    `encoder` is the model whose `encode_frames` runs (an unsharded one); `sp` (optional) splits the
    encoding among the SP ranks. Counters: `encodes` (videos through the vision tower), `frames_encoded`,
    `memory_hits`, `disk_hits`.
    """

    def __init__(
        self,
        encoder,
        *,
        fingerprint: str,
        directory: str | Path | None = None,
        memory_items: int = 64,
        sp=None,
    ):
        if memory_items < 0:
            raise ValueError(f"memory_items must be >= 0, got {memory_items}")
        self.encoder = encoder
        self.fingerprint = fingerprint
        self.directory = Path(directory) if directory is not None else None
        self.memory_items = memory_items
        self.sp = sp
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encodes = 0
        self.frames_encoded = 0
        self.memory_hits = 0
        self.disk_hits = 0
        self.seen: set[str] = set()
        """Keys of every video asked for (distinct videos)."""
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def state(self) -> dict[str, int]:
        return {
            "encodes": self.encodes,
            "frames_encoded": self.frames_encoded,
            "memory_hits": self.memory_hits,
            "disk_hits": self.disk_hits,
        }

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def _group_agrees(self, have: bool) -> bool:
        """True when every rank of the SP group has the entry (else all of them encode)."""
        if self.sp is None or self.sp.sp_degree == 1:
            return have
        flag = torch.tensor([1.0 if have else 0.0], device=self.encoder.device)
        return int(self.sp.all_reduce_sum(flag).item()) == self.sp.sp_degree

    def _remember(self, key: str, value: torch.Tensor) -> None:
        if self.memory_items == 0:
            return
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    @torch.no_grad()
    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        frames = pixel_values.shape[0]
        sp = self.sp
        if sp is not None and sp.sp_degree > 1:
            local = sp.split_frames(pixel_values)
            width = self.encoder.config.llm_hidden_size
            per = self.encoder.config.tokens_per_frame
            local_embeds = (
                self.encoder.encode_frames(local)
                if local.shape[0]
                else torch.zeros(0, per, width, device=self.encoder.device, dtype=self.encoder.dtype)
            )
            embeds = sp.gather_frames(local_embeds, total=frames)
        else:
            embeds = self.encoder.encode_frames(pixel_values)
        self.encodes += 1
        self.frames_encoded += frames
        return embeds.detach()

    def get(self, pixel_values: torch.Tensor) -> torch.Tensor:
        key = content_key(pixel_values, self.fingerprint)
        self.seen.add(key)
        if self._group_agrees(key in self._memory):
            self.memory_hits += 1
            self._memory.move_to_end(key)
            return self._memory[key]
        on_disk = self.directory is not None and self._path(key).is_file()
        if self._group_agrees(on_disk):
            value = torch.load(self._path(key), map_location=self.encoder.device, weights_only=True)
            self.disk_hits += 1
        else:
            value = self._encode(pixel_values)
            if self.directory is not None:
                self._write(key, value)
        self._remember(key, value)
        return value

    def _write(self, key: str, value: torch.Tensor) -> None:
        path = self._path(key)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(value.cpu(), temp)
        os.replace(temp, path)
