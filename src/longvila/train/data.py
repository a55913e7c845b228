"""Training data: datasets per `data.kind` and a resumable, seeded batch order.

Synthetic samples are made from `(seed, index)` alone, so a sample is the same in any worker, in any
order and after a resume; the epoch's order is a permutation seeded by `(seed, epoch)`, and the data
position (epoch, micro-batch within the epoch) is all a checkpoint needs to replay the stream exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data

from longvila.data.manifest import ManifestDataset, SkipCollate
from longvila.data.synthetic import (
    COLOUR_NAMES,
    NEEDLE_QUESTION,
    needle_frame,
    noise_frames,
    odd_frame_probe,
    passkey_text,
)
from longvila.train.recipe import check_odd_frame_mix

PASSKEY_QUESTION = "There is a pass key hidden in this text. Find it.\n{text}\nWhat is the pass key?"


def log_uniform_length(rng: np.random.Generator, low: int, high: int) -> int:
    """A length in [low, high], uniform in log: short haystacks are as common as long ones per octave."""
    return int(min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high)))))))


def needle_messages(frames: np.ndarray, answer: str | None, question: str = NEEDLE_QUESTION) -> list[dict]:
    messages = [
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": question}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


class NeedleDataset(torch.utils.data.Dataset):
    """Long-video needle QA made in memory: noise frames with one flat-colour frame; answer its colour.

    Haystack lengths are log-uniform in [min_frames, max_frames]: docs/reference.md ("A synthetic needle task
    a tiny model can learn") found that this curriculum learns and extrapolates, while a fixed length
    stalls at chance.
    """

    def __init__(
        self, processor, *, num_samples: int, min_frames: int, max_frames: int, size: int, seed: int
    ):
        self.processor = processor
        self.num_samples = num_samples
        self.min_frames, self.max_frames = min_frames, max_frames
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, 5, index])
        num = log_uniform_length(rng, self.min_frames, self.max_frames)
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        frames = noise_frames(rng, num, self.size)
        frames[int(rng.integers(num))] = needle_frame(colour, self.size)
        return self.processor(needle_messages(frames, colour), num_frames=num)


ODD_FRAME_MIX = {"colour": 0.3, "digit": 0.05, "shape_colour": 0.4, "tint": 0.25}
"""Default share of each needle kind in the `odd_frame` task (a recipe's `data.odd_frame_mix` replaces it):
the flat colour (the trained V-NIAH needle, with NEEDLE_QUESTION) and the odd-frame kinds of
`longvila.data.synthetic.odd_frame_probe` (`ODD_FRAME_KINDS` lists every drawable kind). The demo's stage 5
uses it; its stage 3 (`recipes/tiny/stage3.yaml`) has "which shape" at 0.1 instead of digits. `tint` (a
colour thinned with white, one flat frame) is what makes held-out inks on a shape transfer; "which shape"
in stage 5 made the model answer colour questions with shape names; a few digits keep a drawn item in every
stage, which the held-out check compares with the held-out needles (docs/evaluation.md)."""


@dataclass(frozen=True)
class OddFrameSample:
    """One `odd_frame` sample before the processor: frames uint8 (N, H, W, 3), the question, the answer."""

    kind: str
    frames: np.ndarray
    question: str
    answer: str


class OddFrameDataset(torch.utils.data.Dataset):
    """Long-video "find the odd frame and describe it" made in memory: noise frames with one or two odd
    frames of a kind drawn from `mix` (a flat colour, a digit, a shape, two digits), and a question about
    them. Lengths are log-uniform in [min_frames, max_frames] as in `NeedleDataset`; the odd frames
    replace noise frames at random places, in order.

    The skill (read what the odd frame shows, at any length) is what the held-out V-NIAH needles test;
    their images and questions are never drawn here (docs/evaluation.md, "What is held out").
    """

    def __init__(
        self,
        processor,
        *,
        num_samples: int,
        min_frames: int,
        max_frames: int,
        size: int,
        seed: int,
        mix: dict[str, float] | None = None,
    ):
        self.processor = processor
        self.num_samples = num_samples
        self.min_frames, self.max_frames = min_frames, max_frames
        self.size = size
        self.seed = seed
        self.mix = mix = dict(mix or ODD_FRAME_MIX)
        check_odd_frame_mix(mix, "odd-frame mix")
        self.kinds = tuple(mix)  # in the mix's order: the same shares in another order draw other kinds
        weights = np.array([mix[k] for k in self.kinds], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> OddFrameSample:
        """The raw sample `index` (made from (seed, index) alone)."""
        rng = np.random.default_rng([self.seed, 6, index])
        kind = self.kinds[
            min(int(np.searchsorted(self.cumulative, rng.uniform(), side="right")), len(self.kinds) - 1)
        ]
        if kind == "colour":
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            probe = {
                "images": [needle_frame(colour, self.size)],
                "question": NEEDLE_QUESTION,
                "answer": colour,
            }
        else:
            probe = odd_frame_probe(kind, rng, self.size)
        images = probe["images"]
        num = max(len(images), log_uniform_length(rng, self.min_frames, self.max_frames))
        frames = noise_frames(rng, num, self.size)
        for at, image in zip(np.sort(rng.choice(num, len(images), replace=False)), images):
            frames[at] = image
        return OddFrameSample(kind, frames, probe["question"], probe["answer"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.sample(index)
        messages = needle_messages(sample.frames, sample.answer, sample.question)
        return self.processor(messages, num_frames=len(sample.frames))


class PasskeyDataset(torch.utils.data.Dataset):
    """Text-only passkey retrieval made in memory (stage 4, context extension)."""

    def __init__(self, processor, *, num_samples: int, words: int, seed: int):
        self.processor = processor
        self.num_samples = num_samples
        self.words = words
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, 4, index])
        text, key = passkey_text(rng, self.words, float(rng.uniform()))
        messages = [
            {"role": "user", "content": PASSKEY_QUESTION.format(text=text)},
            {"role": "assistant", "content": key},
        ]
        return self.processor(messages)


def build_dataset(data, processor, seed: int) -> torch.utils.data.Dataset:
    """The dataset a recipe's `data` section describes."""
    if data.kind in ("needle", "odd_frame"):
        shape = {
            "num_samples": data.num_samples,
            "min_frames": data.min_frames,
            "max_frames": data.num_frames,
        }
        if data.kind == "needle":
            return NeedleDataset(processor, **shape, size=data.frame_size, seed=seed)
        return OddFrameDataset(
            processor, **shape, size=data.frame_size, seed=seed, mix=data.odd_frame_mix or None
        )
    if data.kind == "passkey":
        return PasskeyDataset(processor, num_samples=data.num_samples, words=data.text_words, seed=seed)
    if data.kind == "packed_text":
        from longvila.data.pack_text import PackedTextDataset

        return PackedTextDataset(data.packed_text_dir)
    return ManifestDataset(
        data.manifest,
        processor,
        media_root=data.media_root,
        num_frames=None if data.fps else data.num_frames,
        fps=data.fps,
        max_frames=data.max_frames,
        on_error=data.on_error,
    )


class PackedRowCollate:
    """Rows of `longvila data pack-text` are already packed: check the layout multiple, pass them on."""

    def __init__(self, pad_to_multiple_of: int = 1):
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from longvila.data.pack_text import PackedTextDataset

        row = PackedTextDataset.collate(rows)
        length = row["input_ids"].shape[1]
        if length % self.pad_to_multiple_of:
            raise ValueError(
                f"packed text rows of {length} tokens do not divide into the parallel layout's multiple "
                f"{self.pad_to_multiple_of}: pack with a --length that does"
            )
        return row


class PackCollate:
    """Pack a micro-batch of samples into one row (picklable for DataLoader workers)."""

    def __init__(self, processor, pad_to_multiple_of: int = 1):
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.processor.collate(samples, pad_to_multiple_of=self.pad_to_multiple_of)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of sample indices for one data-parallel rank, in a seeded order per epoch.

    Every epoch is `len(dataset) // (batch_size * dp_degree)` global batches (the ragged tail is dropped so
    every rank takes the same number of steps); rank `dp_rank` takes its slice of each. `set_position`
    chooses the epoch and the first micro-batch to yield, which is how a resumed run rejoins the stream.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        dp_rank: int = 0,
        dp_degree: int = 1,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.epoch = 0
        self.start = 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data has {num_samples} samples, fewer than one global batch "
                f"(data.batch_size {batch_size} x {dp_degree} data-parallel ranks)"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.dp_degree)

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        width = self.batch_size * self.dp_degree
        for b in range(self.start, self.batches_per_epoch):
            chunk = order[b * width : (b + 1) * width]
            yield chunk[self.dp_rank * self.batch_size : (self.dp_rank + 1) * self.batch_size]


def build_loader(dataset, sampler: ResumableBatchSampler, collate, num_workers: int, seed: int):
    """A DataLoader over `sampler`, its own generator so that it never draws from the global RNG."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=SkipCollate(collate),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
