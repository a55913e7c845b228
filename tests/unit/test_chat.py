"""ChatSession and TextStreamer: answers equal direct generation; streamed text is whole characters."""

import numpy as np
import pytest
import torch
from _models import lively_tiny_model

from longvila import LongVILA, LongVILAConfig
from longvila.chat import ChatSession, ContextLengthError, TextStreamer, is_image_path


@pytest.fixture(scope="module")
def model():
    return lively_tiny_model()


def direct_answer(model, processor, messages, num_frames, max_new_tokens=12):
    batch = processor.collate([processor(messages, num_frames=num_frames)])
    new_ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(new_ids[0])


def test_streamer_releases_whole_characters(tiny_processor):
    text = "héllo 日本語 🎉 done"
    ids = tiny_processor.tokenizer.encode(text, add_special_tokens=False)
    prefixes = [tiny_processor.tokenizer.decode(ids[:i]) for i in range(1, len(ids))]
    assert any(p.endswith("\ufffd") for p in prefixes), "the text must split a character across tokens"
    pieces = []
    streamer = TextStreamer(tiny_processor, pieces.append)
    for token in ids + [tiny_processor.im_end_id, ids[0]]:  # nothing after the end of the turn
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 3


def test_ask_equals_direct_generation_and_keeps_history(model, tiny_processor):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (6, 48, 48, 3), dtype=np.uint8)
    session = ChatSession(model, tiny_processor, num_frames=4, max_new_tokens=12)
    streamed = []
    first = session.ask("What happens?", video=video, stream=streamed.append)
    assert "".join(streamed) == first
    turn = [
        {
            "role": "user",
            "content": [{"type": "video", "video": video}, {"type": "text", "text": "What happens?"}],
        }
    ]
    assert first == direct_answer(model, tiny_processor, turn, num_frames=4)

    second = session.ask("And then?")
    turns = turn + [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    assert second == direct_answer(model, tiny_processor, turns, num_frames=4)
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.history == []


def test_ask_about_an_image(model, tiny_processor):
    image = np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    answer = ChatSession(model, tiny_processor, max_new_tokens=8).ask("Shape?", image=image)
    turn = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Shape?"}]}
    ]
    assert answer == direct_answer(model, tiny_processor, turn, num_frames=None, max_new_tokens=8)


def test_prompt_longer_than_the_context_is_refused(tiny_processor):
    torch.manual_seed(0)
    small = LongVILA(LongVILAConfig.tiny()).eval()
    small.config.llm["max_position_embeddings"] = 64
    video = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    session = ChatSession(small, tiny_processor, num_frames=8)
    with pytest.raises(ContextLengthError, match="context holds 64"):
        session.ask("What?", video=video)
    assert session.history == []


def test_image_suffixes():
    assert is_image_path("a/b.JPG") and is_image_path("x.png")
    assert not is_image_path("clip.mp4") and not is_image_path("noext")
