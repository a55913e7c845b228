"""An OpenAI-compatible HTTP server for one LongVILA model, on Starlette + uvicorn.

Endpoints: `POST /v1/chat/completions` (streamed as server-sent events or not), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text). Message content parts: `text`, `image_url` and
`video_url` (see `longvila.serve.media` for what a `url` may be and which local files are readable).

Limits, all configurable (`ServerSettings`): `--api-key` on every `/v1` route (401); a body limit
(413, the connection closed); a deadline for the request headers and another for the body, so
stalled clients cannot hold the server; caps on frames, fps and max_tokens (400); at most
`max_pending` requests in flight (429 beyond; uvicorn answers 503 past `limit_concurrency`
connections); a client that disconnects has its generation stopped at the next token.

Generation runs on one engine thread that batches concurrent requests (`longvila.serve.engine`).
Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from longvila.chat import ContextLengthError, check_context
from longvila.serve.engine import Engine, EngineConfig, Job
from longvila.serve.media import (
    ChatRequest,
    MediaPolicy,
    RequestError,
    layout_processor,
    parse_chat_request,
    prompt_ids,
)

MiB = 1 << 20


@dataclass(kw_only=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port."""
    model_name: str = "longvila"
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on /v1 routes when set."""
    media: MediaPolicy = field(default_factory=MediaPolicy)
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_body_bytes: int = 64 * MiB
    timeout_header_s: float = 10.0
    """A connection must complete each request's headers within this (slow-header clients are dropped)."""
    timeout_body_s: float = 60.0
    """The whole body must arrive within this (408 otherwise)."""
    timeout_keep_alive_s: int = 5
    """uvicorn's idle keep-alive timeout between requests."""
    timeout_request_s: float | None = None
    """Arrival to last token; a request past it is stopped (504, or an error event when streamed)."""
    limit_concurrency: int = 1024
    """uvicorn answers 503 past this many connections."""
    verbose: bool = False


def _error(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class _Admission:
    """The engine's `pending` slot of one request, released exactly once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.held = True
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            if not self.held:
                return
            self.held = False
        self.engine.release()


# ---- ASGI pieces -----------------------------------------------------------------------------------
class ApiKeyMiddleware:
    """401 on /v1 routes without `Authorization: Bearer <key>` (vLLM's --api-key behaviour)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = RequestError("invalid or missing API key", status=401, code="invalid_api_key")
                await _error(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, or (408) when it has not
    all arrived within `timeout` seconds."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise RequestError(f"the body is larger than the server's limit of {limit} bytes", status=413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(
                        f"the body is larger than the server's limit of {limit} bytes", status=413
                    )
                chunks.append(chunk)
    except TimeoutError as exc:
        raise RequestError(f"the body did not arrive within {timeout:g} s", status=408) from exc
    return b"".join(chunks)


def guarded_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    `header_timeout` seconds of it opening or of its previous response (uvicorn itself only times out
    idle keep-alive connections, and any byte received resets that timer)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_deadline = self.loop.call_later(header_timeout, self._headers_overdue)

        def _headers_overdue(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._header_deadline.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(header_timeout, self._headers_overdue)

        def connection_lost(self, exc) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


# ---- the app ---------------------------------------------------------------------------------------
class ChatService:
    """The route handlers, over one `Engine`."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.layout = layout_processor(engine.processor)
        self.created = int(time.time())

    def prepare(self, body: Any) -> tuple[ChatRequest, Any]:
        """Parse, decode uncached media, lay out the prompt and check it fits (a worker thread)."""
        name = body.get("model") if isinstance(body, dict) else None
        if name is not None and name != self.settings.model_name:
            raise RequestError(
                f"the model {name!r} does not exist; this server serves {self.settings.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        request = parse_chat_request(body, self.settings.media, self.engine.embedding_cache)
        for item in request.media:
            if item.frames is not None:
                item.pixels = self.engine.processor.preprocess_frames(item.frames)
                item.frames = None
        ids = prompt_ids(self.layout, request)
        try:
            check_context(self.engine.model, ids.shape[0], request.max_tokens)
        except ContextLengthError as exc:
            raise RequestError(str(exc), param="messages", code="context_length_exceeded") from exc
        return request, ids

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        entry = {
            "id": self.settings.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "longvila",
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def metrics(self, request: Request) -> Response:
        engine = self.engine
        text = engine.metrics.render(
            waiting=engine.waiting,
            running=engine.running,
            pending=engine.pending,
            caches={"embedding": engine.embedding_cache, "prefix": engine.prefix_cache},
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        arrival = time.perf_counter()
        if not self.engine.try_admit():
            self.engine.metrics.count_request("rejected")
            limit = self.engine.config.max_pending
            error = RequestError(
                f"the server is busy ({limit} requests in flight); retry later", status=429, code="queue_full"
            )
            return _error(error, {"Retry-After": "1"})
        admission = _Admission(self.engine)
        try:
            return await self._chat(request, arrival, admission)
        except RequestError as error:
            admission.release()
            self.engine.metrics.count_request(f"error_{error.status}")
            # After a 413 the connection stays open, so uvicorn reads and drops the rest of the body:
            # closing with unread bytes would reset the connection and lose the answer to the client.
            return _error(error, {"Connection": "close"} if error.status == 408 else None)
        except ClientDisconnect:
            admission.release()  # gone while sending its body: nobody to answer
            self.engine.metrics.count_request("cancelled")
            return Response(status_code=499)
        except BaseException:
            admission.release()
            raise

    async def _chat(self, http: Request, arrival: float, admission: _Admission) -> Response:
        settings = self.settings
        raw = await read_body(http, settings.max_body_bytes, settings.timeout_body_s)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON ({exc})") from exc
        request, ids = await run_in_threadpool(self.prepare, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            if event[0] != "text":
                # The engine is done with the job: free its slot even if no handler is left to see
                # this (a stream whose client left before the response started is never iterated).
                admission.release()
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server shutting down)
                pass

        job = Job(request=request, input_ids=ids, emit=emit, arrival=arrival)
        self.engine.submit(job)
        watcher = asyncio.create_task(_cancel_on_disconnect(http, job))
        completion = Completion(
            id=f"chatcmpl-{uuid.uuid4().hex}", model=settings.model_name, prompt_tokens=int(ids.shape[0])
        )
        deadline = None if settings.timeout_request_s is None else arrival + settings.timeout_request_s

        async def next_event() -> tuple:
            if deadline is None:
                return await events.get()
            try:
                return await asyncio.wait_for(events.get(), max(deadline - time.perf_counter(), 0))
            except TimeoutError:
                job.cancel()
                return ("error", f"the request took longer than {settings.timeout_request_s:g} s", 504)

        def finish(outcome: str) -> None:
            job.cancel()  # a no-op for a finished job; stops one whose response ended early
            watcher.cancel()
            admission.release()
            self.engine.metrics.count_request(outcome)

        if request.stream:
            return StreamingResponse(
                self._stream(request, completion, next_event, finish),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        pieces: list[str] = []
        try:
            while True:
                event = await next_event()
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    status = event[2] if len(event) > 2 else 500
                    finish(f"error_{status}")
                    return _error(RequestError(event[1], status=status))
                else:
                    finish(event[1])
                    return JSONResponse(completion.reply("".join(pieces), event[1], event[2]))
        except BaseException:
            finish("cancelled")
            raise

    async def _stream(self, request: ChatRequest, completion: Completion, next_event, finish):
        outcome = "cancelled"
        try:
            yield completion.sse({"role": "assistant", "content": ""})
            while True:
                event = await next_event()
                if event[0] == "text":
                    yield completion.sse({"content": event[1]})
                    continue
                if event[0] == "error":
                    outcome = f"error_{event[2] if len(event) > 2 else 500}"
                    error = RequestError(event[1], status=event[2] if len(event) > 2 else 500)
                    yield f"data: {json.dumps(error.body())}\n\n"
                else:
                    outcome = event[1]
                    yield completion.sse({}, event[1])
                    if request.include_usage:
                        yield completion.sse(None, usage=completion.usage(event[2]))
                break
            yield "data: [DONE]\n\n"
        finally:
            finish(outcome)


async def _cancel_on_disconnect(http: Request, job: Job) -> None:
    """Wait for the client's `http.disconnect` and stop the job (a no-op once it has finished)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


@dataclass
class Completion:
    """Builds the OpenAI response bodies of one chat completion."""

    id: str
    model: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int) -> dict[str, int]:
        total = self.prompt_tokens + completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total,
        }

    def reply(self, text: str, finish: str, completion_tokens: int) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(completion_tokens),
        }

    def sse(self, delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"


def create_app(engine: Engine, settings: ServerSettings):
    """The ASGI app: routes, OpenAI-shaped errors, and the API-key check when a key is set."""
    service = ChatService(engine, settings)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = f"no route {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return _error(RequestError(message, status=exc.status_code))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", service.chat, methods=["POST"]),
            Route("/v1/models", service.models, methods=["GET"]),
            Route("/health", service.health, methods=["GET"]),
            Route("/metrics", service.metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.service = service
    return ApiKeyMiddleware(app, settings.api_key) if settings.api_key else app


# ---- the server ------------------------------------------------------------------------------------
class LongVILAServer:
    """uvicorn serving `create_app` on a socket bound at construction (so `url` is known at once)."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((settings.host, settings.port))
        config = uvicorn.Config(
            create_app(engine, settings),
            http=guarded_protocol(settings.timeout_header_s),
            lifespan="off",
            timeout_keep_alive=settings.timeout_keep_alive_s,
            limit_concurrency=settings.limit_concurrency,
            timeout_graceful_shutdown=10,  # in-flight requests get this long to finish on shutdown
            log_level="info" if settings.verbose else "warning",
            access_log=settings.verbose,
        )
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    def serve_forever(self) -> None:
        """Serve until `shutdown()` (or Ctrl-C when run on the main thread)."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self) -> LongVILAServer:
        """Serve on a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="longvila-http", daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.server_close()

    def server_close(self) -> None:
        self.engine.close()
        self.socket.close()

    def __enter__(self) -> LongVILAServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


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
    api_key: str | None = None,
    allowed_local_media_path: str | Path | None = None,
    verbose: bool = False,
    **limits: Any,
) -> LongVILAServer:
    """A server bound to (host, port), not yet serving: `start()` it (or `serve_forever()`), then
    `shutdown()`. `max_tokens`, `temperature`, `num_frames` are the defaults for requests that leave
    them out; `limits` sets other `ServerSettings`, `MediaPolicy` or `EngineConfig` fields by name."""
    groups = {"settings": {}, "media": {}, "engine": {}}
    for name, value in limits.items():
        group = next(
            (
                g
                for g, cls in (("settings", ServerSettings), ("media", MediaPolicy), ("engine", EngineConfig))
                if name in cls.__dataclass_fields__
            ),
            None,
        )
        if group is None:
            raise TypeError(f"create_server() got an unknown limit {name!r}")
        groups[group][name] = value
    policy = MediaPolicy(
        allowed_local_media_path=allowed_local_media_path,
        default_num_frames=num_frames or processor.num_frames,
        default_max_tokens=max_tokens,
        default_temperature=temperature,
        **groups["media"],
    )
    settings = ServerSettings(
        host=host,
        port=port,
        model_name=model_name,
        api_key=api_key,
        media=policy,
        engine=EngineConfig(**groups["engine"]),
        verbose=verbose,
        **groups["settings"],
    )
    return LongVILAServer(Engine(model, processor, settings.engine), settings)
