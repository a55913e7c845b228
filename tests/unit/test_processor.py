"""The processor: chat layout, labels, frame preprocessing, packing, and clear errors on bad input."""

import math

import numpy as np
import pytest
import torch

from longvila import LongVILAProcessor


def video(frames=4, h=48, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (frames, h, w, 3), dtype=np.uint8)


def test_chat_layout_and_labels_only_on_assistant_turns(tiny_processor):
    p = tiny_processor
    s = p(
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye now"},
        ]
    )
    text = p.tokenizer.decode(s["input_ids"])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye now<|im_end|>\n"
    )
    supervised = s["input_ids"][s["labels"] != -100]
    assert p.tokenizer.decode(supervised) == "Hi there<|im_end|>Bye now<|im_end|>"
    prompt = p([{"role": "user", "content": "Hello"}])
    assert p.tokenizer.decode(prompt["input_ids"]).endswith("<|im_start|>assistant\n")
    assert (prompt["labels"] == -100).all()


def test_video_frames_become_image_tokens_each_followed_by_newline(tiny_processor):
    p = tiny_processor
    s = p(
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": video(10)}, {"type": "text", "text": "Q?"}],
            }
        ],
        num_frames=4,
    )
    assert s["pixel_values"].shape == (4, 3, p.image_size, p.image_size) and s["num_frames"] == [4]
    ids = s["input_ids"].tolist()
    first = ids.index(p.image_token_id)
    block = [p.image_token_id] * p.tokens_per_frame + p.newline_ids
    assert ids[first : first + 4 * len(block)] == block * 4
    assert ids.count(p.image_token_id) == 4 * p.tokens_per_frame


def test_placeholder_text_and_typed_parts_tokenise_identically(tiny_processor):
    v = video()
    typed = tiny_processor(
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": v}, {"type": "text", "text": "What happens?"}],
            }
        ]
    )
    placeholder = tiny_processor([{"role": "user", "content": "<video>\nWhat happens?"}], videos=[v])
    assert torch.equal(typed["input_ids"], placeholder["input_ids"])


def test_frames_are_resized_and_normalised_like_siglip(tiny_processor):
    white = np.full((1, 64, 64, 3), 255, dtype=np.uint8)
    black = np.zeros((1, 30, 90, 3), dtype=np.uint8)
    assert torch.allclose(tiny_processor.preprocess_frames(white), torch.ones(1, 3, 64, 64))
    assert torch.allclose(tiny_processor.preprocess_frames(black), -torch.ones(1, 3, 64, 64))


def test_uniform_subsampling_of_a_frame_array(tiny_processor):
    v = np.zeros((9, 8, 8, 3), dtype=np.uint8)
    v[:, 0, 0, 0] = np.arange(9) * 20
    s = tiny_processor([{"role": "user", "content": "<video>"}], videos=[v], num_frames=3)
    assert s["num_frames"] == [3]


def test_frames_sampled_takes_arrays_as_they_are_and_still_samples_paths(tiny_processor, tmp_path):
    from longvila.data.synthetic import write_mp4

    v = video(frames=5)
    message = [{"role": "user", "content": "<video>"}]
    # by default an array is resampled to the processor's frame count (8 for the tiny default, repeats)
    assert tiny_processor(message, videos=[v])["num_frames"] == [tiny_processor.num_frames]
    kept = tiny_processor(message, videos=[v], frames_sampled=True)
    assert kept["num_frames"] == [5]
    torch.testing.assert_close(kept["pixel_values"], tiny_processor.preprocess_frames(v), rtol=0, atol=0)
    path = write_mp4(tmp_path / "clip.mp4", video(frames=12, h=32, w=32))
    from_path = tiny_processor(message, videos=[path], num_frames=3, frames_sampled=True)
    assert from_path["num_frames"] == [3]


def test_collate_packs_with_restarting_positions_and_boundaries(tiny_processor):
    a = tiny_processor([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}])
    b = tiny_processor(
        [{"role": "user", "content": "<image>\nShape?"}, {"role": "assistant", "content": "star"}],
        images=[video(1)[0]],
    )
    batch = tiny_processor.collate([a, b], pad_to_multiple_of=8)
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    total = batch["input_ids"].shape[1]
    assert total % 8 == 0 and total >= la + lb
    assert batch["cu_seqlens"].tolist() == [0, la, total] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"][0, :la].tolist() == list(range(la))
    assert batch["position_ids"][0, la:].tolist() == list(range(total - la))
    assert (batch["labels"][0, la + lb :] == -100).all()
    assert batch["labels"][0, la] == -100
    assert batch["pixel_values"].shape[0] == 1


@pytest.mark.parametrize(
    ("kwargs", "message", "error"),
    [
        (
            {"content": "<video> and <video>", "videos": [video()]},
            r"more <video> placeholders \(2\) than videos given \(1\)",
            ValueError,
        ),
        (
            {"content": "no placeholder", "videos": [video()]},
            r"1 videos given but only 0 <video> placeholders",
            ValueError,
        ),
        (
            {"content": "<image>", "images": []},
            r"more <image> placeholders \(1\) than images given \(0\)",
            ValueError,
        ),
        (
            {"content": "<video>", "videos": [np.zeros((0, 8, 8, 3), np.uint8)]},
            "empty frame array",
            ValueError,
        ),
        ({"content": "<video>", "videos": [np.zeros((2, 8, 8, 3), np.float32)]}, "must be uint8", ValueError),
        (
            {"content": "<video>", "videos": [np.zeros((2, 8, 8), np.uint8)]},
            r"shape \(T, H, W, 3\)",
            ValueError,
        ),
        ({"content": "<video>", "videos": [[1, 2, 3]]}, "expected a path or a uint8 numpy array", TypeError),
    ],
)
def test_bad_media_input_gets_a_clear_error(tiny_processor, kwargs, message, error):
    content = kwargs.pop("content")
    with pytest.raises(error, match=message):
        tiny_processor([{"role": "user", "content": content}], **kwargs)


def test_bad_messages_get_a_clear_error(tiny_processor):
    with pytest.raises(ValueError, match="role must be 'user' or 'assistant'"):
        tiny_processor([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="media may only stand in user turns"):
        tiny_processor(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "image", "image": video(1)[0]}]},
            ]
        )
    with pytest.raises(ValueError, match="unknown content part type 'audio'"):
        tiny_processor([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}])


def test_processor_save_load_round_trip(tmp_path, tiny_processor):
    tiny_processor.save_pretrained(tmp_path)
    loaded = LongVILAProcessor.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "<video>\nWhat?"}]
    assert torch.equal(
        tiny_processor(msgs, videos=[video()])["input_ids"], loaded(msgs, videos=[video()])["input_ids"]
    )
    with pytest.raises(ValueError, match="not a longvila checkpoint"):
        LongVILAProcessor.from_pretrained(tmp_path / "nothing")


def test_decode_stops_at_end_of_turn(tiny_processor):
    ids = tiny_processor.tokenizer.encode("red", add_special_tokens=False) + [tiny_processor.im_end_id, 5, 6]
    assert tiny_processor.decode(torch.tensor(ids)) == "red"


# ---- one uniform-sampling rule: a path and its decoded frames as an array pick the same frames --------


@pytest.fixture(scope="module")
def grey_ramp_videos(tmp_path_factory):
    """{total: (path, all decoded frames)} for total in 1..63: frame i is one flat grey level."""
    from longvila.data.synthetic import write_mp4
    from longvila.data.video import decode_frames

    root = tmp_path_factory.mktemp("ramps")
    videos = {}
    for total in range(1, 64):
        levels = (np.arange(total, dtype=np.uint8) * 4)[:, None, None, None]
        frames = np.ascontiguousarray(np.broadcast_to(levels, (total, 32, 32, 3)))  # decord needs >= 32
        path = write_mp4(root / f"ramp{total:02d}.mp4", frames)
        decoded, _ = decode_frames(path)
        assert len(decoded) == total
        videos[total] = (path, decoded)
    return videos


def _reference_indices(total: int, n: int) -> list[int]:
    """Round-half-up uniform sampling in exact rationals: floor(i * (total - 1) / (n - 1) + 1/2)."""
    from fractions import Fraction

    if n == 1:
        return [0]
    return [math.floor(Fraction(i * (total - 1), n - 1) + Fraction(1, 2)) for i in range(n)]


def test_uniform_indices_match_an_integer_reference_for_every_small_pair():
    from longvila.data.sampling import uniform_indices

    for total in range(1, 64):
        for n in range(1, 64):
            assert uniform_indices(total, n).tolist() == _reference_indices(total, n), (total, n)


def test_processor_and_video_module_share_one_sampling_function():
    import longvila.chat
    import longvila.data.video
    import longvila.processor
    from longvila.data import sampling

    assert longvila.data.video.uniform_indices is sampling.uniform_indices
    assert longvila.processor.uniform_indices is sampling.uniform_indices
    assert not hasattr(longvila.chat, "uniform_indices")  # chat samples through sampling.sample_frame_array


@pytest.mark.slow  # about 4,000 decodes: a minute or two of CPU
def test_a_path_and_its_frames_as_an_array_give_identical_pixel_values(tiny_processor, grey_ramp_videos):
    """Every (total, n) < 64: the processor on the file and on its decoded frames (the same pixels)
    yields the same pixel_values, including n > total (frames repeat on both paths)."""
    # A processor whose tower size is the frames' (32): no resize; the test is about which frames.
    processor = LongVILAProcessor(tiny_processor.tokenizer, tokens_per_frame=1, image_size=32)
    message = [{"role": "user", "content": "<video>\nWhat?"}]
    for total, (path, frames) in grey_ramp_videos.items():
        levels = frames[:, 0, 0, 0].astype(int)
        for n in range(1, 64):
            by_path = processor(message, videos=[path], num_frames=n)["pixel_values"]
            by_array = processor(message, videos=[frames], num_frames=n)["pixel_values"]
            assert by_path.shape[0] == n and torch.equal(by_path, by_array), (total, n)
            # and they are the frames the rule names (one grey level per frame identifies it)
            expected = levels[_reference_indices(total, n)]
            grey = ((by_path[:, 0, 16, 16] * 0.5 + 0.5) * 255).round().int().numpy()
            assert np.abs(grey - expected).max() <= 1, (total, n)


@pytest.mark.parametrize("backend", ["decord", "opencv", "torchcodec"])
def test_every_backend_samples_the_frames_the_rule_names(backend, grey_ramp_videos):
    from longvila.data.video import available_backends, decode_frames

    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")
    for total in (1, 2, 3, 6, 7, 10, 31, 63):
        path, frames = grey_ramp_videos[total]
        for n in (1, 2, 3, 5, 8, 13, 40, 63):
            sampled, _ = decode_frames(path, num_frames=n, backend=backend)
            expected = frames[_reference_indices(total, n)]
            assert np.abs(sampled.astype(int) - expected.astype(int)).max() <= 2, (backend, total, n)
