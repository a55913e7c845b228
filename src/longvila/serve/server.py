"""An OpenAI-compatible HTTP server for one LongVILA model (standard library only).

Endpoints: `POST /v1/chat/completions` (streamed as server-sent events or not), `GET /v1/models`,
`GET /health`. Message content parts: `text`, `image_url` and `video_url`, whose `url` is a file path, a
`file://` URL or a base64 `data:` URL; `num_frames` / `fps` / `max_frames` may stand in the request body
(for all videos) or in a part (for that video).

Why the standard library: one model serves one request at a time anyway, so an async framework would
only move the queue from a lock into an executor; `ThreadingHTTPServer` gives each connection a thread
that waits on the model lock, generation never blocks the accept loop, and the package needs no web
dependencies. Each request's media are decoded before it takes the lock, so decoding overlaps with
another request's generation.

Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for
anything wrong with the request (missing or undecodable media, a prompt longer than the context,
malformed JSON or fields) and the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from longvila.chat import (
    ContextLengthError,
    TextStreamer,
    check_context,
    load_image_array,
    load_video_frames,
)

MAX_BODY_BYTES = 512 * 1024 * 1024
_MIME_SUFFIX = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/avi": ".avi"}


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 404:
            kind = "not_found_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    """Processor messages, media already decoded to uint8 arrays."""
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool = False
    seed: int | None = None
    longest_video: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


# ---- request parsing -------------------------------------------------------------------------------
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


def _sampling(source: dict) -> dict[str, Any]:
    """num_frames / fps / max_frames given in `source` (the body, a part, or a part's video_url)."""
    out = {}
    for name, kind in (("num_frames", int), ("fps", float), ("max_frames", int)):
        if source.get(name) is not None:
            out[name] = _number(source, name, None, kind, low=1 if kind is int else 1e-6)
    return out


def _media_url(part: dict, kind: str, where: str) -> tuple[str, dict]:
    """The url of an image_url / video_url part (a string or {"url": ...}) and the dict holding it."""
    value = part.get(kind)
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        return value["url"], value
    raise RequestError(f"{where}: a {kind} part needs '{kind}': {{'url': ...}}", param=where)


def _materialise(url: str, where: str, tmp: list[str], kind: str) -> str:
    """A local path for a path, file:// URL or base64 data URL (written to a temporary file)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError(f"{where}: only base64 data URLs are supported", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"{where}: the data URL is not valid base64", param=where) from exc
        mime = header[5:].split(";")[0]
        suffix = _MIME_SUFFIX.get(mime, ".png" if kind == "image" else ".mp4")
        handle, path = tempfile.mkstemp(prefix="longvila-", suffix=suffix)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        tmp.append(path)
        return path
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme in ("http", "https"):
        raise RequestError(
            f"{where}: remote URLs are not fetched; pass a local path or a data URL", param=where
        )
    return url


def _load_media(kind: str, path: str, where: str, sampling: dict) -> np.ndarray:
    try:
        if kind == "image":
            return load_image_array(path)
        return load_video_frames(
            path, sampling.get("num_frames"), sampling.get("fps"), sampling.get("max_frames")
        )
    except FileNotFoundError as exc:
        raise RequestError(f"{where}: {exc}", param=where, code="file_not_found") from exc
    except ValueError as exc:
        raise RequestError(f"{where}: {exc}", param=where, code="invalid_media") from exc


def _convert_message(index: int, message: Any, defaults: dict, tmp: list[str]) -> tuple[dict, int]:
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
        return {"role": role, "content": [{"type": "text", "text": content}]}, 0
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    parts, longest = [], 0
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{pwhere}.text must be a string", param=pwhere)
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url"):
            if role == "assistant":
                raise RequestError(f"{pwhere}: media may only stand in user or system turns", param=pwhere)
            media = kind.split("_")[0]
            url, holder = _media_url(part, kind, pwhere)
            own = {**_sampling(part), **_sampling(holder)}
            sampling = {**defaults, **own}
            if "num_frames" in own and "fps" not in own:
                sampling.pop("fps", None)  # the part's frame count overrides the body's rate
            frames = _load_media(media, _materialise(url, pwhere, tmp, media), pwhere, sampling)
            if media == "video":
                longest = max(longest, frames.shape[0])
            parts.append({"type": media, media: frames})
        else:
            raise RequestError(f"{pwhere}: unknown content part type {kind!r}", param=pwhere)
    if role == "system" and any(p["type"] != "text" for p in parts):
        raise RequestError(f"{where}: a system message holds text only", param=where)
    return {"role": role, "content": parts}, longest


def parse_chat_request(
    body: Any, *, default_max_tokens: int, default_temperature: float, default_num_frames: int
) -> ChatRequest:
    """Validate an OpenAI chat-completions body and decode its media (RequestError on any problem)."""
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
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int, low=1)
    temperature = _number(body, "temperature", default_temperature, float, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, float, low=1e-6, high=1.0)
    seed = _number(body, "seed", None, int)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    defaults = {"num_frames": default_num_frames, **_sampling(body)}
    tmp: list[str] = []
    try:
        converted, longest = [], 0
        for index, message in enumerate(messages):
            message, frames = _convert_message(index, message, defaults, tmp)
            converted.append(message)
            longest = max(longest, frames)
    finally:
        for path in tmp:
            Path(path).unlink(missing_ok=True)
    if converted[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", param="messages")
    return ChatRequest(
        messages=converted,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        seed=seed,
        longest_video=longest,
    )


# ---- the model worker ------------------------------------------------------------------------------
class ModelWorker:
    """One model, one request at a time: prompts are built outside the lock, generation inside it."""

    def __init__(
        self,
        model,
        processor,
        *,
        model_name: str,
        max_tokens: int = 512,
        temperature: float = 0.0,
        num_frames: int | None = None,
    ):
        self.model = model
        self.num_frames = num_frames or processor.num_frames
        self.processor = processor
        self.model_name = model_name
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.lock = threading.Lock()
        self.created = int(time.time())

    def prompt(self, request: ChatRequest) -> dict[str, torch.Tensor]:
        try:
            # Frames were sampled while decoding; the limit only keeps the processor from resampling.
            limit = max(request.longest_video, 1)
            sample = self.processor(request.messages, num_frames=limit, max_frames=limit)
        except (TypeError, ValueError) as exc:
            raise RequestError(str(exc), param="messages") from exc
        try:
            check_context(self.model, sample["input_ids"].shape[0], request.max_tokens)
        except ContextLengthError as exc:
            raise RequestError(str(exc), param="messages", code="context_length_exceeded") from exc
        return self.processor.collate([sample])

    def generate(
        self, request: ChatRequest, batch: dict[str, torch.Tensor], on_text=None
    ) -> tuple[str, int, str]:
        """(answer, completion tokens, finish reason); `on_text` receives pieces as they decode."""
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        streamer = TextStreamer(self.processor, on_text or (lambda piece: None))
        with self.lock:
            new_ids = self.model.generate(
                **batch,
                max_new_tokens=request.max_tokens,
                do_sample=request.temperature > 0,
                temperature=request.temperature if request.temperature > 0 else 1.0,
                top_p=request.top_p,
                generator=generator,
                eos_token_id=self.processor.stop_token_ids,
                streamer=streamer,
            )
        ids = new_ids[0].tolist()
        stops = set(self.processor.stop_token_ids)
        used = next((i for i, token in enumerate(ids) if token in stops), None)
        finish = "stop" if used is not None else "length"
        return self.processor.decode(ids), len(ids) if used is None else used + 1, finish


# ---- HTTP ------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LongVILAServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing
    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, error.body())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError("a Content-Length header is required", status=411)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"the body is larger than {MAX_BODY_BYTES} bytes", status=413)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON ({exc})") from exc

    # -- routes
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        worker = self.server.worker
        if self.path == "/health":
            self._send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            entry = {
                "id": worker.model_name,
                "object": "model",
                "created": worker.created,
                "owned_by": "longvila",
            }
            self._send_json(200, {"object": "list", "data": [entry]})
        elif self.path == "/v1/chat/completions":
            self._send_error(RequestError("use POST for /v1/chat/completions", status=405))
        else:
            self._send_error(RequestError(f"no route {self.path}", status=404))

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v1/chat/completions":
            self._send_error(RequestError(f"no route {self.path}", status=404))
            return
        worker = self.server.worker
        try:
            body = self._read_json()
            request = parse_chat_request(
                body,
                default_max_tokens=worker.max_tokens,
                default_temperature=worker.temperature,
                default_num_frames=worker.num_frames,
            )
            batch = worker.prompt(request)
        except RequestError as error:
            self._send_error(error)
            return
        prompt_tokens = int(batch["input_ids"].shape[1])
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            self._stream(request, batch, completion_id, prompt_tokens)
            return
        try:
            text, used, finish = worker.generate(request, batch)
        except Exception as exc:  # noqa: BLE001 - report and keep serving
            self._send_error(RequestError(f"generation failed: {exc}", status=500))
            return
        self._send_json(
            200,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": worker.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": used,
                    "total_tokens": prompt_tokens + used,
                },
            },
        )

    def _stream(self, request: ChatRequest, batch, completion_id: str, prompt_tokens: int) -> None:
        worker = self.server.worker
        created = int(time.time())

        def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> None:
            chunk: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": worker.model_name,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                chunk["usage"] = usage
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            event({"role": "assistant", "content": ""})
            _, used, finish = worker.generate(request, batch, on_text=lambda piece: event({"content": piece}))
            event({}, finish)
            if request.include_usage:
                total = prompt_tokens + used
                event(
                    None,
                    usage={"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": total},
                )
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; generation stopped at its next token
            return
        except Exception as exc:  # noqa: BLE001 - the status is sent already: report in the stream
            error = RequestError(f"generation failed: {exc}", status=500).body()
            self._chunk(f"data: {json.dumps(error)}\n\n".encode())
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")


class LongVILAServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` holding the `ModelWorker`; `port=0` picks a free port."""

    daemon_threads = True

    def __init__(
        self, worker: ModelWorker, host: str = "127.0.0.1", port: int = 8000, *, verbose: bool = False
    ):
        self.worker = worker
        self.verbose = verbose
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def create_server(
    model,
    processor,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "longvila",
    max_tokens: int = 512,
    temperature: float = 0.0,
    num_frames: int | None = None,
    verbose: bool = False,
) -> LongVILAServer:
    """A server bound to (host, port), not yet serving: call `serve_forever()` (and `shutdown()`).

    `max_tokens`, `temperature` and `num_frames` are the defaults for requests that leave them out.
    """
    worker = ModelWorker(
        model,
        processor,
        model_name=model_name,
        max_tokens=max_tokens,
        temperature=temperature,
        num_frames=num_frames,
    )
    return LongVILAServer(worker, host, port, verbose=verbose)
