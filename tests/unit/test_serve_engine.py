"""The serving engine: dynamic batching, the frame-embedding cache and prefix K/V reuse, each checked
against direct `model.generate` on a model whose replies vary with the input."""

import numpy as np
import pytest
import torch
from _models import lively_tiny_model
from _serve_helpers import start_queued
from PIL import Image

from longvila.data.synthetic import write_mp4 as write_video
from longvila.serve.cache import EmbeddingCache, LRUBytes, PrefixCache, common_prefix
from longvila.serve.engine import describe
from longvila.serve.server import create_server

openai = pytest.importorskip("openai")

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    rng = np.random.default_rng(3)
    videos = [
        write_video(root / f"v{i}.mp4", rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8))
        for i in range(3)
    ]
    image = root / "img.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    return {"root": root, "videos": videos, "image": image}


@pytest.fixture(scope="module")
def server(tiny_processor, media):
    model = lively_tiny_model(seed=1)
    with create_server(
        model, tiny_processor, port=0, model_name="tiny", num_frames=4, allowed_local_media_path=media["root"]
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture
def tower_calls(server):
    """Counts forward calls of the vision tower (a hook on the module, independent of the engine)."""
    calls = []
    handle = server.engine.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()


def api_turn(video=None, image=None, text="What happens?", num_frames=None):
    parts = []
    if video is not None:
        extra = {} if num_frames is None else {"num_frames": num_frames}
        parts.append({"type": "video_url", "video_url": {"url": str(video), **extra}})
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": str(image)}})
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def processor_messages(messages, default_frames=4):
    """The same conversation for the processor (videos as paths, images as arrays)."""
    from longvila.chat import load_image_array

    out, frames = [], default_frames
    for message in messages:
        if isinstance(message["content"], str):
            out.append(message)
            continue
        parts = []
        for part in message["content"]:
            if part["type"] == "video_url":
                frames = part["video_url"].get("num_frames", default_frames)
                parts.append({"type": "video", "video": part["video_url"]["url"]})
            elif part["type"] == "image_url":
                parts.append({"type": "image", "image": load_image_array(part["image_url"]["url"])})
            else:
                parts.append(part)
        out.append({"role": message["role"], "content": parts})
    return out, frames


def direct(server, messages, max_tokens=MAX_TOKENS, temperature=0.0, seed=None):
    processor, model = server.engine.processor, server.engine.model
    converted, frames = processor_messages(messages)
    sample = processor(converted, num_frames=frames)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    new_ids = model.generate(
        **processor.collate([sample]),
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        generator=generator,
    )
    return processor.decode(new_ids[0])


def ask(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def test_a_repeated_video_is_not_encoded_again_and_reuses_the_prefix(server, client, media, tower_calls):
    video = media["videos"][0]
    first = ask(client, [api_turn(video, num_frames=6)])
    assert len(tower_calls) == 1
    before = describe(server.engine)
    second = ask(client, [api_turn(video, num_frames=6)])
    assert len(tower_calls) == 1  # the frame embeddings came from the cache
    after = describe(server.engine)
    assert after["embedding_cache_hits"] > before["embedding_cache_hits"]
    # Every prompt token but the last came from the prefix cache.
    assert after["prefix_tokens_reused"] - before["prefix_tokens_reused"] == second.usage.prompt_tokens - 1
    want = direct(server, [api_turn(video, num_frames=6)])
    assert first.choices[0].message.content == second.choices[0].message.content == want


def test_another_question_on_the_same_video_reuses_its_prefix(server, client, media, tower_calls):
    video = media["videos"][1]
    ask(client, [api_turn(video, text="Who is there?")])
    before = describe(server.engine)
    reply = ask(client, [api_turn(video, text="What colour is the sky?")])
    reused = describe(server.engine)["prefix_tokens_reused"] - before["prefix_tokens_reused"]
    assert reused >= 4 * server.engine.model.config.tokens_per_frame  # the whole video
    assert len(tower_calls) == 1
    assert reply.choices[0].message.content == direct(
        server, [api_turn(video, text="What colour is the sky?")]
    )


def test_multi_turn_chat_reuses_the_previous_turn(server, client, media):
    video = media["videos"][2]
    turn1 = [api_turn(video, text="Describe the video.")]
    first = ask(client, turn1)
    answer = first.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    before = describe(server.engine)
    second = ask(client, turn2)
    reused = describe(server.engine)["prefix_tokens_reused"] - before["prefix_tokens_reused"]
    assert reused >= first.usage.prompt_tokens - 1
    assert second.choices[0].message.content == direct(server, turn2)


def test_another_video_with_the_same_token_ids_shares_no_frames(server, client, media):
    """Two videos lay out identical token ids; only the text before the first frame may be reused."""
    ask(client, [api_turn(media["videos"][0], num_frames=3)])
    before = describe(server.engine)
    other = [api_turn(media["videos"][1], num_frames=3)]
    reply = ask(client, other)
    reused = describe(server.engine)["prefix_tokens_reused"] - before["prefix_tokens_reused"]
    processor = server.engine.processor
    converted, frames = processor_messages(other)
    ids = processor(converted, num_frames=frames)["input_ids"]
    first_frame = int((ids == server.engine.model.config.image_token_id).nonzero()[0])
    assert reused <= first_frame
    assert reply.choices[0].message.content == direct(server, other)


def test_sixteen_concurrent_requests_are_batched_and_equal_direct_generation(server, client, media):
    requests = []
    for i in range(16):
        video = media["videos"][i % 3] if i % 4 else None
        image = media["image"] if i % 5 == 0 else None
        kwargs = {"temperature": 0.8, "seed": 100 + i} if i % 6 == 0 else {}
        requests.append(
            ([api_turn(video, image, text=f"Question {i}: what now?", num_frames=2 + i % 5)], kwargs)
        )
    answers: dict[int, str] = {}

    def run(index):
        messages, kwargs = requests[index]
        answers[index] = ask(client, messages, **kwargs).choices[0].message.content

    engine = server.engine
    with engine.hold():  # let all 16 queue up, so that they form one batch
        threads = start_queued(engine, [lambda i=i: run(i) for i in range(16)])
    for thread in threads:
        thread.join(timeout=300)
    assert describe(engine)["batch_sizes"][-1] == 16
    assert len(set(answers.values())) > 8  # the replies vary, so equality below means something
    for i, (messages, kwargs) in enumerate(requests):
        want = direct(server, messages, temperature=kwargs.get("temperature", 0.0), seed=kwargs.get("seed"))
        assert answers[i] == want, i


def test_lru_bytes_evicts_the_least_recently_used():
    cache = LRUBytes(100)
    assert cache.put("a", 1, 40) and cache.put("b", 2, 40)
    assert cache.get("a") == 1  # a is now the most recent
    assert cache.put("c", 3, 40)  # evicts b
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.bytes == 80 and (cache.hits, cache.misses) == (3, 1)
    assert not cache.put("huge", 4, 101) and len(cache) == 2
    with pytest.raises(ValueError, match="budget"):
        LRUBytes(-1)


def test_embedding_cache_counts_tensor_bytes():
    cache = EmbeddingCache(1000)
    assert cache.put_embeddings("v", torch.zeros(2, 3, 10))  # 240 bytes
    assert cache.bytes == 240
    assert not cache.put_embeddings("w", torch.zeros(300))  # 1200 bytes: larger than the budget


def test_prefix_cache_returns_the_longest_shared_prefix():
    kv = lambda n: [(torch.arange(n, dtype=torch.float32).view(1, 1, n, 1), -torch.ones(1, 1, n, 1))]
    cache = PrefixCache(10_000)
    cache.store(np.array([1, 2, 3, 4, 5]), kv(5))
    cache.store(np.array([1, 2, 9]), kv(3))
    shared, found = cache.lookup(np.array([1, 2, 3, 4, 7, 8]))
    assert shared == 4 and found[0][0].flatten().tolist() == [0, 1, 2, 3]
    shared, found = cache.lookup(np.array([1, 2, 3, 4, 5]))  # identical: one token is left to prefill
    assert shared == 4
    assert cache.lookup(np.array([7, 1]))[0] == 0
    assert common_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2
