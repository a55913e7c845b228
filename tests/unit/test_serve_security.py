"""`longvila serve`'s limits, through the official `openai` client and raw sockets on loopback:
the API key, which local files a request may name, the body limit, stalled clients, the queue bound,
server-side caps, and a streaming client that disconnects."""

import base64
import json
import socket
import time

import numpy as np
import pytest
from _models import lively_tiny_model
from _serve_helpers import start_queued, wait_idle

from longvila.data.synthetic import write_mp4 as write_video
from longvila.serve.engine import describe
from longvila.serve.server import create_server

openai = pytest.importorskip("openai")

KEY = "sekret-key"
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("media")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    inside = write_video(root / "clip.mp4", frames)
    secret = write_video(outside / "secret.mp4", frames)  # a valid video: only the policy may refuse it
    (root / "escape.mp4").symlink_to(secret)
    (root / "sub").mkdir()
    return {"root": root, "inside": inside, "secret": secret}


@pytest.fixture(scope="module")
def server(tiny_processor, files):
    with create_server(
        lively_tiny_model(),
        tiny_processor,
        port=0,
        model_name="tiny",
        num_frames=4,
        api_key=KEY,
        allowed_local_media_path=files["root"],
        max_body_bytes=BODY_LIMIT,
        timeout_header_s=1.0,
        timeout_body_s=1.0,
        max_num_frames=8,
        max_fps=2.0,
        max_tokens_limit=4096,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=60, max_retries=0)


def video_turn(url, **extra):
    part = {"type": "video_url", "video_url": {"url": str(url), **extra}}
    return [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]


def address(server):
    return server.socket.getsockname()[:2]


def raw_exchange(server, data: bytes, timeout: float = 30) -> bytes:
    """Send `data` on a fresh connection; everything the server answers until it closes or goes quiet."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"content-length: " in b"".join(chunks):
                    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                    length = (
                        int(head.split(b"content-length: ")[-1].split(b"\r\n")[0])
                        if b"content-length: " in head
                        else 0
                    )
                    if len(rest) >= length:
                        break
        except TimeoutError:
            pass
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def post_head(length: int | None, key: str | None = KEY, chunked: bool = False) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_api_key_is_required_on_v1_routes(server, files):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="tiny", messages=video_turn(files["inside"]), max_tokens=2)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    assert status_of(raw_exchange(server, post_head(len(body), key=None) + body)) == 401
    health = raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(health) == 200  # /health and /metrics stay open, as in vLLM


def test_allowed_file_is_read(server, client, files):
    reply = client.chat.completions.create(
        model="tiny", messages=video_turn(files["inside"], num_frames=3), max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None and reply.usage.prompt_tokens > 3 * 16
    reply = client.chat.completions.create(
        model="tiny", messages=video_turn(files["inside"].as_uri()), max_tokens=4, temperature=0
    )
    assert reply.usage.completion_tokens >= 1


def test_forbidden_and_missing_files_get_one_identical_refusal(server, client, files):
    root = files["root"]
    forbidden = {
        "outside the root": files["secret"],
        "dot-dot traversal": f"{root}/sub/../../outside/secret.mp4",
        "symlink escaping the root": root / "escape.mp4",
        "file:///etc/passwd": "file:///etc/passwd",
        "/etc/passwd": "/etc/passwd",
        "missing file": root / "missing.mp4",
        "a directory": root / "sub",
        "file URL with a host": f"file://example.com{files['inside']}",
    }
    messages = set()
    for name, url in forbidden.items():
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=video_turn(url), max_tokens=2)
        assert info.value.status_code == 400, name
        assert info.value.body["code"] == "media_unavailable", name
        messages.add(info.value.body["message"])
    assert len(messages) == 1, messages  # nothing tells a client which paths exist
    assert "secret" not in messages.pop()


def test_without_a_media_root_only_data_urls_are_read(tiny_processor, files):
    with create_server(lively_tiny_model(), tiny_processor, port=0, model_name="tiny", num_frames=2) as bare:
        client = openai.OpenAI(base_url=f"{bare.url}/v1", api_key="unused", timeout=60, max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=video_turn(files["inside"]), max_tokens=2)
        assert info.value.body["code"] == "media_unavailable"
        data = base64.b64encode(files["inside"].read_bytes()).decode()
        reply = client.chat.completions.create(
            model="tiny", messages=video_turn(f"data:video/mp4;base64,{data}"), max_tokens=2
        )
        assert reply.usage.prompt_tokens > 2 * 16


def test_oversized_bodies_get_413(server, client):
    response = raw_exchange(server, post_head(50 * BODY_LIMIT))  # refused on the header alone
    assert status_of(response) == 413
    assert b"larger than" in response
    # A chunked body declares no length: it is refused once what arrived passes the limit.
    chunk = b"x" * (256 * 1024)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
    assert status_of(raw_exchange(server, post_head(None, chunked=True) + body)) == 413
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * (2 * BODY_LIMIT)}], max_tokens=2
        )
    assert info.value.status_code == 413


def test_stalled_connections_do_not_stop_a_good_request(server, client, files):
    stalled = []
    try:
        for i in range(64):
            sock = socket.create_connection(address(server), timeout=10)
            if i % 2:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
            else:
                sock.sendall(post_head(1000) + b'{"messages": ')  # the body never ends
            stalled.append(sock)
        reply = client.chat.completions.create(
            model="tiny", messages=video_turn(files["inside"], num_frames=2), max_tokens=4, temperature=0
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        # The server drops them itself: slow headers are closed, slow bodies answered 408.
        for i, sock in enumerate(stalled):
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            if i % 2:
                assert answer == b"", answer
            else:
                assert status_of(answer) == 408, answer
    finally:
        for sock in stalled:
            sock.close()


def test_caps_on_frames_fps_and_max_tokens(server, client, files):
    cases = {
        "num_frames": dict(messages=video_turn(files["inside"], num_frames=9)),
        "fps": dict(messages=video_turn(files["inside"], fps=3.0)),
        "max_frames": dict(messages=video_turn(files["inside"], max_frames=100)),
        "max_tokens": dict(messages=[{"role": "user", "content": "hi"}], max_tokens=4097),
        "body num_frames": dict(messages=video_turn(files["inside"]), extra_body={"num_frames": 50}),
    }
    for name, kwargs in cases.items():
        kwargs.setdefault("max_tokens", 2)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", **kwargs)
        assert "must be within" in info.value.body["message"], name
    # fps within the cap decodes at most max_num_frames frames
    reply = client.chat.completions.create(
        model="tiny", messages=video_turn(files["inside"], fps=2.0), max_tokens=1
    )
    assert reply.usage.prompt_tokens < 9 * 20


def test_a_full_queue_answers_429(server, client):
    engine = server.engine
    limit = engine.config.max_pending
    engine.config.max_pending = 2
    results = []

    def ask():
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "queued"}], max_tokens=2
        )
        results.append(reply.choices[0].finish_reason)

    try:
        with engine.hold():
            threads = start_queued(engine, [ask, ask])
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
            assert info.value.status_code == 429 and info.value.body["code"] == "queue_full"
        for thread in threads:
            thread.join(timeout=60)
    finally:
        engine.config.max_pending = limit
    assert len(results) == 2


def test_a_disconnected_streaming_client_stops_its_generation(server):
    engine = server.engine
    wait_idle(engine)
    before = describe(engine)
    max_tokens = 4000  # minutes of decoding on this CPU if it were not stopped
    body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,  # only the disconnect may end it early
        }
    ).encode()
    sock = socket.create_connection(address(server), timeout=30)
    sock.sendall(post_head(len(body)) + body)
    received = b""
    while received.count(b"data: ") < 3:  # the role chunk and the first pieces of text
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    wait_idle(engine)
    after = describe(engine)
    generated = after["generation_tokens"] - before["generation_tokens"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert 1 <= generated < max_tokens // 4, generated
    # The server goes on serving.
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=60, max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=2
    )
    assert reply.usage.completion_tokens >= 1


def test_a_disconnected_plain_client_stops_its_generation(server):
    engine = server.engine
    wait_idle(engine)
    before = describe(engine)
    max_tokens = 4000
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Go on and on."}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
    ).encode()
    sock = socket.create_connection(address(server), timeout=30)
    sock.sendall(post_head(len(body)) + body)
    deadline = time.time() + 60
    while not engine.running and time.time() < deadline:  # generating: the answer is not written yet
        time.sleep(0.01)
    sock.close()
    wait_idle(engine)
    after = describe(engine)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["generation_tokens"] - before["generation_tokens"] < max_tokens // 4


def test_request_timeout_answers_504(server, client):
    settings = server.settings
    settings.timeout_request_s = 0.5
    try:
        with server.engine.hold():  # the request waits in the queue past its deadline
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "late"}])
        assert info.value.status_code == 504 and "longer than 0.5 s" in info.value.body["message"]
    finally:
        settings.timeout_request_s = None
    wait_idle(server.engine)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "on time"}], max_tokens=2
    )
    assert reply.usage.completion_tokens >= 1


def test_an_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and "'tiny'" in info.value.body["message"]


def test_a_changed_file_is_hashed_again(server, client, files, tmp_path):
    """The hash memo is keyed by the file's identity and times: rewriting the file gives a new key."""
    video = files["root"] / "changing.mp4"
    rng = np.random.default_rng(9)
    write_video(video, rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8))
    calls = describe(server.engine)["vision_tower_calls"]
    ask = lambda: client.chat.completions.create(
        model="tiny", messages=video_turn(video, num_frames=2), max_tokens=2
    )
    ask()
    ask()
    assert describe(server.engine)["vision_tower_calls"] == calls + 1
    write_video(tmp_path / "new.mp4", rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)).replace(video)
    ask()
    assert describe(server.engine)["vision_tower_calls"] == calls + 2


def test_metrics_are_exposed(server, client):
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "count me"}], max_tokens=2
    )
    text = raw_exchange(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").decode()
    for name in (
        "longvila_num_requests_waiting",
        "longvila_generation_tokens_per_second",
        "longvila_time_to_first_token_seconds_count",
        "longvila_embedding_cache_hits_total",
        "longvila_prefix_cache_hits_total",
    ):
        assert f"\n{name}" in text, name
    count = float(text.split("longvila_time_to_first_token_seconds_count ")[1].split()[0])
    assert count >= 1
