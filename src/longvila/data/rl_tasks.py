"""Synthetic video questions with rule-checkable answers, for reinforcement learning (stage 6).

Two tasks, each made from `(seed, split, index)` alone so that any order, worker or resume replays it:

- `count`: a video of `num_frames` frames, each flat red or flat in another colour, every frame's shade
  jittered by up to `SHADE_JITTER` per channel; "How many red frames are in this video?"; the answer is
  the count as digits (checked by exact match).
- `order`: two flat-colour frames in grey noise; "Which colour comes first?" with two lettered options in
  random order; the answer is a letter (checked as a multiple-choice letter).

The `train` and `heldout` splits draw from separate seed streams and, more strictly, from disjoint
halves of the video space (a question's content signature has a CRC parity per split; draws of the other
parity are rejected), so no held-out video occurs in training. The shade jitter is what keeps the halves
alike: with exact flat colours a count has few distinct videos (one for "all red"), so a parity split
would put every "all red" video in one split -- the held-out split held the answer `num_frames` 40 % of
the time and training never (the cause of an early demo's small RL gain). With the jitter every count has
plenty of videos in both halves, and both splits see counts uniform in 0..num_frames.
`labelled_example` gives the target text of a question in the reasoning format
`<think>...</think><answer>...</answer>` (the cold-start SFT that precedes RL).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from longvila.data.synthetic import COLOURS, noise_frame

TASKS = ("count", "order")
SPLITS = {"train": 1, "heldout": 2}
FORMAT_HINT = "Think, then give the answer inside <answer></answer>."
COUNT_COLOUR = "red"
COUNT_QUESTION = f"How many {COUNT_COLOUR} frames are in this video? {FORMAT_HINT}"
ORDER_QUESTION = (
    "Which colour comes first in this video? A) {a} B) {b}. Answer with the letter. " + FORMAT_HINT
)
LETTERS = "AB"
SHADE_JITTER = 16
"""Largest per-channel shift of a count frame's flat colour (red stays far nearer red than any other)."""


@dataclass(frozen=True)
class RLQuestion:
    """One question over one synthetic video.

    frames: (F, H, W, 3) uint8; answer: the text a correct reply holds in `<answer>`; kind: how the
    answer is checked (`exact` or `choice`); thought: the short reasoning of the labelled example.
    """

    frames: np.ndarray
    question: str
    answer: str
    kind: str
    thought: str

    def messages(self) -> list[dict]:
        """The user turn (video then question) in the processor's message layout."""
        content = [{"type": "video", "video": self.frames}, {"type": "text", "text": self.question}]
        return [{"role": "user", "content": content}]

    def labelled_example(self) -> str:
        """The target reply in the reasoning format, for the cold-start SFT."""
        return f"<think>{self.thought}</think><answer>{self.answer}</answer>"


def _flat(colour: str, size: int, shift: np.ndarray | None = None) -> np.ndarray:
    rgb = np.array(COLOURS[colour], dtype=np.int16) + (0 if shift is None else shift)
    return np.broadcast_to(np.clip(rgb, 0, 255).astype(np.uint8), (size, size, 3)).copy()


def _in_split(signature: bytes, parity: int) -> bool:
    return zlib.crc32(signature) % 2 == parity


def count_question(rng: np.random.Generator, num_frames: int, size: int, parity: int) -> RLQuestion:
    """`num_frames` flat frames, k of them red (k uniform in 0..num_frames), the rest other colours,
    each frame's shade shifted by a uniform draw in [-SHADE_JITTER, SHADE_JITTER] per channel."""
    others = [c for c in COLOURS if c != COUNT_COLOUR]
    count = int(rng.integers(num_frames + 1))  # drawn once: the split rejection must not bias it
    while True:
        is_red = np.zeros(num_frames, dtype=bool)
        is_red[rng.choice(num_frames, size=count, replace=False)] = True
        names = [COUNT_COLOUR if red else others[int(rng.integers(len(others)))] for red in is_red]
        shifts = rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, size=(num_frames, 3))
        frames = np.stack([_flat(name, size, shift) for name, shift in zip(names, shifts)])
        if _in_split(frames.tobytes(), parity):
            break
    return RLQuestion(frames, COUNT_QUESTION, str(count), "exact", "count")


def order_question(rng: np.random.Generator, num_frames: int, size: int, parity: int) -> RLQuestion:
    """Two distinct flat colours at two distinct positions in noise; ask which comes first."""
    if num_frames < 2:
        raise ValueError(f"the order task needs at least 2 frames, got num_frames={num_frames}")
    names = list(COLOURS)
    while True:
        first, second = (names[int(i)] for i in rng.choice(len(names), size=2, replace=False))
        where = np.sort(rng.choice(num_frames, size=2, replace=False))
        if _in_split(f"{first},{second},{where[0]},{where[1]}".encode(), parity):
            break
    frames = np.stack([noise_frame(rng, size) for _ in range(num_frames)])
    frames[where[0]], frames[where[1]] = _flat(first, size), _flat(second, size)
    swap = bool(rng.integers(2))
    options = (second, first) if swap else (first, second)
    answer = LETTERS[options.index(first)]
    return RLQuestion(frames, ORDER_QUESTION.format(a=options[0], b=options[1]), answer, "choice", "order")


def make_question(task: str, split: str, index: int, *, seed: int, num_frames: int, size: int) -> RLQuestion:
    """Question `index` of `split` ("train" or "heldout") of `task`; the same for the same arguments."""
    if task not in TASKS:
        raise ValueError(f"rl task {task!r} is not one of {list(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    if num_frames < 1 or size < 8:
        raise ValueError(f"num_frames must be >= 1 and size >= 8, got {num_frames} and {size}")
    rng = np.random.default_rng([seed, 6, SPLITS[split], index])
    make = count_question if task == "count" else order_question
    return make(rng, num_frames, size, SPLITS[split] - 1)


class RLTaskSet:
    """`num` questions of one task and split, made on demand (indexable, sized)."""

    def __init__(self, task: str, split: str, num: int, *, seed: int, num_frames: int, size: int):
        if num < 1:
            raise ValueError(f"an RL task set needs at least one question, got {num}")
        make_question(task, split, 0, seed=seed, num_frames=num_frames, size=size)  # validates arguments
        self.task, self.split, self.num = task, split, num
        self.seed, self.num_frames, self.size = seed, num_frames, size

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> RLQuestion:
        if not 0 <= index < self.num:
            raise IndexError(f"question {index} of a set of {self.num}")
        return make_question(
            self.task, self.split, index, seed=self.seed, num_frames=self.num_frames, size=self.size
        )
