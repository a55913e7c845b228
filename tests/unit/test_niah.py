"""V-NIAH: the embedding-level input equals the processor's, scoring, per-cell resume, the heat map."""

import json

import numpy as np
import pytest
import torch
from _models import lively_tiny_model

from longvila.data.synthetic import needle_frame, noise_frames
from longvila.eval.niah import (
    Needle,
    PromptBuilder,
    encode_frames,
    greedy_generate,
    insert_needle,
    needle_positions,
    normalise_answer,
    run_niah,
    teacher_forced_correct,
)
from longvila.eval.plots import plot_niah_heatmap
from longvila.train.data import needle_messages

QUESTION = "Which colour is it?"


@pytest.fixture
def tiny_model():
    """The lively tiny model (its greedy replies vary with the input: see test_replies_vary)."""
    return lively_tiny_model()


def test_replies_vary_with_the_haystack(tiny_model, tiny_processor):
    """Guards the other tests: on a model that emits one constant token they would prove nothing."""
    rng = np.random.default_rng(5)
    builder = PromptBuilder(tiny_model, tiny_processor, QUESTION)
    replies = set()
    for n in (1, 2, 3, 5):
        frames = encode_frames(tiny_model, tiny_processor, noise_frames(rng, n, 64))
        replies.add(tuple(greedy_generate(tiny_model, builder.embeds(frames), 4, end_ids=[])))
    assert len(replies) >= 3 and len({t for r in replies for t in r}) >= 3, replies


def test_embedding_level_input_equals_the_processors_video(tiny_model, tiny_processor):
    rng = np.random.default_rng(0)
    hay = noise_frames(rng, 5, 64)
    needle = needle_frame("red", 64)
    frames = np.concatenate([hay[:2], needle[None], hay[2:]])
    sample = tiny_processor(needle_messages(frames, None, QUESTION), num_frames=6)
    batch = tiny_processor.collate([sample])
    with torch.no_grad():
        reference = tiny_model.embed(batch["input_ids"], batch["pixel_values"])
        builder = PromptBuilder(tiny_model, tiny_processor, QUESTION)
        haystack = encode_frames(tiny_model, tiny_processor, hay)
        needle_embeds = encode_frames(tiny_model, tiny_processor, needle[None])
        ours = builder.embeds(insert_needle(haystack, needle_embeds, 0.4))
    torch.testing.assert_close(ours, reference)
    # Greedy decoding from embeddings equals the model's own generate on the same prompt.
    expected = tiny_model.generate(**batch, max_new_tokens=4, eos_token_id=[])[0].tolist()
    got = greedy_generate(tiny_model, ours, 4, end_ids=[])
    assert got == expected and len(set(got)) > 1, got


def test_two_needles_keep_their_order_and_equal_the_processors_video(tiny_model, tiny_processor):
    assert needle_positions(10, 1, 0.4) == [4]
    assert needle_positions(10, 2, 0.0) == [0, 5] and needle_positions(10, 2, 1.0) == [5, 10]
    rng = np.random.default_rng(3)
    hay = noise_frames(rng, 6, 64)
    first, second = needle_frame("red", 64), needle_frame("blue", 64)
    # depth 0.5 with 2 needles over 6 frames: cuts at round(1.5) = 2 and round(4.5) = 4
    frames = np.concatenate([hay[:2], first[None], hay[2:4], second[None], hay[4:]])
    batch = tiny_processor.collate([tiny_processor(needle_messages(frames, None, QUESTION), num_frames=8)])
    with torch.no_grad():
        reference = tiny_model.embed(batch["input_ids"], batch["pixel_values"])
        builder = PromptBuilder(tiny_model, tiny_processor, QUESTION)
        haystack = encode_frames(tiny_model, tiny_processor, hay)
        needles = encode_frames(tiny_model, tiny_processor, np.stack([first, second]))
        ours = builder.embeds(insert_needle(haystack, needles, 0.5))
    torch.testing.assert_close(ours, reference)


def test_teacher_forced_score_follows_the_argmax(tiny_model, tiny_processor):
    rng = np.random.default_rng(1)
    with torch.no_grad():
        builder = PromptBuilder(tiny_model, tiny_processor, QUESTION)
        frames = encode_frames(tiny_model, tiny_processor, noise_frames(rng, 3, 64))
        greedy = greedy_generate(tiny_model, builder.embeds(frames), 3, end_ids=[])
    assert teacher_forced_correct(tiny_model, builder, frames, greedy)
    assert len(set(greedy)) > 1, greedy  # a varying reply, so "follows the argmax" is not vacuous
    for position in range(3):  # any one wrong token makes it incorrect
        wrong = list(greedy)
        wrong[position] = (wrong[position] + 1) % 1000
        assert not teacher_forced_correct(tiny_model, builder, frames, wrong)


def test_normalise_answer():
    assert normalise_answer(" Dark Blue \n") == "darkblue"


def _reply(model, processor, hay, needle, frames, depth, tokens=3) -> str:
    """The model's own greedy reply in one cell: used as a needle's answer, the grid is not all 0."""
    builder = PromptBuilder(model, processor, needle.question)
    needle_embeds = encode_frames(model, processor, np.asarray(needle.image)[None])
    haystack = encode_frames(model, processor, hay[:frames])
    ids = greedy_generate(model, builder.embeds(insert_needle(haystack, needle_embeds, depth)), tokens,
                          processor.stop_token_ids)  # fmt: skip
    return processor.decode(ids)


def test_run_niah_grid_cells_resume_and_plot(tiny_model, tiny_processor, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    hay = noise_frames(rng, 8, 64)
    needles = [Needle(needle_frame(c, 64), QUESTION, c) for c in ("red", "blue")]
    # Needle 0's answer is what the model says in cell (2 frames, depth 0): that cell scores 1 for it.
    needles[0].answer = _reply(tiny_model, tiny_processor, hay, needles[0], 2, 0.0)
    assert normalise_answer(needles[0].answer)
    grid = run_niah(
        tiny_model, tiny_processor, hay, needles, [2, 8], [0.0, 0.5, 1.0], tmp_path, max_new_tokens=3
    )
    assert np.array(grid.accuracy).shape == (3, 2)
    assert np.array(grid.accuracy_teacher_forced).shape == (3, 2)
    assert grid.accuracy[0][0] == 0.5 and grid.accuracy_teacher_forced[0][0] == 0.5
    generated = {r["generated"] for c in grid.cells for r in c["needles"]}
    assert len(generated) >= 3, generated  # replies differ across cells and needles
    assert len(list((tmp_path / "cells").glob("*.json"))) == 6
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert saved["frame_counts"] == [2, 8] and "mean_accuracy" in saved
    # A rerun reads every cell back instead of computing it.
    monkeypatch.setattr(
        "longvila.eval.niah.greedy_generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError)
    )
    again = run_niah(tiny_model, tiny_processor, hay, needles, [2, 8], [0.0, 0.5, 1.0], tmp_path)
    assert again.accuracy == grid.accuracy and again.cells == grid.cells
    png = plot_niah_heatmap(grid, tmp_path / "niah.png")
    assert png.stat().st_size > 1000


def test_run_niah_scores_a_two_needle_probe(tiny_model, tiny_processor, tmp_path):
    rng = np.random.default_rng(4)
    hay = noise_frames(rng, 6, 64)
    probe = Needle([needle_frame("red", 64), needle_frame("green", 64)], "Which two colours?", "x")
    builder = PromptBuilder(tiny_model, tiny_processor, probe.question)
    needles = encode_frames(tiny_model, tiny_processor, np.stack(probe.images))
    embeds = builder.embeds(insert_needle(encode_frames(tiny_model, tiny_processor, hay[:4]), needles, 1.0))
    probe.answer = tiny_processor.decode(
        greedy_generate(tiny_model, embeds, 3, tiny_processor.stop_token_ids)
    )
    grid = run_niah(tiny_model, tiny_processor, hay, [probe], [4, 6], [0.0, 1.0], None, max_new_tokens=3)
    assert grid.accuracy[1][0] == 1.0 and grid.accuracy_teacher_forced[1][0] == 1.0
