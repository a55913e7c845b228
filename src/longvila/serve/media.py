"""Turning an OpenAI chat-completions body into a prompt: validation, media access policy, caps.

Media `url`s are base64 `data:` URLs, or local paths / `file://` URLs. Local files are read only when
the server was started with `--allowed-local-media-path DIR` and the file, after resolving symlinks
and `..`, lies inside DIR; a missing file and a forbidden one get the same refusal, so a client cannot
probe which paths exist. Remote http(s) URLs are never fetched.

Every media item is identified by a content hash (its bytes, kind and frame sampling); when the
embedding cache already holds that hash the item is not decoded at all.
"""

from __future__ import annotations

import base64
import binascii
import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from longvila.serve.cache import EmbeddingCache, LRUBytes, content_hash

_MIME_SUFFIX = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/avi": ".avi"}
_HASH_BLOCK = 1 << 20


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(kw_only=True)
class MediaPolicy:
    allowed_local_media_path: Path | None = None
    """Local paths and file:// URLs must resolve inside this directory; None: data URLs only."""
    default_num_frames: int = 8
    """Frames per video when the request does not say."""
    max_num_frames: int = 256
    """Cap on frames per video (num_frames, max_frames, and what an fps request may decode)."""
    max_fps: float = 4.0
    """Cap on a request's fps."""
    default_max_tokens: int = 512
    max_tokens_limit: int = 4096
    """Cap on a request's max_tokens."""
    default_temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path)
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path {root}: not a directory")
            self.allowed_local_media_path = Path(os.path.realpath(root))
        for name in ("default_num_frames", "max_num_frames", "default_max_tokens", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_fps <= 0:
            raise ValueError(f"max_fps must be > 0, got {self.max_fps}")
        self.default_num_frames = min(self.default_num_frames, self.max_num_frames)
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_limit)


@dataclass
class MediaItem:
    kind: str
    """"video" or "image"."""
    key: str
    """Content hash of the bytes, the kind and the frame sampling."""
    num_frames: int
    frames: np.ndarray | None = None
    """uint8 (F, H, W, 3); None when `embeds` came from the cache."""
    embeds: torch.Tensor | None = None
    """(F, P, D) cached frame embeddings, held so an eviction cannot drop them mid-request."""
    pixels: torch.Tensor | None = None
    """(F, 3, S, S) normalised frames for the vision tower (set from `frames` before queueing)."""


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    """Processor messages; each media part holds its `MediaItem` under "item"."""
    media: list[MediaItem]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool = False
    seed: int | None = None
    ignore_eos: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


# ---- fields ----------------------------------------------------------------------------------------
def _number(body: dict, name: str, default, kind, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"'{name}' must be within [{low}, {high}], got {value}", param=name)
    return kind(value)


def _sampling(source: dict, policy: MediaPolicy) -> dict[str, Any]:
    """num_frames / fps / max_frames given in `source` (the body, a part, or a part's video_url),
    checked against the server's caps."""
    out = {}
    caps = {"num_frames": policy.max_num_frames, "fps": policy.max_fps, "max_frames": policy.max_num_frames}
    for name, kind in (("num_frames", int), ("fps", float), ("max_frames", int)):
        if source.get(name) is not None:
            low = 1 if kind is int else 1e-6
            out[name] = _number(source, name, None, kind, low=low, high=caps[name])
    return out


# ---- media access ----------------------------------------------------------------------------------
def refusal(where: str) -> RequestError:
    """The one answer for a local file that is missing, unreadable or outside the allowed root."""
    return RequestError(
        f"{where}: the media file cannot be opened: it does not exist or is not under the server's "
        "--allowed-local-media-path",
        param=where,
        code="media_unavailable",
    )


def resolve_local_path(url: str, root: Path | None, where: str) -> Path:
    """The real path of a local path or file:// URL inside `root`, or the refusal.

    Symlinks and `..` are resolved before the check; a relative path is taken relative to `root`.
    """
    if root is None:
        raise refusal(where)
    parsed = urlparse(url)
    raw = unquote(parsed.path) if parsed.scheme == "file" else url
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise refusal(where)
    real = Path(os.path.realpath(root / raw))
    if not real.is_relative_to(root) or not real.is_file():
        raise refusal(where)
    return real


# (device, inode, size, mtime, ctime) of a file -> its content hash: an unchanged hour-long video is not
# read again on every question about it. Sized in entries (each counts 1).
_FILE_HASHES = LRUBytes(4096)


def _file_hash(path: Path, where: str) -> str:
    """Content hash of the file at `path` (BLAKE2b over 1 MiB blocks, then over their digests)."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            known = _FILE_HASHES.get(identity)
            if known is not None:
                return known
            digest = []
            while block := file.read(_HASH_BLOCK):
                digest.append(content_hash(block))
    except OSError as exc:
        raise refusal(where) from exc
    value = content_hash(*digest)
    _FILE_HASHES.put(identity, value, 1)
    return value


def _decode(kind: str, path: Path | str, where: str, sampling: dict) -> np.ndarray:
    from longvila.chat import load_image_array, load_video_frames

    try:
        if kind == "image":
            return load_image_array(path)[None]
        return load_video_frames(
            path, sampling.get("num_frames"), sampling.get("fps"), sampling.get("max_frames")
        )
    except FileNotFoundError as exc:
        raise refusal(where) from exc
    except ValueError as exc:
        # Only files inside the allowed root (or the client's own data URLs) get this far.
        message = str(exc)
        if isinstance(path, str) and path.startswith(tempfile.gettempdir()):
            message = message.replace(path, "the data URL")
        raise RequestError(f"{where}: {message}", param=where, code="invalid_media") from exc


def load_media(
    url: str, kind: str, where: str, sampling: dict, policy: MediaPolicy, cache: EmbeddingCache | None
) -> MediaItem:
    """Resolve, hash and (unless cached) decode one media part."""
    recipe = f"{kind}:{sorted(sampling.items())}"
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError(f"{where}: only base64 data URLs are supported", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"{where}: the data URL is not valid base64", param=where) from exc
        key = content_hash(data, recipe)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return MediaItem(kind, key, cached.shape[0], embeds=cached)
        suffix = _MIME_SUFFIX.get(header[5:].split(";")[0], ".png" if kind == "image" else ".mp4")
        handle, tmp = tempfile.mkstemp(prefix="longvila-", suffix=suffix)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            frames = _decode(kind, tmp, where, sampling)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return MediaItem(kind, key, frames.shape[0], frames=frames)
    if urlparse(url).scheme in ("http", "https"):
        raise RequestError(
            f"{where}: remote URLs are not fetched; pass a local path or a data URL", param=where
        )
    path = resolve_local_path(url, policy.allowed_local_media_path, where)
    key = content_hash(_file_hash(path, where), recipe)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return MediaItem(kind, key, cached.shape[0], embeds=cached)
    frames = _decode(kind, path, where, sampling)
    return MediaItem(kind, key, frames.shape[0], frames=frames)


def _media_url(part: dict, kind: str, where: str) -> tuple[str, dict]:
    """The url of an image_url / video_url part (a string or {"url": ...}) and the dict holding it."""
    value = part.get(kind)
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        return value["url"], value
    raise RequestError(f"{where}: a {kind} part needs '{kind}': {{'url': ...}}", param=where)


# ---- messages --------------------------------------------------------------------------------------
def _convert_message(
    index: int, message: Any, defaults: dict, policy: MediaPolicy, cache, media: list[MediaItem]
) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object", param=where)
    role = message.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise RequestError(
            f"{where}.role must be system, user or assistant, got {role!r}", param=f"{where}.role"
        )
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{pwhere}.text must be a string", param=pwhere)
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url"):
            if role != "user":
                raise RequestError(f"{pwhere}: media may only stand in user turns", param=pwhere)
            media_kind = kind.split("_")[0]
            url, holder = _media_url(part, kind, pwhere)
            own = {**_sampling(part, policy), **_sampling(holder, policy)}
            sampling = {**defaults, **own} if media_kind == "video" else {}
            if "num_frames" in own and "fps" not in own:
                sampling.pop("fps", None)  # the part's frame count overrides the body's rate
            if "fps" in sampling:
                sampling.setdefault("max_frames", policy.max_num_frames)  # fps alone must stay bounded
            item = load_media(url, media_kind, pwhere, sampling, policy, cache)
            media.append(item)
            parts.append({"type": media_kind, "item": item})
        else:
            raise RequestError(f"{pwhere}: unknown content part type {kind!r}", param=pwhere)
    return {"role": role, "content": parts}


def parse_chat_request(body: Any, policy: MediaPolicy, cache: EmbeddingCache | None = None) -> ChatRequest:
    """Validate an OpenAI chat-completions body and resolve its media (RequestError on any problem)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    if _number(body, "n", 1, int, low=1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    if body.get("stop"):
        raise RequestError("'stop' sequences are not supported", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number(
        {"max_tokens": max_tokens}, "max_tokens", policy.default_max_tokens, int, 1, policy.max_tokens_limit
    )
    temperature = _number(body, "temperature", policy.default_temperature, float, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, float, low=1e-6, high=1.0)
    seed = _number(body, "seed", None, int)
    stream, ignore_eos = body.get("stream", False), body.get("ignore_eos", False)
    for name, value in (("stream", stream), ("ignore_eos", ignore_eos)):
        if not isinstance(value, bool):
            raise RequestError(f"'{name}' must be a boolean", param=name)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    defaults = {"num_frames": policy.default_num_frames, **_sampling(body, policy)}
    media: list[MediaItem] = []
    converted = [
        _convert_message(index, message, defaults, policy, cache, media)
        for index, message in enumerate(messages)
    ]
    if converted[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", param="messages")
    if any(p["type"] != "text" for m in converted if m["role"] == "system" for p in m["content"]):
        raise RequestError("a system message holds text only", param="messages")
    return ChatRequest(
        messages=converted,
        media=media,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        seed=seed,
        ignore_eos=ignore_eos,
    )


# ---- the prompt's token layout ---------------------------------------------------------------------
def layout_processor(processor):
    """A shallow copy of `processor` whose frames become (F, 3, 1, 1) zeros: it lays out the same
    token ids (one block of `<image>` tokens per frame) without resizing any pixels, for media whose
    embeddings are cached or encoded separately."""
    layout = copy.copy(processor)
    layout.preprocess_frames = lambda frames: torch.zeros(frames.shape[0], 3, 1, 1)
    return layout


def prompt_ids(layout, request: ChatRequest) -> torch.Tensor:
    """(T,) token ids of the request's prompt, ending with the assistant's generation prompt."""
    placeholder = []
    for message in request.messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "text":
                parts.append(part)
            else:
                count = part["item"].num_frames
                parts.append({"type": part["type"], part["type"]: np.zeros((count, 1, 1, 3), np.uint8)})
        placeholder.append({"role": message["role"], "content": parts})
    try:
        sample = layout(placeholder, frames_sampled=True)
    except (TypeError, ValueError) as exc:
        raise RequestError(str(exc), param="messages") from exc
    return sample["input_ids"]
