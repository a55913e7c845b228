"""`longvila serve` on loopback, driven by the official `openai` client."""

import base64
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _models import lively_tiny_model
from PIL import Image

from longvila.chat import load_image_array
from longvila.data.synthetic import write_mp4 as write_video
from longvila.serve.server import create_server

openai = pytest.importorskip("openai")

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    video = write_video(root / "clip.mp4", rng.integers(0, 255, (10, 64, 64, 3), dtype=np.uint8))
    image = root / "picture.png"
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(image)
    broken = root / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 40)
    return {"video": video, "image": image, "broken": broken, "root": root}


@pytest.fixture(scope="module")
def server(tiny_processor, media):
    model = lively_tiny_model()
    with create_server(
        model, tiny_processor, port=0, model_name="tiny", num_frames=4, allowed_local_media_path=media["root"]
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def direct(server, content, num_frames=4):
    """What model.generate answers, greedily, for one user turn given as processor parts."""
    processor, model = server.engine.processor, server.engine.model
    sample = processor([{"role": "user", "content": content}], num_frames=num_frames)
    new_ids = model.generate(**processor.collate([sample]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.decode(new_ids[0])


def test_answer_equals_direct_generation(server, client, media):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": str(media["video"])}},
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"num_frames": 3},
    )
    want = direct(
        server,
        [{"type": "video", "video": str(media["video"])}, {"type": "text", "text": "What happens?"}],
        3,
    )
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 3 * 16
    assert reply.model == "tiny"


def test_streamed_answer_equals_direct_generation(server, client, media):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": media["video"].as_uri(), "num_frames": 5}},
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = direct(
        server, [{"type": "video", "video": str(media["video"])}, {"type": "text", "text": "Describe it."}], 5
    )
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1


def test_base64_image_and_video(server, client, media):
    image64 = base64.b64encode(media["image"].read_bytes()).decode()
    video64 = base64.b64encode(media["video"].read_bytes()).decode()
    reply = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image64}"}},
                    {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{video64}"}},
                    {"type": "text", "text": "Compare."},
                ],
            },
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    processor, model = server.engine.processor, server.engine.model
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": load_image_array(media["image"])},
                {"type": "video", "video": str(media["video"])},
                {"type": "text", "text": "Compare."},
            ],
        },
    ]
    new_ids = model.generate(
        **processor.collate([processor(messages, num_frames=4)]), max_new_tokens=MAX_TOKENS
    )
    assert reply.choices[0].message.content == processor.decode(new_ids[0])


def test_twenty_concurrent_requests(server, client, media):
    questions = [f"Question number {i}?" for i in range(20)]

    def ask(question):
        content = [
            {"type": "image_url", "image_url": {"url": str(media["image"])}},
            {"type": "text", "text": question},
        ]
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": content}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, questions))
    for question, answer in zip(questions, answers):
        image = load_image_array(media["image"])  # the processor mishandles image paths (reported)
        want = direct(server, [{"type": "image", "image": image}, {"type": "text", "text": question}])
        assert answer == want


def post_raw(server, data: bytes):
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def user_video(url, **extra):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(url)}, **extra}]}]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client, media):
    cases = {
        "missing file": dict(messages=user_video(media["root"] / "nope.mp4")),
        "undecodable video": dict(messages=user_video(media["broken"])),
        "unknown part": dict(
            messages=[{"role": "user", "content": [{"type": "audio_url", "audio_url": "x"}]}]
        ),
        "bad max_tokens": dict(
            messages=[{"role": "user", "content": "hi"}], extra_body={"max_tokens": "ten"}
        ),
        "bad num_frames": dict(messages=user_video(media["video"], num_frames="many")),
        "bad role": dict(messages=[{"role": "robot", "content": "hi"}]),
        "remote url": dict(messages=user_video("https://example.com/v.mp4")),
    }
    for name, kwargs in cases.items():
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", max_tokens=4, **kwargs)
        error = info.value.body
        assert info.value.status_code == 400, name
        assert error["type"] == "invalid_request_error" and error["message"], name
    missing = media["root"] / "nope.mp4"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=user_video(missing))
    assert info.value.body["code"] == "media_unavailable"  # the same refusal as a forbidden file

    status, body = post_raw(server, b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = post_raw(server, b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"

    limit = server.engine.model.config.llm["max_position_embeddings"]
    server.engine.model.config.llm["max_position_embeddings"] = 64
    try:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=user_video(media["video"], num_frames=10))
        assert info.value.body["code"] == "context_length_exceeded"
    finally:
        server.engine.model.config.llm["max_position_embeddings"] = limit

    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Still there?"}], max_tokens=MAX_TOKENS
    )
    assert reply.choices[0].message.content == direct(server, [{"type": "text", "text": "Still there?"}])


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{server.url}/v2/nothing", timeout=10)
    assert info.value.code == 404
