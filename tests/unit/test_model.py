"""LongVILA against Hugging Face's Qwen2ForCausalLM with the same weights, packing, splicing, generation."""

import numpy as np
import pytest
import torch
from _models import lively_tiny_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from longvila import LongVILA, LongVILAConfig


@pytest.fixture
def lively():
    """For generation tests: a tiny model whose greedy tokens vary (each test asserts they do), so a
    broken cache or padding mask changes them; at the default init every token is the same."""
    return lively_tiny_model()


def assert_varied(tokens, at_least: int = 3) -> None:
    distinct = set(torch.as_tensor(tokens).reshape(-1).tolist())
    assert len(distinct) >= at_least, f"generation test on near-constant tokens {distinct}: it proves nothing"


def hf_twin(model: LongVILA) -> Qwen2ForCausalLM:
    data = {k: v for k, v in model.config.llm.items() if k != "model_type"}
    hf = Qwen2ForCausalLM(Qwen2Config(**data)).eval()
    hf.config._attn_implementation = "sdpa"
    hf.load_state_dict(model.llm.state_dict())
    return hf


def random_ids(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1000, (1, length), generator=g)


def test_text_only_logits_and_loss_equal_hugging_face(tiny_model):
    hf = hf_twin(tiny_model)
    ids = random_ids(40)
    labels = ids.clone()
    labels[:, :15] = -100
    ours = tiny_model(input_ids=ids, labels=labels, return_logits=True)
    ref = hf(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.logits, ref.logits)
    torch.testing.assert_close(ours.loss, ref.loss)
    assert ours.num_supervised == 40 - 15


def test_loss_gradients_equal_hugging_face(tiny_model):
    hf = hf_twin(tiny_model).double()
    tiny_model.double()
    ids = random_ids(33, seed=1)
    labels = ids.clone()
    labels[:, :5] = -100
    tiny_model(input_ids=ids, labels=labels, loss_chunk_size=7).loss.backward()
    # HF's own loss casts logits to float32; take its float64 logits and the textbook loss instead.
    logits = hf(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100).backward()
    ours = dict(tiny_model.llm.named_parameters())
    for name, param in hf.named_parameters():
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_packed_samples_equal_separate_samples(tiny_model, tiny_processor):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (6, 40, 40, 3), dtype=np.uint8)
    a = tiny_processor(
        [{"role": "user", "content": "<video>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
        videos=[video],
        num_frames=5,
    )
    b = tiny_processor([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}])
    c = tiny_processor(
        [{"role": "user", "content": "<image>\nShape?"}, {"role": "assistant", "content": "a circle"}],
        images=[video[0]],
    )
    packed = tiny_model(**tiny_processor.collate([a, b, c]), return_logits=True)
    logits, sums, count = [], 0.0, 0
    for s in (a, b, c):
        out = tiny_model(**tiny_processor.collate([s]), return_logits=True)
        logits.append(out.logits[0])
        sums += out.loss * out.num_supervised
        count += out.num_supervised
    torch.testing.assert_close(packed.logits[0], torch.cat(logits))
    torch.testing.assert_close(packed.loss, sums / count)
    assert packed.num_supervised == count


def test_frames_are_spliced_at_image_tokens_in_order(tiny_model, tiny_processor):
    rng = np.random.default_rng(1)
    video = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    sample = tiny_processor([{"role": "user", "content": [{"type": "video", "video": video}]}])
    batch = tiny_processor.collate([sample])
    embeds = tiny_model.embed(batch["input_ids"], batch["pixel_values"])
    frames = tiny_model.encode_frames(batch["pixel_values"])
    positions = (batch["input_ids"][0] == tiny_model.config.image_token_id).nonzero().squeeze(1)
    torch.testing.assert_close(embeds[0, positions], frames.reshape(-1, frames.shape[-1]))
    # Each frame's tokens are followed by the embedding of "\n".
    newline = tiny_processor.newline_ids[0]
    per_frame = tiny_model.config.tokens_per_frame + 1
    first = int(positions[0])
    for f in range(3):
        assert int(batch["input_ids"][0, first + f * per_frame + per_frame - 1]) == newline


def test_frame_count_mismatch_is_a_clear_error(tiny_model, tiny_processor):
    video = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    batch = tiny_processor.collate([tiny_processor([{"role": "user", "content": "<video>"}], videos=[video])])
    with pytest.raises(ValueError, match="<image> tokens but pixel_values has 1 frames"):
        tiny_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])


def manual_greedy(model, prompt_ids, pixel_values, steps):
    """Greedy decoding without a cache: a full forward for every new token."""
    ids = prompt_ids.clone()
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids, pixel_values=pixel_values).logits
        token = logits[0, -1].argmax()
        out.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def test_greedy_generate_with_cache_equals_full_recompute(lively, tiny_processor):
    video = np.random.default_rng(2).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    prompt = tiny_processor.collate(
        [tiny_processor([{"role": "user", "content": "<video>\nWhat?"}], videos=[video])]
    )
    new = lively.generate(**prompt, max_new_tokens=6, eos_token_id=[])
    assert new.shape == (1, 6) and new.dtype == torch.long
    assert_varied(new)
    assert new[0].tolist() == manual_greedy(lively, prompt["input_ids"], prompt["pixel_values"], 6)


def test_batched_prompts_of_different_lengths_equal_one_by_one(lively, tiny_processor):
    samples = [
        tiny_processor([{"role": "user", "content": text}])
        for text in ("Hi.", "What colour is the needle frame?")
    ]
    together = lively.generate(**tiny_processor.collate(samples), max_new_tokens=5, eos_token_id=[])
    assert_varied(together[0])
    assert_varied(together[1])
    assert together[0].tolist() != together[1].tolist()  # the rows are told apart
    for row, sample in enumerate(samples):
        alone = lively.generate(**tiny_processor.collate([sample]), max_new_tokens=5, eos_token_id=[])
        assert together[row].tolist() == alone[0].tolist()


def test_generate_stops_at_the_processors_stop_ids_by_default(tmp_path, tiny_processor):
    """The processor owns the stop ids (<|im_end|>, EOS, pad); a checkpoint saved with it makes them
    `generate`'s default. The model is steered to emit <|im_end|> where its third token was."""
    from longvila import LongVILAProcessor

    model = lively_tiny_model()
    prompt = tiny_processor.collate([tiny_processor([{"role": "user", "content": "Hi."}])])
    free = model.generate(**prompt, max_new_tokens=6, eos_token_id=[])[0].tolist()
    assert_varied(free)
    stop = tiny_processor.im_end_id
    assert tiny_processor.stop_token_ids == sorted(
        {stop, tiny_processor.tokenizer.eos_token_id, tiny_processor.pad_token_id}
    )
    assert stop not in free[:2]
    model.save_pretrained(tmp_path / "m", processor=tiny_processor)
    loaded = LongVILA.from_pretrained(tmp_path / "m")
    assert LongVILAProcessor.from_pretrained(tmp_path / "m").stop_token_ids == tiny_processor.stop_token_ids
    assert loaded.generate(**prompt, max_new_tokens=6)[0].tolist() == free  # no stop id emitted: no stop
    with torch.no_grad():  # make <|im_end|> the winner exactly where the third token was chosen
        head = loaded.llm.get_output_embeddings().weight
        head[stop] = head[free[2]] * 3
    stopped = loaded.generate(**prompt, max_new_tokens=6)[0].tolist()
    # decoding ends at the stop id (every prompt finished), well before max_new_tokens
    assert stop in stopped[:3] and stopped[-1] == stop and len(stopped) <= 3, stopped
    assert loaded.generate(**prompt, max_new_tokens=6, eos_token_id=[])[0].shape[0] == 6


def test_sampling_is_reproducible_with_a_generator_and_stops_at_eos(lively, tiny_processor):
    tiny_model = lively
    prompt = tiny_processor.collate([tiny_processor([{"role": "user", "content": "Hi."}])])
    runs = [
        tiny_model.generate(
            **prompt,
            max_new_tokens=8,
            do_sample=True,
            top_k=50,
            top_p=0.9,
            temperature=1.5,
            generator=torch.Generator().manual_seed(3),
            eos_token_id=[],
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert_varied(runs[0])
    other = tiny_model.generate(**prompt, max_new_tokens=8, do_sample=True, top_k=50, top_p=0.9,
                                temperature=1.5, generator=torch.Generator().manual_seed(4), eos_token_id=[])  # fmt: skip
    assert not torch.equal(other, runs[0])  # the seed matters: sampling, not a constant
    first = int(runs[0][0, 0])
    stopped = tiny_model.generate(
        **prompt,
        max_new_tokens=8,
        do_sample=True,
        top_k=50,
        top_p=0.9,
        temperature=1.5,
        generator=torch.Generator().manual_seed(3),
        eos_token_id=first,
    )
    assert stopped.shape == (1, 1)


def test_tiny_model_runs_a_64_frame_video_forward_and_backward():
    torch.manual_seed(0)
    from longvila import LongVILAProcessor

    model = LongVILA(LongVILAConfig.tiny())
    proc = LongVILAProcessor.tiny()
    video = np.random.default_rng(0).integers(0, 255, (64, 64, 64, 3), dtype=np.uint8)
    batch = proc.collate(
        [
            proc(
                [
                    {"role": "user", "content": "<video>\nWhat happens?"},
                    {"role": "assistant", "content": "A dog runs."},
                ],
                videos=[video],
                num_frames=64,
            )
        ]
    )
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.mm_projector.layers[2].weight.grad.abs().sum() > 0
    assert next(model.vision_tower.parameters()).grad is not None


def test_chunked_prefill_gives_the_same_tokens(lively, tiny_processor):
    tiny_model = lively  # varied greedy tokens make the comparison meaningful
    video = np.random.default_rng(4).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    prompt = tiny_processor.collate(
        [tiny_processor([{"role": "user", "content": "<video>\nWhat?"}], videos=[video])]
    )
    whole = tiny_model.generate(**prompt, max_new_tokens=10, eos_token_id=[], prefill_chunk_size=None)
    assert len(set(whole[0].tolist())) > 5
    # The default chunks only prompts longer than DEFAULT_PREFILL_CHUNK; this one is shorter.
    from longvila.model.vlm import DEFAULT_PREFILL_CHUNK

    assert prompt["input_ids"].shape[-1] < DEFAULT_PREFILL_CHUNK
    assert torch.equal(tiny_model.generate(**prompt, max_new_tokens=10, eos_token_id=[]), whole)
    for chunk in (7, 32, 64):
        chunked = tiny_model.generate(**prompt, max_new_tokens=10, eos_token_id=[], prefill_chunk_size=chunk)
        assert torch.equal(whole, chunked), chunk
    two = [prompt, tiny_processor.collate([tiny_processor([{"role": "user", "content": "Hi."}])])]
    batch = tiny_processor.collate(
        [
            tiny_processor([{"role": "user", "content": "<video>\nWhat?"}], videos=[video]),
            tiny_processor([{"role": "user", "content": "Hi."}]),
        ]
    )
    together = tiny_model.generate(**batch, max_new_tokens=6, eos_token_id=[], prefill_chunk_size=16)
    assert_varied(together[0])
    assert_varied(together[1])
    for row, single in enumerate(two):
        assert (
            together[row].tolist()
            == tiny_model.generate(**single, max_new_tokens=6, eos_token_id=[])[0].tolist()
        )


def test_extra_inputs_are_checked_not_swallowed(tiny_model, tiny_processor):
    ids = random_ids(12)
    plain = tiny_model(input_ids=ids, return_logits=True).logits
    ones = tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids), return_logits=True).logits
    torch.testing.assert_close(ones, plain, rtol=0, atol=0)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="attention_mask masks some tokens"):
        tiny_model(input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match="token_type_ids"):
        tiny_model(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    samples = [tiny_processor([{"role": "user", "content": text}]) for text in ("Hi there", "Why?")]
    batch = tiny_processor.collate(samples)
    bounds = batch["cu_seqlens"].tolist()
    # generation numbers each packed prompt from 0, as collate does: accepted as given
    assert torch.equal(
        batch["position_ids"][0], torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    )
    tiny_model.generate(**batch, max_new_tokens=1, eos_token_id=[])
    with pytest.raises(ValueError, match="position_ids"):
        tiny_model.generate(
            **{**batch, "position_ids": torch.arange(bounds[-1])[None]}, max_new_tokens=1, eos_token_id=[]
        )
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1)
