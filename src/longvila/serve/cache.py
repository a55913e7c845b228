"""Memory-bounded caches that let the server skip work on long videos it has already seen.

- `EmbeddingCache`: a media item's content hash -> its frame embeddings (vision tower + projector),
  so a repeated video is neither decoded nor encoded again.
- `PrefixCache`: a prompt's per-token identity -> the LLM's K/V for that prompt, so a new prompt that
  starts the same way (another question on the same video, the next turn of a chat) prefills only
  the tokens after the shared prefix.

Both evict least-recently-used entries once the bytes they hold pass a budget; a budget of 0 turns a
cache off. Shapes: F frames, P tokens per frame, D LLM width, T prompt tokens, K key/value heads, H
head dim.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder layer, (keys, values), each (1, K, T, H)."""


def content_hash(*chunks: bytes | str) -> str:
    """A hex BLAKE2b digest over `chunks` (bytes as they are, strings UTF-8), length-prefixed so that
    ("ab", "c") and ("a", "bc") differ."""
    digest = hashlib.blake2b(digest_size=20)
    for chunk in chunks:
        data = chunk.encode() if isinstance(chunk, str) else chunk
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tensor_bytes(value: Any) -> int:
    """Bytes held by a tensor or a (nested) list/tuple of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


class LRUBytes:
    """A thread-safe LRU map whose values' sizes (bytes) sum to at most `max_bytes`.

    An entry larger than the whole budget is not stored. `hits` / `misses` count `get` calls.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"a cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Any, value: Any, size: int) -> bool:
        """Store `value` (of `size` bytes), evicting the oldest entries as needed; False if it cannot fit."""
        with self._lock:
            if size > self.max_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            while self._entries and self.bytes + size > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
            self._entries[key] = (value, size)
            self.bytes += size
            return True

    def items(self) -> list[tuple[Any, Any]]:
        """A snapshot of (key, value), oldest first."""
        with self._lock:
            return [(key, value) for key, (value, _) in self._entries.items()]

    def touch(self, key: Any) -> None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)


class EmbeddingCache(LRUBytes):
    """Media content hash -> frame embeddings (F, P, D), kept on the model's device."""

    def put_embeddings(self, key: str, embeds: torch.Tensor) -> bool:
        return self.put(key, embeds, tensor_bytes(embeds))


@dataclass
class PrefixEntry:
    token_keys: np.ndarray
    """(T,) int64 identity of every prompt token: the token id, or for a frame's `<image>` tokens a
    negative number derived from that frame's content hash (two prompts with the same ids but other
    videos must not share K/V)."""
    kv: KV


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D arrays."""
    length = min(len(a), len(b))
    differ = np.flatnonzero(a[:length] != b[:length])
    return int(differ[0]) if len(differ) else length


class PrefixCache(LRUBytes):
    """Prompt token identities -> the LLM's K/V for those tokens (CPU or device tensors as produced)."""

    def lookup(self, token_keys: np.ndarray) -> tuple[int, KV | None]:
        """(reusable length L, K/V cut to L) for the stored prompt sharing the longest prefix with
        `token_keys`; L < len(token_keys) so at least one token is left to prefill (its hidden state
        picks the first new token). (0, None) on a miss."""
        best, best_key, best_entry = 0, None, None
        for key, entry in self.items():
            shared = min(common_prefix(entry.token_keys, token_keys), len(token_keys) - 1)
            if shared > best:
                best, best_key, best_entry = shared, key, entry
        with self._lock:
            if best_entry is None:
                self.misses += 1
                return 0, None
            self.hits += 1
        self.touch(best_key)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in best_entry.kv]

    def store(self, token_keys: np.ndarray, kv: KV) -> bool:
        """Keep a copy of `kv` (1, K, T, H per layer) for the prompt `token_keys` (T,)."""
        owned = [(k.detach().clone(), v.detach().clone()) for k, v in kv]
        key = content_hash(token_keys.astype(np.int64).tobytes())
        entry = PrefixEntry(token_keys=token_keys.astype(np.int64).copy(), kv=owned)
        return self.put(key, entry, tensor_bytes(owned) + entry.token_keys.nbytes)
