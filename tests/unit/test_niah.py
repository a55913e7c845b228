"""V-NIAH: the embedding-level input equals the processor's, scoring, per-cell resume, the heat map."""

import json

import numpy as np
import torch

from longvila.eval.niah import (
    Needle,
    PromptBuilder,
    encode_frames,
    greedy_generate,
    insert_needle,
    normalise_answer,
    run_niah,
    teacher_forced_correct,
)
from longvila.eval.plots import plot_niah_heatmap
from longvila.train.data import needle_frame, needle_messages, noise_frames

QUESTION = "Which colour is it?"


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
    expected = tiny_model.generate(**batch, max_new_tokens=4)[0].tolist()
    got = greedy_generate(tiny_model, ours, 4, end_ids=[])
    assert got == expected[: len(got)] and len(got) == 4


def test_teacher_forced_score_follows_the_argmax(tiny_model, tiny_processor):
    rng = np.random.default_rng(1)
    with torch.no_grad():
        builder = PromptBuilder(tiny_model, tiny_processor, QUESTION)
        frames = encode_frames(tiny_model, tiny_processor, noise_frames(rng, 3, 64))
        greedy = greedy_generate(tiny_model, builder.embeds(frames), 3, end_ids=[])
    assert teacher_forced_correct(tiny_model, builder, frames, greedy)
    wrong = [(greedy[0] + 1) % 1000] + greedy[1:]
    assert not teacher_forced_correct(tiny_model, builder, frames, wrong)


def test_normalise_answer():
    assert normalise_answer(" Dark Blue \n") == "darkblue"


def test_run_niah_grid_cells_resume_and_plot(tiny_model, tiny_processor, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    hay = noise_frames(rng, 8, 64)
    needles = [Needle(needle_frame(c, 64), QUESTION, c) for c in ("red", "blue")]
    grid = run_niah(
        tiny_model, tiny_processor, hay, needles, [2, 8], [0.0, 0.5, 1.0], tmp_path, max_new_tokens=3
    )
    assert np.array(grid.accuracy).shape == (3, 2)
    assert np.array(grid.accuracy_teacher_forced).shape == (3, 2)
    assert len(list((tmp_path / "cells").glob("*.json"))) == 6
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert saved["frame_counts"] == [2, 8] and "mean_accuracy" in saved
    # A rerun reads every cell back instead of computing it.
    monkeypatch.setattr(
        "longvila.eval.niah.greedy_generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError)
    )
    again = run_niah(tiny_model, tiny_processor, hay, needles, [2, 8], [0.0, 0.5, 1.0], tmp_path)
    assert again.accuracy == grid.accuracy
    png = plot_niah_heatmap(grid, tmp_path / "niah.png")
    assert png.stat().st_size > 1000
