"""`longvila data long-sft`: clips, captions, the writer's JSON checked and retried, a manifest that
trains, resumable and shardable runs, and an error report that loses nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from longvila import LongVILA, LongVILAConfig, LongVILAProcessor
from longvila.build.long_sft import HFWriter, LongVILACaptioner
from longvila.data.long_sft import (
    LongSFTConfig,
    PromptSet,
    WriterFailure,
    WriterOutputError,
    build_long_sft,
    parse_writer_output,
    resolve_shard,
    write_qa,
)
from longvila.data.manifest import ManifestDataset, read_manifest
from longvila.data.scene import detect_scene_cuts, plan_clips
from longvila.data.synthetic import moving_shape_frames, write_mp4

FPS = 2
VALID = {
    "summary": "A circle crosses the frame over changing backgrounds.",
    "qa": [
        {"type": "when", "question": "What happens in the first seconds?", "answer": "A circle moves right.", "time": [0, 5]},
        {"type": "order", "question": "Which background comes first?", "answer": "The blue one comes first."},
        {"type": "count", "question": "How many scenes are there?", "answer": "There are several scenes."},
    ],
}  # fmt: skip


def scene_video(path, scenes, seconds_per_scene):
    """A video of flat-background scenes, each with a circle moving across it (2 fps, 64 px)."""
    frames = [moving_shape_frames("circle", c, b, "right", seconds_per_scene * FPS, 64) for c, b in scenes]
    return write_mp4(path, np.concatenate(frames), fps=FPS)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    scene_video(root / "a.mp4", [("red", "blue"), ("green", "yellow"), ("white", "black")], 8)  # 24 s
    scene_video(root / "b.mp4", [("orange", "purple"), ("cyan", "magenta")], 10)  # 20 s
    (root / "c_broken.mp4").write_bytes(b"not a video at all" * 64)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("captioner") / "tiny-longvila"
    torch.manual_seed(0)
    LongVILA(LongVILAConfig.tiny()).save_pretrained(path, processor=LongVILAProcessor.tiny())
    return path


class FakeCaptioner:
    """Describes a clip by its mean colour; counts calls and clips."""

    name = "fake-captioner"

    def __init__(self):
        self.calls = 0
        self.clips = 0

    def caption(self, clips, prompt):
        self.calls += 1
        self.clips += len(clips)
        return [
            f"a clip whose mean colour is {clip.mean(axis=(0, 1, 2)).astype(int).tolist()}" for clip in clips
        ]


class ScriptedWriter:
    """Replies from a script (the last entry repeats); records the messages it was sent."""

    name = "scripted-writer"

    def __init__(self, *replies):
        self.replies = list(replies) or [json.dumps(VALID)]
        self.sent = []

    def __call__(self, messages):
        self.sent.append(messages)
        reply = self.replies[min(len(self.sent) - 1, len(self.replies) - 1)]
        if isinstance(reply, BaseException):
            raise reply
        return reply


def config(**overrides):
    settings = dict(frames_per_clip=2, clips_per_batch=4, progress=False)
    settings.update(overrides)
    return LongSFTConfig(**settings)


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- clips and scenes ------------------------------------------------------------------------------


def test_clips_cover_the_video_and_scene_cuts_are_found(videos):
    assert plan_clips(25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert plan_clips(20.4, 10) == [(0, 10), (10, 20.4)]  # a 0.4 s tail joins the clip before
    assert plan_clips(30, 10, cuts=[7.5, 22]) == [(0, 7.5), (7.5, 17.5), (17.5, 22), (22, 30)]
    assert detect_scene_cuts(videos / "a.mp4") == [8.0, 16.0]  # colour changes, not the moving circle


# ---- the writer's JSON -----------------------------------------------------------------------------


def test_valid_output_is_parsed_even_when_wrapped():
    reply = "Here you go:\n```json\n" + json.dumps(VALID) + "\n```"
    result = parse_writer_output(reply, duration=24.0, min_questions=3)
    assert result["summary"] == VALID["summary"]
    assert [qa["type"] for qa in result["qa"]] == ["when", "order", "count"]
    assert result["qa"][0]["time"] == [0.0, 5.0]


def _with(**changes):
    data = json.loads(json.dumps(VALID))
    for key, value in changes.items():
        if key == "summary":
            data["summary"] = value
        else:
            data["qa"][0][key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    "reply, message",
    [
        ("I cannot help with that.", "no JSON object"),
        ('{"summary": "x", "qa": [}', "not valid JSON"),
        ("[1, 2, 3]", "must be a JSON object, got list"),
        (json.dumps({"summary": "x"}), "qa must be a list"),
        (_with(summary="  "), "summary must be a non-empty string"),
        (_with(answer=""), r"qa\[0\].answer must be a non-empty string"),
        (_with(type="trivia"), r"qa\[0\].type must be one of"),
        (_with(answer="What happens in the first seconds"), "copies its question"),
        (_with(time=[20, 40]), "not within the video"),
        (_with(time="at ten"), "must be \\[start, end\\]"),
        (json.dumps({"summary": "x", "qa": VALID["qa"][:1]}), "at least 3 questions"),
        (json.dumps({"summary": "x", "qa": [VALID["qa"][1]] * 3}), "same question again"),
    ],
)
def test_malformed_output_is_rejected(reply, message):
    with pytest.raises(WriterOutputError, match=message):
        parse_writer_output(reply, duration=24.0, min_questions=3)


def test_writer_is_retried_with_a_repair_hint():
    writer = ScriptedWriter("not json", json.dumps({"summary": "x", "qa": "none"}), json.dumps(VALID))
    clips = [
        {"start": 0.0, "end": 10.0, "caption": "a red circle"},
        {"start": 10.0, "end": 20.0, "caption": ""},
    ]
    result, attempts = write_qa(writer, PromptSet.load(), clips, 20.0, config())
    assert attempts == 3 and result["summary"] == VALID["summary"]
    first = writer.sent[0]
    assert first[0]["role"] == "system" and "[0.0s - 10.0s] a red circle" in first[1]["content"]
    assert "[10.0s - 20.0s] (no caption)" in first[1]["content"]
    retry = writer.sent[2]  # the whole exchange so far, ending with the repair hint
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert retry[4]["content"] == json.dumps({"summary": "x", "qa": "none"})
    assert "qa must be a list" in retry[5]["content"]


def test_writer_gives_up_after_the_retries():
    writer = ScriptedWriter("still not json")
    with pytest.raises(WriterFailure) as info:
        write_qa(
            writer, PromptSet.load(), [{"start": 0, "end": 5, "caption": "x"}], 5.0, config(max_retries=2)
        )
    assert len(writer.sent) == 3 and len(info.value.attempts) == 3
    assert info.value.attempts[-1] == {
        "reply": "still not json",
        "errors": ["the reply holds no JSON object"],
    }


def test_prompt_files_can_be_overridden(tmp_path):
    (tmp_path / "write.txt").write_text("Captions:\n$captions\nDuration $duration. JSON please.")
    default, custom = PromptSet.load(), PromptSet.load(tmp_path)
    assert custom.caption == default.caption  # files not given keep their default
    assert custom.sha256 != default.sha256 and custom.source == str(tmp_path)
    text = custom.render_write([{"start": 0, "end": 10, "caption": "a dog"}], 10.0, 3)
    assert text == "Captions:\n[0.0s - 10.0s] a dog\nDuration 10.0. JSON please."


# ---- whole runs ----------------------------------------------------------------------------------


def test_end_to_end_with_the_tiny_captioner_and_the_manifest_trains(videos, model_dir, tmp_path):
    captioner = LongVILACaptioner(model_dir, frames_per_clip=2, max_new_tokens=4)
    calls = []
    original = captioner.caption
    captioner.caption = lambda clips, prompt: calls.append(len(clips)) or original(clips, prompt)
    report = build_long_sft(
        videos,
        captioner,
        ScriptedWriter(),
        tmp_path,
        config(clip_seconds=10, scene_cuts=True, clips_per_batch=8),
    )
    assert (report.videos, report.done, report.failed) == (3, 2, 1)
    assert calls == [3, 2]  # one packed generate call per video: a has 3 scenes of 8 s, b 2 of 10 s
    records = lines(tmp_path / "manifest.jsonl")
    assert [Path(r["video"]).name for r in records] == ["a.mp4", "b.mp4"]
    first = records[0]
    assert first["conversations"][0]["value"].startswith("<video>\n")
    assert first["conversations"][1]["value"] == VALID["summary"]
    assert len(first["conversations"]) == 2 * (1 + len(VALID["qa"]))
    provenance = first["provenance"]
    assert provenance["scene_cuts"] == [8.0, 16.0] and provenance["captioner"] == "tiny-longvila"
    assert [(c["start"], c["end"]) for c in provenance["clips"]] == [(0, 8), (8, 16), (16, 24)]
    assert provenance["prompts"]["sha256"] == PromptSet.load().sha256
    errors = lines(tmp_path / "errors.jsonl")
    assert [(Path(e["video"]).name, e["stage"]) for e in errors] == [("c_broken.mp4", "decode")]
    assert "cannot be read as a video" in errors[0]["error"]

    processor = LongVILAProcessor.tiny()
    dataset = ManifestDataset(tmp_path / "manifest.jsonl", processor, num_frames=4, on_error="raise")
    assert len(list(read_manifest(tmp_path / "manifest.jsonl"))) == 2
    batch = processor.collate([dataset[0], dataset[1]])
    model = LongVILA.from_pretrained(model_dir).train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.num_supervised > 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_interrupted_run_resumes_without_redoing_finished_videos(videos, tmp_path):
    captioner = FakeCaptioner()
    killed = ScriptedWriter(json.dumps(VALID), KeyboardInterrupt())  # killed while writing video 2
    with pytest.raises(KeyboardInterrupt):
        build_long_sft(videos, captioner, killed, tmp_path, config())
    assert captioner.clips == 3 + 2  # a (24 s) and b (20 s) captioned in 10 s clips
    assert not (tmp_path / "manifest.jsonl").exists()

    resumed = ScriptedWriter()
    report = build_long_sft(videos, captioner, resumed, tmp_path, config())
    assert captioner.clips == 5  # nothing captioned again: a was done, b's captions were cached
    assert len(resumed.sent) == 1  # only b's writing is redone
    assert (report.done, report.reused, report.failed) == (2, 1, 1)
    manifest = (tmp_path / "manifest.jsonl").read_text()

    again = ScriptedWriter()
    build_long_sft(videos, captioner, again, tmp_path, config())
    assert captioner.clips == 5 and not again.sent
    assert (tmp_path / "manifest.jsonl").read_text() == manifest

    build_long_sft(videos, captioner, ScriptedWriter(), tmp_path, config(frames_per_clip=3))
    assert captioner.clips == 10  # other caption settings: the cache is not reused


def test_invalid_writer_output_is_reported_never_written(videos, tmp_path):
    class PicksOnB(ScriptedWriter):
        def __call__(self, messages):
            self.sent.append(messages)
            if "lasts 20.0 seconds" in messages[1]["content"]:  # video b
                return json.dumps(
                    {"summary": "x", "qa": [{"type": "count", "question": "How many?", "answer": ""}]}
                )
            return json.dumps(VALID)

    writer = PicksOnB()
    build_long_sft(videos, FakeCaptioner(), writer, tmp_path, config(max_retries=1))
    assert [Path(r["video"]).name for r in lines(tmp_path / "manifest.jsonl")] == ["a.mp4"]
    errors = {Path(e["video"]).name: e for e in lines(tmp_path / "errors.jsonl")}
    assert set(errors) == {"b.mp4", "c_broken.mp4"}
    assert errors["b.mp4"]["stage"] == "write" and len(errors["b.mp4"]["attempts"]) == 2
    assert errors["b.mp4"]["attempts"][0]["errors"] == [
        "qa[0].answer must be a non-empty string, got ''",
        "qa needs at least 3 questions, got 1",
    ]
    assert len(writer.sent) == 1 + 2


def test_shards_and_ranks_split_the_videos_and_merge_in_order(videos, tmp_path):
    assert resolve_shard("1/2", environ={"RANK": "1", "WORLD_SIZE": "2"}) == (3, 4)
    assert resolve_shard(None, environ={"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3)
    with pytest.raises(ValueError, match="i/n"):
        resolve_shard("2", environ={})
    build_long_sft(videos, FakeCaptioner(), ScriptedWriter(), tmp_path / "single", config())
    out = tmp_path / "sharded"
    # Shard 1/2 as rank 1 of a 2-process torchrun job.
    first = build_long_sft(
        videos, FakeCaptioner(), ScriptedWriter(), out, config(), environ={"RANK": "1", "WORLD_SIZE": "2"}
    )
    assert first.shard == (1, 2) and first.videos == 1 and first.merged is None
    second = build_long_sft(videos, FakeCaptioner(), ScriptedWriter(), out, config(), shard="0/2")
    assert second.videos == 2 and second.merged == str(out / "manifest.jsonl")
    for name in ("manifest.jsonl", "errors.jsonl"):
        assert (out / name).read_text() == (tmp_path / "single" / name).read_text()


def test_a_real_hf_writer_is_retried_then_reported(videos, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longvila.text.tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        )
    )  # fmt: skip
    llm.save_pretrained(tmp_path / "tiny-writer")
    tokenizer.save_pretrained(tmp_path / "tiny-writer")
    writer = HFWriter(tmp_path / "tiny-writer", max_new_tokens=8)
    prompt = writer.format([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert prompt.endswith("Assistant:") and "U" in prompt  # no chat template: a plain transcript
    writer.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    replies = []
    original = writer.__call__
    writer_fn = lambda messages: replies.append(original(messages)) or replies[-1]
    writer_fn.name = writer.name

    report = build_long_sft(
        [videos / "b.mp4"], FakeCaptioner(), writer_fn, tmp_path / "out", config(max_retries=1)
    )
    assert (report.done, report.failed) == (0, 1)
    assert lines(tmp_path / "out" / "manifest.jsonl") == []
    (error,) = lines(tmp_path / "out" / "errors.jsonl")
    assert error["stage"] == "write" and len(error["attempts"]) == 2 == len(replies)
    assert [a["reply"] for a in error["attempts"]] == [r[:2000] for r in replies]
    cache = json.loads(next((tmp_path / "out" / "cache").glob("b-*.json")).read_text())
    assert cache["status"] == "writer_failed" and len(cache["clips"]) == 2


def test_cli_runs_long_sft(videos, model_dir, tmp_path, monkeypatch):
    from longvila.build import long_sft
    from longvila.cli import main

    # The HF writer is covered above; here a stand-in replies validly so the command writes a manifest.
    monkeypatch.setattr(long_sft, "HFWriter", lambda path, tokens: ScriptedWriter())
    (tmp_path / "list.txt").write_text(f"{videos / 'b.mp4'}\n# a comment\nmissing.mp4\n")
    code = main(
        ["data", "long-sft", "--videos", str(tmp_path / "list.txt"), "--captioner", str(model_dir),
         "--writer", "unused", "--out", str(tmp_path / "out"), "--frames-per-clip", "2",
         "--caption-tokens", "2", "--media-root", str(videos), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    (record,) = lines(tmp_path / "out" / "manifest.jsonl")
    assert record["video"] == "b.mp4" and record["provenance"]["clip_seconds"] == 10
    (error,) = lines(tmp_path / "out" / "errors.jsonl")
    assert error["stage"] == "decode" and "not found" in error["error"]
