"""Synthetic sets: reproducible bytes, readable manifests, needles that survive coding, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longvila.cli import main as cli_main
from longvila.data.image import load_image
from longvila.data.manifest import read_manifest, record_to_messages
from longvila.data.synthetic import COLOURS, generate_all, needle_run_length, passkey_text
from longvila.data.video import decode_frames, probe_video

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_all(out, seed=0, quick=True)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    generate_all(tmp_path / "again", seed=0, quick=True)
    first, again = _files(synth), _files(tmp_path / "again")
    assert first.keys() == again.keys()
    manifests = [k for k in first if k.endswith((".jsonl", ".json"))]
    assert len(manifests) == 6  # five sets + index.json
    assert all(first[k] == again[k] for k in manifests)
    videos = [k for k in first if k.endswith(".mp4")]
    assert videos and all(first[k] == again[k] for k in videos)  # x264, one thread: deterministic
    generate_all(tmp_path / "other", seed=1, quick=True)
    other = _files(tmp_path / "other")
    assert other["needle_qa.jsonl"] != first["needle_qa.jsonl"]


def test_every_manifest_reads_and_converts(synth):
    index = json.loads((synth / "index.json").read_text())
    assert set(index["stages"]) == {
        "align",
        "pretrain",
        "short_sft",
        "context_extension",
        "long_sft",
        "vniah",
    }
    for name in ("captions", "video_qa", "passkey", "needle_qa"):
        records = list(read_manifest(synth / f"{name}.jsonl"))
        assert records
        for record in records:
            messages = record_to_messages(
                record, synth, load_video=lambda p: decode_frames(p, num_frames=4)[0]
            )
            assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
            for part in messages[0]["content"]:
                if part["type"] == "video":
                    assert part["video"].dtype == np.uint8 and part["video"].shape[1:] == (64, 64, 3)
                if part["type"] == "image":
                    assert Path(part["image"]).exists()
    video_qa = list(read_manifest(synth / "video_qa.jsonl"))
    assert len(video_qa[0].data["conversations"]) == 4  # two turns


def _nearest_colour(pixel: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - pixel) ** 2)))


def test_needles_survive_coding_and_any_uniform_sample_sees_them(synth):
    for record in read_manifest(synth / "needle_qa.jsonl"):
        needle = record.data["needle"]
        path = synth / record.data["video"]
        total = probe_video(path).num_frames
        assert needle["num_frames"] >= needle_run_length(total, 8)
        for n in (8, 13):
            frames, _ = decode_frames(path, num_frames=n)
            flat = [f for f in frames if f.reshape(-1, 3).std(axis=0).max() < 6]
            assert flat, (record.where, n)
            answer = record.data["conversations"][1]["value"]
            assert all(_nearest_colour(f.reshape(-1, 3).mean(axis=0)) == answer for f in flat)


def test_vniah_set(synth):
    index = json.loads((synth / "vniah" / "needles.json").read_text())
    haystack = synth / "vniah" / index["haystack"]
    assert probe_video(haystack).num_frames == index["num_frames"]
    for needle in index["needles"]:
        image = load_image(synth / "vniah" / needle["image"])
        assert image.shape == (64, 64, 3) and needle["question"] and needle["answer"]
        if needle["question"].startswith("What colour"):
            ink = image.reshape(-1, 3)[image.reshape(-1, 3).min(axis=1) < 200].mean(axis=0)
            assert _nearest_colour(ink) == needle["answer"]


def test_passkey_length_and_depth():
    rng = np.random.default_rng(0)
    text, key = passkey_text(rng, 500, 0.5)
    words = text.split()
    assert abs(len(words) - 500) <= 1 and f"{key}." in words
    position = words.index(f"{key}.") / len(words)
    assert 0.4 < position < 0.6
    text0, key0 = passkey_text(rng, 200, 0.0)
    assert text0.startswith(f"The pass key is {key0}.")


def test_cli_synth_and_missing_arguments(tmp_path, capsys):
    assert cli_main(["data", "synth", "--out", str(tmp_path / "d"), "--seed", "3", "--quick"]) == 0
    assert "wrote 5 sets" in capsys.readouterr().out
    assert (tmp_path / "d" / "index.json").exists()
    with pytest.raises(SystemExit) as exc:
        cli_main(["data", "long-sft"])
    assert exc.value.code == 2 and "required" in capsys.readouterr().err


def test_decode_benchmark_smoke(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "decode.py"),
            "--minutes",
            "0.1",
            "--frames",
            "8",
            "--no-write",
        ]
        + ["--cache", str(tmp_path), "--size", "96x64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| h264_0.1min_96x64_gop250 | 180 | 8 |" in result.stdout


def test_heldout_needles_are_seeded_and_disjoint_from_every_training_text(synth):
    from longvila.data.synthetic import (
        HELDOUT_CHANCE,
        HELDOUT_QUESTIONS,
        MULTI_NEEDLE_KINDS,
        NEEDLE_QUESTION,
        heldout_needles,
    )
    from longvila.train.data import PASSKEY_QUESTION

    probes = heldout_needles(seed=3, per_kind=3)
    again = heldout_needles(seed=3, per_kind=3)
    assert sorted(probes) == sorted(HELDOUT_QUESTIONS) == sorted(HELDOUT_CHANCE)
    for kind, items in probes.items():
        assert len(items) == 3
        for item, twin in zip(items, again[kind]):
            assert item["answer"] == twin["answer"]
            assert all(np.array_equal(a, b) for a, b in zip(item["images"], twin["images"]))
            assert len(item["images"]) == (2 if kind in MULTI_NEEDLE_KINDS else 1)
            assert all(i.shape == (64, 64, 3) and i.dtype == np.uint8 for i in item["images"])
    # No held-out question or answer appears in any training text the synthetic sets hold.
    training = [NEEDLE_QUESTION, PASSKEY_QUESTION]
    for manifest in synth.glob("*.jsonl"):
        for line in manifest.read_text().splitlines():
            training += [turn["value"] for turn in json.loads(line)["conversations"]]
    corpus = "\n".join(training).lower()
    for kind, question in HELDOUT_QUESTIONS.items():
        assert question.lower() not in corpus, kind
    for word in {item["answer"] for item in probes["word"]}:
        assert word not in corpus
    # Images differ from the trained needle (a flat colour): every held-out image has a white background.
    assert all((item["images"][0] == 255).all(-1).mean() > 0.3 for items in probes.values() for item in items)
    # The sum is the sum of the pair, in order.
    for pair, total in zip(probes["two_digits"], probes["digit_sum"]):
        a, b = (int(x) for x in pair["answer"].split())
        assert int(total["answer"]) == a + b


def _ink(frame: np.ndarray) -> str:
    """The colour name of a white-ground frame's one ink colour."""
    inks = {tuple(int(v) for v in rgb) for rgb in frame[(frame != 255).any(-1)]}
    assert len(inks) == 1, inks
    return {rgb: name for name, rgb in COLOURS.items()}[inks.pop()]


def _drawn_items(images: list[np.ndarray], kind: str, answer: str) -> list[tuple[str, str]]:
    """(item, ink colour) of each white-ground image whose item the answer names."""
    if kind in ("digit", "shape"):
        return [(answer, _ink(images[0]))]
    if kind == "two_digits":
        return [(item, _ink(image)) for item, image in zip(answer.split(), images)]
    if kind == "word":  # never trained in any ink
        return []
    return [("?", _ink(image)) for image in images]


@pytest.mark.parametrize("stage", [3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_no_heldout_needle_or_question_is_in_the_demo_training_stream(seed, stage):
    """Every sample stages 3 and 5 of `longvila demo --seed S` train on, regenerated: no frame is a held-out
    needle image, no training digit or shape is drawn in an ink any held-out needle uses, no question is a
    held-out question and no answer a held-out word."""
    from longvila.commands.demo import FULL
    from longvila.data.synthetic import HELDOUT_QUESTIONS, HELDOUT_WORDS, heldout_needles
    from longvila.train.data import OddFrameDataset, ResumableBatchSampler, build_dataset
    from longvila.train.recipe import load_recipe

    overrides = {"data": {"num_frames": FULL["train_frames"]}} if stage == 5 else {}
    recipe = load_recipe(f"tiny/stage{stage}", {"run": {"seed": seed}, **overrides})
    dataset = build_dataset(recipe.data, None, recipe.run.seed)
    assert isinstance(dataset, OddFrameDataset)
    sampler = ResumableBatchSampler(
        recipe.data.num_samples, recipe.data.batch_size, seed=recipe.run.seed, shuffle=recipe.data.shuffle
    )
    used = sampler.order(0)[: FULL["steps"][stage] * recipe.data.batch_size]
    # The demo asks FULL["heldout_per_kind"] probes per kind; check many more of the same stream.
    probes = heldout_needles(seed, per_kind=20)
    heldout_bytes = {image.tobytes() for items in probes.values() for p in items for image in p["images"]}
    heldout_items = {
        pair
        for kind, items in probes.items()
        for p in items
        for pair in _drawn_items(p["images"], kind, p["answer"])
    }
    trained_items, kinds, questions, answers = set(), set(), set(), set()
    for index in used:
        sample = dataset.sample(index)
        kinds.add(sample.kind)
        questions.add(sample.question)
        answers.add(sample.answer)
        assert not any(frame.tobytes() in heldout_bytes for frame in sample.frames)
        # Haystack noise is grey (40..210, never 255): frames with white pixels are the odd frames.
        odd = [frame for frame in sample.frames if (frame == 255).all(-1).mean() > 0.1]
        trained_items |= set(_drawn_items(odd, sample.kind, sample.answer))
    assert kinds == {kind for kind, share in dataset.mix.items() if share > 0}
    assert not questions & set(HELDOUT_QUESTIONS.values())
    assert not answers & set(HELDOUT_WORDS)
    # Every trained digit or shape is also held out, in a disjoint set of inks.
    trained = {item for item, _ in trained_items} - {"?"}
    assert trained and trained <= {item for item, _ in heldout_items}
    trained_inks, heldout_inks = {ink for _, ink in trained_items}, {ink for _, ink in heldout_items}
    assert len(trained_inks) >= 3 and len(heldout_inks) >= 3 and not trained_inks & heldout_inks


def test_odd_frame_mix_comes_from_the_recipe_and_samples_are_seeded():
    """`data.odd_frame_mix` reaches the dataset; kinds are drawn in its proportions; a sample is made from
    (seed, index) alone; an unknown kind or a negative share is refused by name."""
    from longvila.data.synthetic import ODD_FRAME_QUESTIONS
    from longvila.train.data import ODD_FRAME_MIX, OddFrameDataset, build_dataset
    from longvila.train.recipe import ODD_FRAME_KINDS, load_recipe

    # An override changes or adds shares of the recipe's mix (a share of 0 drops a kind).
    base = dict.fromkeys(load_recipe("tiny/stage3").data.odd_frame_mix, 0.0)
    mix = {**base, "colour": 0.2, "shape": 0.3, "digit": 0.5}
    recipe = load_recipe("tiny/stage3", {"data": {"odd_frame_mix": mix}})
    dataset = build_dataset(recipe.data, None, seed=4)
    assert dataset.mix == mix
    counts = dict.fromkeys(mix, 0)
    for index in range(600):
        counts[dataset.sample(index).kind] += 1
    for kind, share in mix.items():  # binomial sd <= 0.021 at n = 600: 4 sd either side
        assert abs(counts[kind] / 600 - share) < 0.085, counts
    again = build_dataset(recipe.data, None, seed=4)
    other = build_dataset(recipe.data, None, seed=5)
    first, twin, elsewhere = dataset.sample(17), again.sample(17), other.sample(17)
    assert first.question == twin.question and first.answer == twin.answer
    assert np.array_equal(first.frames, twin.frames)
    assert not np.array_equal(first.frames, elsewhere.frames)
    # A recipe without a mix gets the default; a bad mix is refused by name.
    default = OddFrameDataset(None, num_samples=8, min_frames=1, max_frames=4, size=64, seed=0)
    assert default.mix == ODD_FRAME_MIX and set(ODD_FRAME_MIX) <= set(ODD_FRAME_KINDS)
    assert set(ODD_FRAME_KINDS) == {"colour", *ODD_FRAME_QUESTIONS}  # every kind the generator draws
    with pytest.raises(ValueError, match="unknown kind.*'sahpe'"):
        load_recipe("tiny/stage3", {"data": {"odd_frame_mix": {"sahpe": 1.0}}})
    with pytest.raises(ValueError, match="unknown kind.*'sahpe'"):
        OddFrameDataset(None, num_samples=8, min_frames=1, max_frames=4, size=64, seed=0, mix={"sahpe": 1})
    with pytest.raises(ValueError, match="shares must be >= 0"):
        load_recipe("tiny/stage3", {"data": {"odd_frame_mix": {"colour": -1.0, "digit": 2.0}}})
    # Another data kind ignores the mix, so `--data.kind needle` on tiny/stage5 still loads.
    assert load_recipe("tiny/stage5", {"data": {"kind": "needle"}}).data.kind == "needle"


def _white_shares(pixel: np.ndarray, base: tuple[int, int, int], jitter: int) -> tuple[float, float]:
    """The interval of white shares w for which every channel of `pixel` is within `jitter` (+ rounding) of
    (1 - w) * base + w * 255 (channels at the 250 cap only bound w from below): empty when lo > hi."""
    lo, hi = -np.inf, np.inf
    for value, b in zip(pixel.tolist(), base):
        if b >= 255:
            continue
        # value = b + w (255 - b) + offset, |offset| <= jitter + 0.5; a capped channel says only "at least".
        w_low = (value - jitter - 0.5 - b) / (255 - b)
        w_high = np.inf if value >= 250 else (value + jitter + 0.5 - b) / (255 - b)
        lo, hi = max(lo, w_low), min(hi, w_high)
    return lo, hi


def test_tint_frames_are_a_named_colour_thinned_with_white_never_a_drawn_ink():
    """`tint` odd frames: one flat frame, the answer a colour name other than white and black (the held-out
    inks' names among them), its pixel that colour mixed with 0..60 % white within the stated jitter, no pure
    white pixel (so never an ink drawn on white, as the held-out needles are) and a training wording."""
    from longvila.data.synthetic import (
        HELDOUT_INKS,
        HELDOUT_QUESTIONS,
        ODD_FRAME_QUESTIONS,
        TINT_JITTER,
        TINT_WHITE,
        odd_frame_probe,
        tint_image,
    )

    assert (TINT_WHITE, TINT_JITTER) == ((0.0, 0.6), 12)  # the stated ranges, checked below independently

    rng = np.random.default_rng(11)
    answers, shares = set(), []
    for _ in range(300):
        probe = odd_frame_probe("tint", rng, 64)
        (image,) = probe["images"]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert (image == image[0, 0]).all()  # flat: no shape, no white ground
        assert not (image == 255).all(-1).any()
        assert probe["question"] in ODD_FRAME_QUESTIONS["tint"]
        assert probe["question"] not in HELDOUT_QUESTIONS.values()
        answer = probe["answer"]
        assert answer in COLOURS and answer not in ("white", "black")
        answers.add(answer)
        lo, hi = _white_shares(image[0, 0], COLOURS[answer], jitter=12)
        assert max(lo, 0.0) <= min(hi, 0.6), (answer, image[0, 0], lo, hi)  # some share in 0..60 % fits
        shares.append((lo + hi) / 2 if np.isfinite(hi) else lo)
    assert answers == set(COLOURS) - {"white", "black"} and set(HELDOUT_INKS) <= answers
    # The white share spans its range: some frames nearly flat, some more than half white.
    assert min(shares) < 0.1 and max(shares) > 0.45
    # tint_image itself: no white is the flat colour, all white is capped below pure white.
    assert (tint_image("orange", 8, 0.0) == COLOURS["orange"]).all()
    assert (tint_image("purple", 8, 1.0) == 250).all()
