"""The model side of the server: a bounded queue, dynamic batching, caches, cancellation.

One thread owns the model. It takes the requests waiting in the queue (up to `max_batch_size`,
waiting `batch_wait_s` after the first for more to arrive), and for the batch:
1. embeds each prompt: text embeddings with the frame embeddings spliced in at the `<image>` tokens;
   a media item whose content hash is in the `EmbeddingCache` skips the vision tower;
2. prefills: a prompt sharing a prefix with a prompt in the `PrefixCache` starts from that prefix's
   K/V and prefills only the rest; the other prompts are prefilled together, left-padded (padding
   keys masked, position ids starting at each prompt's first real token), as `model.generate` does;
3. decodes all rows together on one left-padded K/V cache, one token per row per step. A row leaves
   the batch (its K/V rows dropped) when it stops, reaches its `max_tokens`, or its client has gone.

Every row is decoded as it would be alone, so answers equal `model.generate`'s for the same prompt.
Shapes: B rows, T prompt tokens, D LLM width, K key/value heads, H head dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from longvila.chat import TextStreamer
from longvila.model.attention import AttentionContext
from longvila.model.generation import _pick, _prefill
from longvila.model.vlm import DEFAULT_PREFILL_CHUNK
from longvila.serve.cache import KV, EmbeddingCache, PrefixCache, content_hash
from longvila.serve.media import ChatRequest
from longvila.serve.metrics import Metrics

GiB = 1 << 30


@dataclass(kw_only=True)
class EngineConfig:
    max_batch_size: int = 16
    """Requests decoded together at most."""
    batch_wait_s: float = 0.005
    """After the first queued request, how long to wait for others to join its batch."""
    max_pending: int = 64
    """Requests admitted at once (reading, decoding media, queued or generating); more get 429."""
    embedding_cache_bytes: int = 4 * GiB
    """Budget of the frame-embedding cache (0: off)."""
    prefix_cache_bytes: int = 4 * GiB
    """Budget of the prompt-prefix K/V cache (0: off)."""
    prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK
    """Prompts longer than this are prefilled chunk by chunk (as in `model.generate`)."""
    prefill_batch_tokens: int = 16384
    """Fresh prompts are prefilled together while (rows x longest prompt) stays within this."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_pending", "prefill_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("embedding_cache_bytes", "prefix_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(eq=False)
class Job:
    """One request in the engine. `emit` receives ("text", piece), ("done", finish, tokens) or
    ("error", message), from the engine thread."""

    request: ChatRequest
    input_ids: torch.Tensor
    """(T,) prompt token ids."""
    emit: Callable[[tuple], None]
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    first_token_at: float | None = None
    reused_tokens: int = 0

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    job: Job
    streamer: TextStreamer
    generator: torch.Generator | None
    length: int
    kv: KV
    hidden: torch.Tensor
    """(D,) hidden state at the prompt's last token."""


def stop_token_ids(model, processor) -> set[int]:
    """The processor's stop ids (end of turn, EOS, padding) and the model config's end-of-sequence ids."""
    stops = set(processor.stop_token_ids)
    eos = model.config.extra.get("eos_token_id") or getattr(model.llm.config, "eos_token_id", None)
    if eos is not None:
        stops.update([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
    return stops


def token_keys(
    input_ids: torch.Tensor, image_token_id: int, request: ChatRequest, per_frame: int
) -> np.ndarray:
    """(T,) identity of each prompt token for the prefix cache: the token id, or, at `<image>` tokens, a
    negative number from the hash of (media content, frame index)."""
    keys = input_ids.numpy().astype(np.int64).copy()
    frame_keys = [
        -1 - (int(content_hash(item.key, str(f))[:15], 16))
        for item in request.media
        for f in range(item.num_frames)
    ]
    positions = np.flatnonzero(keys == image_token_id)
    if len(positions) != len(frame_keys) * per_frame:
        raise ValueError(f"{len(positions)} <image> tokens for {len(frame_keys)} frames x {per_frame}")
    if len(positions):
        keys[positions] = np.repeat(np.asarray(frame_keys, dtype=np.int64), per_frame)
    return keys


class Engine:
    """Owns the model and its thread; `submit` queues a `Job`, the thread batches and generates."""

    def __init__(self, model, processor, config: EngineConfig | None = None) -> None:
        self.model = model
        self.processor = processor
        self.config = config or EngineConfig()
        self.metrics = Metrics()
        self.embedding_cache = EmbeddingCache(self.config.embedding_cache_bytes)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self.stop_ids = stop_token_ids(model, processor)
        self.pending = 0
        self.running = 0
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._hold = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="longvila-engine", daemon=True)
        self._thread.start()

    # ---- admission and queue ---------------------------------------------------------------------
    def try_admit(self) -> bool:
        """Reserve a place for a request (False when `max_pending` are in flight)."""
        with self._wake:
            if self.pending >= self.config.max_pending:
                return False
            self.pending += 1
            return True

    def release(self) -> None:
        with self._wake:
            self.pending -= 1

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(job)
            self._wake.notify()

    @contextlib.contextmanager
    def hold(self):
        """Pause batching (requests queue up) until the block exits; for tests and benchmarks."""
        with self._hold:
            yield

    def close(self) -> None:
        """Stop after the batch in progress; requests still queued are answered 503."""
        with self._wake:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._wake.notify()
        for job in left:
            job.emit(("error", "the server is shutting down", 503))
        self._thread.join(timeout=30)

    def _wait_for_work(self) -> None:
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()

    def _take_batch(self) -> list[Job]:
        """Up to `max_batch_size` queued jobs, waiting `batch_wait_s` for more to join the first."""
        deadline = time.perf_counter() + self.config.batch_wait_s
        with self._wake:
            while len(self._queue) < self.config.max_batch_size and time.perf_counter() < deadline:
                self._wake.wait(timeout=max(deadline - time.perf_counter(), 0))
            count = min(len(self._queue), self.config.max_batch_size)
            return [self._queue.popleft() for _ in range(count)]

    def _loop(self) -> None:
        while not self._closed:
            self._wait_for_work()  # outside the hold, so `hold()` can pause a waiting engine
            with self._hold:
                if self._closed:
                    break
                jobs = [job for job in self._take_batch() if not self._drop_cancelled(job)]
                if not jobs:
                    continue
                self.running = len(jobs)
                try:
                    with torch.no_grad():
                        self._run(jobs)
                except Exception as exc:  # noqa: BLE001 - report to every client and keep serving
                    for job in jobs:
                        job.emit(("error", f"generation failed: {exc}"))
                finally:
                    self.running = 0

    def _drop_cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            job.emit(("done", "cancelled", 0))
            with self.metrics.lock:
                self.metrics.cancelled += 1
            return True
        return False

    # ---- one batch -------------------------------------------------------------------------------
    def _run(self, jobs: list[Job]) -> None:
        with self.metrics.lock:
            self.metrics.batch_sizes.append(len(jobs))
        embeds = [self._embed(job) for job in jobs]
        rows = self._prefill_all(jobs, embeds)
        self._decode(rows)

    def _embed(self, job: Job) -> torch.Tensor:
        """(T, D) prompt embeddings: text, with frame embeddings at the `<image>` tokens."""
        model = self.model
        ids = job.input_ids.to(model.device)
        text = model.llm.get_input_embeddings()(ids[None])[0]
        if not job.request.media:
            return text
        frames = [self._frame_embeddings(item) for item in job.request.media]
        flat = torch.cat(frames).reshape(-1, text.shape[-1]).to(text.dtype)
        is_image = (ids == model.config.image_token_id)[:, None]
        return text.masked_scatter(is_image, flat)

    def _frame_embeddings(self, item) -> torch.Tensor:
        if item.embeds is None:
            item.embeds = self.embedding_cache.get(item.key)
        if item.embeds is None:
            item.embeds = self.model.encode_frames(item.pixels)
            item.pixels = None
            with self.metrics.lock:
                self.metrics.vision_tower_calls += 1
            self.embedding_cache.put_embeddings(item.key, item.embeds)
        return item.embeds

    def _prefill_all(self, jobs: list[Job], embeds: list[torch.Tensor]) -> list[_Row]:
        image_id, per_frame = self.model.config.image_token_id, self.model.config.tokens_per_frame
        keys = [token_keys(job.input_ids, image_id, job.request, per_frame) for job in jobs]
        found = [self.prefix_cache.lookup(k) if self.prefix_cache.max_bytes else (0, None) for k in keys]
        results: dict[int, tuple[KV, torch.Tensor]] = {}
        fresh = [i for i, (shared, _) in enumerate(found) if shared == 0]
        longest = max((embeds[i].shape[0] for i in fresh), default=0)
        if len(fresh) > 1 and longest * len(fresh) <= self.config.prefill_batch_tokens:
            results.update(zip(fresh, self._prefill_padded([embeds[i] for i in fresh])))
            fresh = []
        for i, (shared, kv) in enumerate(found):
            if i in results:
                continue
            if i in fresh:
                results[i] = self._prefill_padded([embeds[i]])[0]
            else:
                results[i] = self._prefill_suffix(embeds[i], shared, kv)
                jobs[i].reused_tokens = shared
        rows = []
        for i, job in enumerate(jobs):
            kv, hidden = results[i]
            shared = found[i][0]
            length = embeds[i].shape[0]
            if self.prefix_cache.max_bytes and length - shared >= shared:
                # Keep a prompt's K/V unless most of it came from a stored prompt (which already
                # holds that prefix: storing again would copy a long video's K/V once per question).
                self.prefix_cache.store(keys[i], kv)
            rows.append(self._row(job, length, kv, hidden))
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(e.shape[0] for e in embeds)
            self.metrics.prefix_tokens_reused += sum(shared for shared, _ in found)
        return rows

    def _row(self, job: Job, length: int, kv: KV, hidden: torch.Tensor) -> _Row:
        request = job.request
        pieces = lambda piece: job.emit(("text", piece))
        streamer = TextStreamer(self.processor, pieces)
        if request.ignore_eos:
            streamer.stop_ids = set()
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        return _Row(job, streamer, generator, length, kv, hidden)

    def _prefill_padded(self, prompts: list[torch.Tensor]) -> list[tuple[KV, torch.Tensor]]:
        """Prefill (T_i, D) prompts as one left-padded batch; per prompt, its K/V (1, K, T_i, H) per
        layer without padding and its last hidden state (D,)."""
        device = self.model.device
        lengths = [p.shape[0] for p in prompts]
        longest = max(lengths)
        embeds = prompts[0].new_zeros(len(prompts), longest, prompts[0].shape[-1])
        padding = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            embeds[row, longest - lengths[row] :] = prompt
            padding[row, longest - lengths[row] :] = True
        offsets = torch.tensor([longest - n for n in lengths], device=device)
        position_ids = (torch.arange(longest, device=device)[None] - offsets[:, None]).clamp(min=0)
        ctx = AttentionContext(key_padding=None if bool(padding.all()) else padding)
        cache = DynamicCache()
        hidden = _prefill(self.model, embeds, position_ids, ctx, cache, self.config.prefill_chunk_size)
        out = []
        for row, n in enumerate(lengths):
            kv = [
                (layer.keys[row : row + 1, :, longest - n :], layer.values[row : row + 1, :, longest - n :])
                for layer in cache.layers
            ]
            out.append((kv, hidden[row]))
        return out

    def _prefill_suffix(self, prompt: torch.Tensor, shared: int, kv: KV) -> tuple[KV, torch.Tensor]:
        """Prefill the tokens after the first `shared` of `prompt` (T, D) on top of their cached K/V."""
        cache = _cache_from(kv)
        device = self.model.device
        position_ids = torch.arange(shared, prompt.shape[0], device=device)[None]
        hidden = _prefill(
            self.model,
            prompt[None, shared:],
            position_ids,
            AttentionContext(),
            cache,
            self.config.prefill_chunk_size,
        )
        return [(layer.keys, layer.values) for layer in cache.layers], hidden[0]

    # ---- decoding --------------------------------------------------------------------------------
    def _decode(self, rows: list[_Row]) -> None:
        """Greedy or sampled decoding of every row together; rows leave as they finish."""
        model = self.model
        device = model.device
        cache, padding = _batch_cache([row.kv for row in rows], [row.length for row in rows])
        for row in rows:
            row.kv = None  # the batch cache holds the only copy now
        ctx = AttentionContext(key_padding=padding)
        hidden = torch.stack([row.hidden for row in rows])
        next_pos = torch.tensor([row.length for row in rows], device=device)
        head, embedding = model._head(), model.llm.get_input_embeddings()
        started = time.perf_counter()
        produced = 0
        while rows:
            tokens = self._pick(head(hidden), rows)
            produced += len(rows)
            keep = [
                i
                for i, (row, token) in enumerate(zip(rows, tokens.tolist()))
                if not self._advance(row, token)
            ]
            if not keep:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                ctx.key_padding = None if ctx.key_padding is None else ctx.key_padding[index]
                rows, tokens, next_pos = [rows[i] for i in keep], tokens[index], next_pos[index]
            if ctx.key_padding is not None:
                ctx.key_padding = torch.cat([ctx.key_padding, ctx.key_padding.new_ones(len(rows), 1)], 1)
            out = model._decoder(embedding(tokens[:, None]), next_pos[:, None], ctx, cache=cache)
            hidden = out.last_hidden_state[:, -1]
            next_pos = next_pos + 1
        with self.metrics.lock:
            self.metrics.generation_tokens += produced
            self.metrics.decode_seconds += time.perf_counter() - started

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """(B,) next tokens: argmax for greedy rows, each sampled row with its own sampling and seed."""
        tokens = logits.argmax(-1)
        for i, row in enumerate(rows):
            request = row.job.request
            if request.temperature > 0:
                tokens[i] = _pick(
                    logits[i : i + 1], True, request.temperature, 0, request.top_p, row.generator
                )[0]
        return tokens

    def _advance(self, row: _Row, token: int) -> bool:
        """Hand `token` to its request; True when the row is finished."""
        job = row.job
        if job.cancelled.is_set():
            with self.metrics.lock:
                self.metrics.cancelled += 1
            job.emit(("done", "cancelled", job.generated))
            return True
        job.generated += 1
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            with self.metrics.lock:
                self.metrics.ttft.observe(job.first_token_at - job.arrival)
        row.streamer.put(torch.tensor([token]))
        finish = None
        if token in self.stop_ids and not job.request.ignore_eos:
            finish = "stop"
        elif job.generated >= job.request.max_tokens:
            finish = "length"
        if finish is not None:
            row.streamer.end()
            job.emit(("done", finish, job.generated))
        return finish is not None


def _cache_from(kv: KV) -> DynamicCache:
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer)
    return cache


def _batch_cache(kvs: list[KV], lengths: list[int]) -> tuple[DynamicCache, torch.Tensor | None]:
    """Rows' K/V (1, K, T_i, H) per layer, left-padded into one (B, K, max T, H) cache, and the
    (B, max T) mask of real keys (None when no row is padded)."""
    if len(kvs) == 1:
        return _cache_from(kvs[0]), None
    longest = max(lengths)
    layers = []
    for layer in range(len(kvs[0])):
        keys, values = kvs[0][layer]
        shape = (len(kvs), keys.shape[1], longest, keys.shape[3])
        batch_keys, batch_values = keys.new_zeros(shape), values.new_zeros(shape)
        for row, kv in enumerate(kvs):
            batch_keys[row, :, longest - lengths[row] :] = kv[layer][0][0]
            batch_values[row, :, longest - lengths[row] :] = kv[layer][1][0]
        layers.append((batch_keys, batch_values))
    padding = torch.zeros(len(kvs), longest, dtype=torch.bool, device=layers[0][0].device)
    for row, n in enumerate(lengths):
        padding[row, longest - n :] = True
    return _cache_from(layers), None if bool(padding.all()) else padding


def describe(engine: Engine) -> dict[str, Any]:
    """Counters for tests and benchmarks (the same numbers `/metrics` exposes)."""
    m = engine.metrics
    with m.lock:
        return {
            "vision_tower_calls": m.vision_tower_calls,
            "prefix_tokens_reused": m.prefix_tokens_reused,
            "batch_sizes": list(m.batch_sizes),
            "generation_tokens": m.generation_tokens,
            "cancelled": m.cancelled,
            "embedding_cache_hits": engine.embedding_cache.hits,
            "prefix_cache_hits": engine.prefix_cache.hits,
        }
