"""Stage 6's parts: rewards, the synthetic tasks, the embedding cache, the rollout engine, the recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import lively_tiny_model

from longvila.data.rl_tasks import COUNT_COLOUR, RLTaskSet, make_question
from longvila.data.synthetic import COLOURS
from longvila.train.recipe import load_recipe
from longvila.train.rl.cache import EmbeddingCache, vision_fingerprint
from longvila.train.rl.rewards import choice_reward, exact_reward, extract_answer, format_reward, score
from longvila.train.rl.rollout import LocalEngine, RolloutRequest, SamplingSpec, build_engine, cut_reply


# ---- rewards -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<think>two</think><answer>2</answer>", 1.0),
        ("  <think>a\nb</think>\n<answer> 2 </answer>\n", 1.0),
        ("<answer>2</answer>", 0.0),
        ("<think>x</think><answer>2</answer> extra", 0.0),
        ("<think>x</think>2", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(text, ok):
    assert format_reward(text) == ok


def test_exact_and_choice_rewards():
    assert exact_reward("<think>c</think><answer> 3 </answer>", "3") == 1.0
    assert exact_reward("<answer>Red  Car</answer>", "red car") == 1.0
    assert exact_reward("<answer>13</answer>", "3") == 0.0
    assert exact_reward("3", "3") == 0.0  # no <answer>: nothing to check
    for reply in (
        "<answer>B</answer>",
        "<answer>(b)</answer>",
        "<answer>B) blue</answer>",
        "<answer> B. </answer>",
    ):
        assert choice_reward(reply, "B") == 1.0, reply
    for reply in ("<answer>A</answer>", "<answer>Blue</answer>", "<answer></answer>", "B"):
        assert choice_reward(reply, "B") == 0.0, reply
    assert extract_answer("<answer>1</answer><answer>2</answer>") == "1"


def test_score_weights_accuracy_and_format():
    good = score("<think>t</think><answer>4</answer>", "4", "exact", 0.1)
    assert (good.total, good.accuracy, good.format) == (1.0, 1.0, 1.0)
    formatted_wrong = score("<think>t</think><answer>5</answer>", "4", "exact", 0.1)
    assert formatted_wrong.total == pytest.approx(0.1)
    right_unformatted = score("<answer>4</answer>", "4", "exact", 0.1)
    assert right_unformatted.total == pytest.approx(0.9)
    with pytest.raises(ValueError, match="answer kind"):
        score("x", "4", "regex", 0.1)
    with pytest.raises(ValueError, match="format_weight"):
        score("x", "4", "exact", 1.5)


# ---- tasks ---------------------------------------------------------------------------------------
def _is(frame, colour):
    return bool((frame == np.array(COLOURS[colour], dtype=np.uint8)).all())


def _nearest_colour(frame) -> str:
    """The palette colour nearest a flat frame's colour (count frames are shade-jittered)."""
    pixel = frame[0, 0].astype(int)
    assert (frame == frame[0, 0]).all()  # flat
    return min(COLOURS, key=lambda c: int(((np.array(COLOURS[c]) - pixel) ** 2).sum()))


def test_count_questions_answer_the_number_of_red_frames():
    answers = set()
    for i in range(40):
        q = make_question("count", "train", i, seed=0, num_frames=5, size=16)
        assert q.frames.shape == (5, 16, 16, 3) and q.frames.dtype == np.uint8
        assert q.answer == str(sum(_nearest_colour(f) == COUNT_COLOUR for f in q.frames))
        assert q.kind == "exact" and COUNT_COLOUR in q.question
        answers.add(q.answer)
    assert len(answers) >= 4  # counts vary


def test_both_count_splits_hold_every_answer_and_share_no_video():
    """The splits' answers are alike (uniform over 0..num_frames): with exact flat colours every "all
    red" video is one video, which a content-parity split put in the held-out half only."""
    splits = {s: RLTaskSet("count", s, 150, seed=0, num_frames=4, size=16) for s in ("train", "heldout")}
    videos = {}
    for split, questions in splits.items():
        answers = [questions[i].answer for i in range(len(questions))]
        counts = [answers.count(str(k)) for k in range(5)]
        assert min(counts) >= 15, (split, counts)  # 30 expected each
        videos[split] = {questions[i].frames.tobytes() for i in range(len(questions))}
    assert not videos["train"] & videos["heldout"]


def test_order_questions_answer_the_letter_of_the_first_colour():
    letters = set()
    for i in range(30):
        q = make_question("order", "heldout", i, seed=1, num_frames=6, size=16)
        flats = [name for f in q.frames for name in COLOURS if _is(f, name)]
        assert len(flats) == 2
        options = q.question.split("A) ")[1].split(". Answer")[0].split(" B) ")
        assert options[["A", "B"].index(q.answer)] == flats[0]
        letters.add(q.answer)
    assert letters == {"A", "B"}


def test_task_sets_are_deterministic_and_splits_differ():
    a = RLTaskSet("count", "train", 8, seed=3, num_frames=4, size=16)
    b = RLTaskSet("count", "train", 8, seed=3, num_frames=4, size=16)
    held = RLTaskSet("count", "heldout", 8, seed=3, num_frames=4, size=16)
    assert all(np.array_equal(a[i].frames, b[i].frames) for i in range(8))
    train_videos = {a[i].frames.tobytes() for i in range(8)}
    assert not train_videos & {held[i].frames.tobytes() for i in range(8)}
    assert a[0].labelled_example() == f"<think>count</think><answer>{a[0].answer}</answer>"
    with pytest.raises(IndexError):
        a[8]
    with pytest.raises(ValueError, match="rl task 'sum'"):
        RLTaskSet("sum", "train", 8, seed=0, num_frames=4, size=16)
    with pytest.raises(ValueError, match="at least 2 frames"):
        make_question("order", "train", 0, seed=0, num_frames=1, size=16)


# ---- embedding cache -----------------------------------------------------------------------------
def _counting(model):
    calls = []
    forward = model.vision_tower.forward
    model.vision_tower.forward = lambda x: (calls.append(int(x.shape[0])), forward(x))[1]
    return calls


def test_cache_encodes_each_video_once_and_persists(tmp_path):
    model = lively_tiny_model()
    calls = _counting(model)
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(n, 3, 64, 64, generator=g) for n in (3, 2)]
    cache = EmbeddingCache(model, fingerprint=vision_fingerprint(model), directory=tmp_path, memory_items=1)
    first = cache.get(videos[0])
    with torch.no_grad():
        assert torch.equal(first, model.encode_frames(videos[0]))
    calls.clear()
    assert torch.equal(cache.get(videos[0].clone()), first)  # content-hashed: a copy is a hit
    cache.get(videos[1])  # evicts video 0 from memory (one item)
    assert torch.equal(cache.get(videos[0]), first)  # ... and the disk layer serves it
    assert calls == [2]
    assert cache.state() == {"encodes": 2, "frames_encoded": 5, "memory_hits": 1, "disk_hits": 1}
    assert len(cache.seen) == 2
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".pt", ".pt"]

    later = EmbeddingCache(model, fingerprint=vision_fingerprint(model), directory=tmp_path)  # a new run
    calls.clear()
    assert torch.equal(later.get(videos[1]), cache.get(videos[1]))
    assert calls == [] and later.encodes == 0

    with torch.no_grad():
        model.mm_projector.layers[2].weight.add_(1.0)  # other vision weights: other keys, never stale
    other = EmbeddingCache(model, fingerprint=vision_fingerprint(model), directory=tmp_path)
    other.get(videos[1])
    assert other.encodes == 1


# ---- rollout engine ------------------------------------------------------------------------------
def test_local_engine_samples_reproducibly_and_cuts_at_the_end_token():
    model = lively_tiny_model(std=0.5)
    g = torch.Generator().manual_seed(1)
    width = model.config.llm_hidden_size
    requests = [RolloutRequest(torch.randn(n, width, generator=g), 4) for n in (5, 7, 5)]
    sampling = SamplingSpec(max_new_tokens=6, temperature=1.5, pad_token_id=0)
    engine = build_engine("local", model)
    a = engine.generate(requests, sampling, seed=3)
    b = engine.generate(requests, sampling, seed=3)
    c = engine.generate(requests, sampling, seed=4)
    assert a == b and a != c
    assert [len(group) for group in a] == [4, 4, 4]
    samples = [tuple(r) for group in a for r in group]
    assert len(set(samples)) > 1  # sampled, not greedy
    # the first request's samples equal a plain generate of that prompt's length group, same seed
    batch = torch.cat(
        [requests[0].prompt_embeds[None].expand(4, -1, -1), requests[2].prompt_embeds[None].expand(4, -1, -1)]
    )
    rows = model.generate(inputs_embeds=batch, max_new_tokens=6, do_sample=True, temperature=1.5, pad_token_id=0,
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    ends = engine._end_ids(sampling)
    assert a[0] == [cut_reply(r.tolist(), ends) for r in rows[:4]]
    assert a[2] == [cut_reply(r.tolist(), ends) for r in rows[4:]]
    assert cut_reply([5, 6, 2, 9], [2]) == [5, 6, 2] and cut_reply([5, 6], [2]) == [5, 6]
    assert isinstance(engine, LocalEngine)
    with pytest.raises(ValueError, match="register_engine"):
        build_engine("vllm", model)


def test_stage_6_trains_the_llm_with_vision_frozen():
    from longvila import LongVILA, LongVILAConfig
    from longvila.train.recipe import StageSection
    from longvila.train.stages import apply_stage

    model = LongVILA(LongVILAConfig.tiny())
    apply_stage(model, StageSection(number=6))
    assert all(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.mm_projector.parameters())
    assert model.config.extra["stage"] == 6


# ---- recipe --------------------------------------------------------------------------------------
def test_stage6_recipes_load_and_bad_values_name_the_key():
    tiny = load_recipe("tiny/stage6")
    assert tiny.stage.number == 6 and tiny.data.kind == "rl_task" and tiny.rl.group_size >= 2
    big = load_recipe("longvila-7b/stage6_rl")
    assert big.stage.number == 6 and big.parallel.sp_degree > 1 and big.rl.kl_coef > 0
    with pytest.raises(ValueError, match="rl.loss_agg"):
        load_recipe("tiny/stage6", ["--rl.loss_agg", "sum"])
    with pytest.raises(ValueError, match="rl.group_size"):
        load_recipe("tiny/stage6", ["--rl.group_size", "0"])
    with pytest.raises(ValueError, match="stage 6 \\(RL\\) and data.kind 'rl_task' go together"):
        load_recipe("tiny/stage6", ["--data.kind", "needle"])
    with pytest.raises(ValueError, match="rl.sft_questions"):
        load_recipe("tiny/stage6", ["--rl.sft_questions", "1000"])
