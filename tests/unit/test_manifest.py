"""Manifests: parsing with file:line errors, record -> messages, lazy dataset, skip counting in workers."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch.utils.data
from _video_helpers import read_codes, write_video

from longvila.data.errors import ManifestError
from longvila.data.manifest import (
    ErrorCounter,
    ManifestDataset,
    ManifestRecord,
    Skipped,
    read_manifest,
    record_to_messages,
    skip_none,
)
from longvila.data.video import decode_frames


def fake_processor(messages, num_frames):
    """Stands in for LongVILAProcessor: records what it was given."""
    parts = [p for m in messages for p in m["content"]]
    media = [p.get("video", p.get("image")) for p in parts if p["type"] != "text"]
    return {
        "roles": [m["role"] for m in messages],
        "kinds": [p["type"] for p in parts],
        "codes": [read_codes(v) for v in media if isinstance(v, np.ndarray) and v.ndim == 4],
        "num_frames": num_frames,
    }


def list_collate(samples):
    return list(samples)


def write_manifest(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def qa(media_key=None, media=None, question="<video>\nWhat happens?", answer="A dog runs."):
    record = {
        "id": "x",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    if media_key:
        record[media_key] = media
    return record


def test_record_to_messages_places_media_where_the_placeholder_is():
    record = qa("video", "a.mp4", question="Look: <video>\nWhat happens?")
    messages = record_to_messages(record, "/data")
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "video", "video": "/data/a.mp4"},
                {"type": "text", "text": "What happens?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A dog runs."}]},
    ]


def test_record_to_messages_multi_turn_and_images():
    record = {
        "image": ["a.png", "/abs/b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "And this? <image>"},
            {"from": "gpt", "value": "A dog."},
        ],
    }
    messages = record_to_messages(record, "root", load_image=lambda p: f"loaded:{p}")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0] == {"type": "image", "image": "loaded:root/a.png"}
    assert messages[2]["content"] == [
        {"type": "text", "text": "And this?"},
        {"type": "image", "image": "loaded:/abs/b.png"},
    ]


def test_record_without_placeholder_gets_it_in_front_and_text_only_works():
    messages = record_to_messages(qa("video", "v.mp4", question="Describe it."))
    assert messages[0]["content"] == [
        {"type": "video", "video": "v.mp4"},
        {"type": "text", "text": "Describe it."},
    ]
    text_only = record_to_messages(qa(question="What is the pass key?"))
    assert text_only[0]["content"] == [{"type": "text", "text": "What is the pass key?"}]


def test_record_errors_name_the_line(tmp_path):
    bad = ManifestRecord("m.jsonl", 7, qa("video", "v.mp4", question="<video> <video> twice"))
    with pytest.raises(ManifestError, match=r"m\.jsonl:7: 2 <video> placeholders but 1 video"):
        record_to_messages(bad)
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: video not found: .*nowhere\.mp4"):
        record_to_messages(
            ManifestRecord("m.jsonl", 3, qa("video", "nowhere.mp4")),
            tmp_path,
            load_video=lambda p: decode_frames(p, num_frames=2),
        )
    with pytest.raises(ManifestError, match="placeholder in a turn of the assistant"):
        record_to_messages(qa("video", ["a.mp4", "b.mp4"], answer="<video>"))


def test_read_manifest_reports_file_and_line(tmp_path):
    path = write_manifest(
        tmp_path / "m.jsonl", [qa(), "", "{not json", json.dumps([1, 2]), qa(question="ok")]
    )
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: "):
        list(read_manifest(path))
    kept = list(read_manifest(path, on_error="keep"))
    assert [r.line for r in kept] == [1, 3, 4, 5]
    assert kept[1].error and kept[2].error and kept[0].error is None
    assert [r.line for r in read_manifest(path, on_error="skip")] == [1, 5]
    with pytest.raises(FileNotFoundError, match="none.jsonl"):
        list(read_manifest(tmp_path / "none.jsonl"))


@pytest.fixture
def bad_manifest(tmp_path):
    write_video(tmp_path / "good.mp4", 20)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 1000)
    lines = [
        qa("video", "good.mp4"),  # 1 ok
        qa("video", "missing.mp4"),  # 2 missing file
        "{oops",  # 3 does not parse
        qa("video", "broken.mp4"),  # 4 not a video
        qa("video", "good.mp4", question="<video> and <video>"),  # 5 too many placeholders
        qa(question="text only"),  # 6 ok
        qa("video", "good.mp4"),  # 7 ok
        qa("video", "good.mp4"),  # 8 ok
    ]
    return write_manifest(tmp_path / "train.jsonl", lines)


def test_dataset_decodes_lazily_and_skips_bad_items(bad_manifest, caplog):
    dataset = ManifestDataset(bad_manifest, fake_processor, num_frames=4)
    assert len(dataset) == 8
    sample = dataset[0]
    assert sample["kinds"] == ["video", "text", "text"] and sample["codes"] == [[0, 6, 13, 19]]
    assert sample["num_frames"] == 4
    with caplog.at_level(logging.WARNING):
        results = [dataset[i] for i in range(len(dataset))]
    skipped = [r for r in results if isinstance(r, Skipped)]
    assert [s.where.rsplit(":", 1)[1] for s in skipped] == ["2", "3", "4", "5"]
    assert "video not found" in skipped[0].reason and "missing.mp4" in skipped[0].reason
    assert "broken.mp4" in skipped[2].reason
    assert dataset.num_skipped == 4
    assert "train.jsonl:2" in caplog.text
    assert len(skip_none(results)) == 4


def test_dataset_raise_mode(bad_manifest, tmp_path):
    with pytest.raises(ManifestError, match=r"train\.jsonl:3"):
        ManifestDataset(bad_manifest, fake_processor, on_error="raise")
    lines = bad_manifest.read_text().splitlines()
    del lines[2]
    clean = write_manifest(tmp_path / "no_parse_errors.jsonl", lines)
    dataset = ManifestDataset(clean, fake_processor, on_error="raise")
    with pytest.raises(ManifestError, match=r"no_parse_errors\.jsonl:2: video not found: .*missing\.mp4"):
        dataset[1]


def test_dataset_fps_mode(bad_manifest):
    dataset = ManifestDataset(bad_manifest, fake_processor, fps=10, max_frames=3)
    sample = dataset[0]
    assert sample["codes"] == [[0, 9, 18]] and sample["num_frames"] == 3


def test_dataloader_workers_keep_going_and_count_skips(bad_manifest, caplog):
    dataset = ManifestDataset(bad_manifest, fake_processor, num_frames=2)
    counter = ErrorCounter()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=counter.collate(list_collate)
    )
    for _ in range(2):  # two epochs: counts are per epoch
        with caplog.at_level(logging.WARNING, logger="longvila.data.manifest"):
            batches = list(counter.epoch(loader))
        assert sum(len(b) for b in batches) == 4
        assert counter.last_epoch_skipped == 4 and counter.last_epoch_samples == 8
        assert "skipped 4 of 8 samples this epoch" in caplog.text
        caplog.clear()
    assert counter.total_skipped == 8
    assert {s.where.rsplit(":", 1)[1] for s in counter.examples} == {"2", "3", "4", "5"}
    with pytest.raises(TypeError, match="collate"):
        list(counter.epoch(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=list_collate)))


def test_with_real_processor_when_available(bad_manifest):
    processor_mod = pytest.importorskip("longvila.processor")
    if not hasattr(processor_mod, "LongVILAProcessor") or not hasattr(
        processor_mod.LongVILAProcessor, "tiny"
    ):
        pytest.skip("LongVILAProcessor.tiny() not there yet")
    dataset = ManifestDataset(bad_manifest, processor_mod.LongVILAProcessor.tiny(), num_frames=2)
    assert isinstance(dataset[0], dict)
    assert isinstance(dataset[1], Skipped)
