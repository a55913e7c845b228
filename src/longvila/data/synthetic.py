"""Seeded synthetic data for every training stage and for V-NIAH, written as real files + manifests.

| set | file | stage |
|---|---|---|
| image and video captions | captions.jsonl | 1 alignment, 2 pre-training |
| short-video QA (colour, shape, direction; two turns) | video_qa.jsonl | 3 short SFT |
| passkey retrieval in filler text | passkey.jsonl | 4 context extension |
| long-video needle QA (one flat-colour run in noise) | needle_qa.jsonl | 5 long SFT |
| V-NIAH haystack video + needle images | vniah/needles.json | evaluation |
| held-out V-NIAH needles (digits, shapes, words, two-needle) | `heldout_needles()` in memory | evaluation |

Videos are H.264 MP4 (libx264, one thread, crf 10: needles are large flat colours, which survive
coding). Same seed, same bytes: manifests always; videos too with this PyAV/x264 build (x264 with
one thread and its macroblock tree off is deterministic, and the MP4 muxer writes no dates).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "cyan": (30, 210, 220),
    "magenta": (210, 40, 200),
    "orange": (245, 140, 20),
    "purple": (110, 30, 150),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Seven-segment layout: segments a..g lit for each digit.
_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}  # fmt: skip
SETS = ("captions", "video_qa", "passkey", "needle_qa", "vniah")


def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent stream per set, so adding a set never changes another's data."""
    return np.random.default_rng([seed, SETS.index(name)])


# --------------------------------------------------------------------------------------------------
# Drawing


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean (size, size) mask of a square, circle or triangle centred at (cx, cy)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "triangle":  # apex up, base at cy + radius
        return (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def draw_digit(frame: np.ndarray, digit: int, colour: tuple[int, int, int]) -> np.ndarray:
    """Draw `digit` as a thick seven-segment figure filling the middle of `frame` (in place)."""
    h, w = frame.shape[:2]
    t = max(2, w // 8)  # stroke
    left, right, top, mid, bottom = w // 4, w - w // 4, h // 8, h // 2, h - h // 8
    boxes = {
        "a": (top, top + t, left, right),
        "b": (top, mid, right - t, right),
        "c": (mid, bottom, right - t, right),
        "d": (bottom - t, bottom, left, right),
        "e": (mid, bottom, left, left + t),
        "f": (top, mid, left, left + t),
        "g": (mid - t // 2, mid + (t + 1) // 2, left, right),
    }
    for segment in _SEGMENTS[digit]:
        y0, y1, x0, x1 = boxes[segment]
        frame[y0:y1, x0:x1] = colour
    return frame


def noise_frame(rng: np.random.Generator, size: int, block: int = 8) -> np.ndarray:
    """Greyish block noise: busy, but never one flat colour, so it cannot pass for a needle. One frame of
    `noise_frames` (the same draws from `rng`)."""
    return noise_frames(rng, 1, size, block)[0]


# The trained needle: a flat colour frame among block-noise frames (stage 5 and the trained V-NIAH)

NEEDLE_QUESTION = (
    "One moment of this video is a single flat colour. Which colour is it? Answer with one word."
)
"""The question of the trained needle (stage 5, `needle_qa`, the demo's `niah_trained`)."""
COLOUR_NAMES = tuple(COLOURS)


def needle_frame(colour: str, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 frame of one flat colour: the needle."""
    return np.broadcast_to(np.array(COLOURS[colour], dtype=np.uint8), (size, size, 3)).copy()


def noise_frames(rng: np.random.Generator, num: int, size: int, block: int = 8) -> np.ndarray:
    """(num, size, size, 3) uint8 haystack frames of grey block noise (never one flat colour, never
    white), drawn for all frames at once (the data loader's hot spot)."""
    cells = rng.integers(60, 190, (num, size // block, size // block, 1), dtype=np.uint8)
    tint = rng.integers(-20, 21, (num, size // block, size // block, 3))
    small = np.clip(cells.astype(np.int16) + tint, 0, 255).astype(np.uint8)
    return small.repeat(block, axis=1).repeat(block, axis=2)


def moving_shape_frames(
    shape: str, colour: str, background: str, direction: str, num_frames: int, size: int
) -> np.ndarray:
    """(T, size, size, 3): a shape crossing the frame in `direction` over a flat background."""
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    radius = size / 6
    dx, dy = DIRECTIONS[direction]
    for i in range(num_frames):
        progress = i / max(num_frames - 1, 1)  # 0 -> 1
        offset = (progress - 0.5) * (size - 3 * radius)
        cx, cy = size / 2 + dx * offset, size / 2 + dy * offset
        frames[i] = COLOURS[background]
        frames[i][shape_mask(shape, size, cx, cy, radius)] = COLOURS[colour]
    return frames


def write_mp4(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: int = 8, crf: int = 10) -> Path:
    """Encode RGB frames as H.264 MP4, deterministically (one encoder thread, no macroblock tree)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = None
        for i, rgb in enumerate(frames):
            if stream is None:
                # mbtree off: x264's macroblock-tree rate control gave different bytes (and pixels off by up to
                # 3) from run to run on the same frames, even on one thread (2 of 16 encodes of one clip);
                # without it 48 of 48 were identical.
                opts = {
                    "crf": str(crf),
                    "preset": "veryfast",
                    "threads": "1",
                    "g": str(4 * fps),
                    "x264-params": "mbtree=0",
                }
                stream = container.add_stream("libx264", rate=fps, options=opts)
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
            # Convert to the encoder's format here: left to `encode`, PyAV's RGB -> YUV conversion gave
            # slightly different pixels from run to run on the same frames (seen with PyAV 18.1), and
            # byte-identical sets per seed would not hold.
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    choices = [o for o in options if o not in exclude]
    return choices[int(rng.integers(len(choices)))]


# --------------------------------------------------------------------------------------------------
# The sets


def make_captions(
    out_dir: str | os.PathLike, seed: int = 0, num_images: int = 16, num_videos: int = 8, size: int = 64
) -> Path:
    """Image and short-video captions (stages 1-2): "A red circle on a blue background." """
    out, rng = Path(out_dir), _rng(seed, "captions")
    records = []
    for i in range(num_images):
        shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
        background = _pick(rng, COLOURS, exclude=(colour,))
        image = np.empty((size, size, 3), dtype=np.uint8)
        image[:] = COLOURS[background]
        image[shape_mask(shape, size, size / 2, size / 2, size / 4)] = COLOURS[colour]
        rel = f"captions/image_{i:04d}.png"
        (out / "captions").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / rel)
        caption = f"A {colour} {shape} on a {background} background."
        records.append(
            {
                "id": f"caption-image-{i}",
                "image": rel,
                "conversations": _turns(("<image>\nDescribe the image.", caption)),
            }
        )
    for i in range(num_videos):
        shape, colour, direction = _pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, DIRECTIONS)
        background = _pick(rng, COLOURS, exclude=(colour,))
        rel = f"captions/video_{i:04d}.mp4"
        write_mp4(out / rel, moving_shape_frames(shape, colour, background, direction, 16, size))
        caption = f"A {colour} {shape} moves {direction} across a {background} background."
        records.append(
            {
                "id": f"caption-video-{i}",
                "video": rel,
                "conversations": _turns(("<video>\nDescribe the video.", caption)),
            }
        )
    return _write_jsonl(out / "captions.jsonl", records)


def make_video_qa(
    out_dir: str | os.PathLike, seed: int = 0, num: int = 16, num_frames: int = 16, size: int = 64
) -> Path:
    """Short-video QA (stage 3), two turns: what shape and colour, then which way it moves."""
    out, rng = Path(out_dir), _rng(seed, "video_qa")
    records = []
    for i in range(num):
        shape, colour, direction = _pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, DIRECTIONS)
        background = _pick(rng, COLOURS, exclude=(colour,))
        rel = f"video_qa/{i:04d}.mp4"
        write_mp4(out / rel, moving_shape_frames(shape, colour, background, direction, num_frames, size))
        conversations = _turns(
            ("<video>\nWhat moves in the video?", f"A {colour} {shape}."),
            ("Which way does it move? Answer with one word.", direction),
        )
        records.append({"id": f"video-qa-{i}", "video": rel, "conversations": conversations})
    return _write_jsonl(out / "video_qa.jsonl", records)


FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
).split()


def passkey_text(rng: np.random.Generator, length: int, depth: float) -> tuple[str, str]:
    """`length` words of filler with "The pass key is NNNNN. Remember it." at `depth` (0..1)."""
    key = str(int(rng.integers(10_000, 100_000)))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.".split()
    filler = [FILLER[i % len(FILLER)] for i in range(max(length - len(needle), 0))]
    cut = int(round(depth * len(filler)))
    # Start the needle on a sentence boundary so it reads as its own sentences.
    while 0 < cut < len(filler) and not filler[cut - 1].endswith("."):
        cut -= 1
    return " ".join(filler[:cut] + needle + filler[cut:]), key


def make_passkey(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num: int = 16,
    length: int = 2000,
    depths: Iterable[float] | None = None,
) -> Path:
    """Text-only passkey retrieval at about `length` words (stage 4, context extension)."""
    out, rng = Path(out_dir), _rng(seed, "passkey")
    depths = list(depths) if depths is not None else [0.0, 0.25, 0.5, 0.75, 1.0]
    records = []
    for i in range(num):
        depth = depths[i % len(depths)]
        text, key = passkey_text(rng, length, depth)
        question = f"There is a pass key hidden in this text. Find it.\n{text}\nWhat is the pass key?"
        records.append({"id": f"passkey-{i}", "depth": depth, "conversations": _turns((question, key))})
    out.mkdir(parents=True, exist_ok=True)
    return _write_jsonl(out / "passkey.jsonl", records)


def needle_run_length(num_frames: int, min_sample_frames: int) -> int:
    """Frames the needle must last so any uniform sample of >= min_sample_frames frames hits it."""
    return int(np.ceil((num_frames - 1) / max(min_sample_frames - 1, 1))) + 1


def make_needle_qa(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num: int = 8,
    num_frames: int = 128,
    size: int = 64,
    depths: Iterable[float] | None = None,
    min_sample_frames: int = 16,
) -> Path:
    """Long-video needle QA (stage 5): noise frames with one run of a flat colour at a depth.

    The needle lasts `needle_run_length(num_frames, min_sample_frames)` frames, so sampling at
    least `min_sample_frames` frames uniformly always shows it. The record keeps `needle`
    (colour, depth, first frame, length) for checking.
    """
    out, rng = Path(out_dir), _rng(seed, "needle_qa")
    depths = list(depths) if depths is not None else [0.0, 0.25, 0.5, 0.75, 1.0]
    run = needle_run_length(num_frames, min_sample_frames)
    question = "<video>\n" + NEEDLE_QUESTION
    records = []
    for i in range(num):
        depth, colour = depths[i % len(depths)], _pick(rng, COLOURS)
        start = int(round(depth * (num_frames - run)))
        frames = np.stack([noise_frame(rng, size) for _ in range(num_frames)])
        frames[start : start + run] = COLOURS[colour]
        rel = f"needle_qa/{i:04d}.mp4"
        write_mp4(out / rel, frames)
        needle = {"colour": colour, "depth": depth, "start_frame": start, "num_frames": run}
        records.append(
            {"id": f"needle-{i}", "video": rel, "needle": needle, "conversations": _turns((question, colour))}
        )
    return _write_jsonl(out / "needle_qa.jsonl", records)


def make_vniah(
    out_dir: str | os.PathLike,
    seed: int = 0,
    haystack_seconds: int = 120,
    fps: int = 2,
    size: int = 64,
    num_needles: int = 10,
) -> Path:
    """The V-NIAH haystack video and needle set (evaluation; docs/evaluation.md).

    Writes vniah/haystack.mp4 (drifting colour fields with noise), vniah/needles/NN.png (a digit on
    white in a held-out ink colour) and vniah/needles.json: {"haystack", "fps", "needles": [{"image", "question",
    "answer"}]}; questions alternate between the digit and its colour.
    """
    out, rng = Path(out_dir) / "vniah", _rng(seed, "vniah")
    (out / "needles").mkdir(parents=True, exist_ok=True)
    num_frames = haystack_seconds * fps
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phases = rng.uniform(0, 2 * np.pi, 3)

    def haystack():
        for i in range(num_frames):
            t = i / num_frames * 2 * np.pi
            base = np.stack([np.sin(3 * x + t + phases[c]) * np.cos(2 * y - t) for c in range(3)], axis=-1)
            grain = rng.normal(0, 0.15, (size, size, 3))
            yield np.clip((base + grain) * 70 + 128, 0, 255).astype(np.uint8)

    write_mp4(out / "haystack.mp4", haystack(), fps=fps)
    needles = []
    for i in range(num_needles):
        # Held-out inks, as the demo's held-out needles: never a training frame.
        digit = int(rng.integers(10))
        colour = ink_colour(rng, heldout=True)
        image = digit_image(digit, colour, size)
        rel = f"needles/{i:02d}.png"
        Image.fromarray(image).save(out / rel)
        if i % 2 == 0:
            needles.append(
                {"image": rel, "question": "What number is written in the image?", "answer": str(digit)}
            )
        else:
            needles.append(
                {"image": rel, "question": "What colour is the number in the image?", "answer": colour}
            )
    index = {"haystack": "haystack.mp4", "fps": fps, "num_frames": num_frames, "needles": needles}
    path = out / "needles.json"
    path.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Odd frames: the needle family stage 5 trains on, and the held-out V-NIAH needles

TRAINING_INKS = ("red", "yellow", "green", "blue", "magenta", "black")
"""Ink colours of the digits and shapes stage 3 and 5 train on (on a white ground)."""
HELDOUT_INKS = ("orange", "cyan", "purple")
"""Ink colours of the held-out needles, never an ink in training: each lies between two training inks in
hue (orange: red-yellow, cyan: green-blue, purple: blue-magenta). Every digit and shape is trained in every
training ink, so an ink says nothing about the digit or shape (a split of (item, ink) pairs would: there a
model learns which items an ink never carries, and is wrong exactly on the held-out pairs)."""
HELDOUT_WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "house")
"""Words the rendered-text needles spell (never in any caption, question or answer of the sets)."""
HELDOUT_QUESTIONS = {
    "digit": "What number is written in the image?",
    "shape": "What shape is shown in the image? Answer with one word.",
    "word": "What word is written in the image?",
    "shape_colour": "What colour is the shape in the image? Answer with one word.",
    "two_digits": "Two frames show a number. Which numbers, in order? Answer like 3 7.",
    "digit_sum": "Two frames show a number. What is their sum?",
}
"""One question per held-out needle kind; none is a training question (`ODD_FRAME_QUESTIONS` are the
training wordings: they share the key word -- number, shape, colour, order, sum -- never the sentence)."""
HELDOUT_CHANCE = {
    "digit": 1 / 10,
    "shape": 1 / len(SHAPES),
    "word": 1 / len(HELDOUT_WORDS),
    "shape_colour": 1 / len(HELDOUT_INKS),
    "two_digits": 1 / 100,
    "digit_sum": 10 / 100,  # the likeliest sum (9) of two uniform digits
}
"""Accuracy of the best blind guess for each kind (answers drawn uniformly)."""
MULTI_NEEDLE_KINDS = ("two_digits", "digit_sum")
"""Kinds whose probe is two needle frames (multi-needle; the sum is a two-hop question)."""
ODD_FRAME_QUESTIONS = {
    "digit": (
        "One frame of this video shows a number. Which number is it?",
        "Read the number on the odd frame. Answer with one digit.",
        "What number does the odd frame show?",
        "Which number is drawn in the odd picture?",
    ),
    "shape": (
        "One frame of this video shows a shape. Which shape is it? Answer with one word.",
        "Name the shape on the odd frame. Answer with one word.",
        "What shape does the odd frame show?",
        "Which shape is drawn in the odd picture? Answer with one word.",
    ),
    "shape_colour": (
        "One frame of this video shows a shape. Which colour is that shape? Answer with one word.",
        "Name the colour of the shape on the odd frame. Answer with one word.",
        "What colour is the shape that the odd frame shows?",
        "Which colour is the shape drawn in the odd picture? Answer with one word.",
    ),
    "two_digits": (
        "Two frames of this video show numbers. Give both numbers in order, like 3 7.",
        "Read the numbers on the two odd frames, in order. Answer like 3 7.",
        "What numbers do the two odd frames show, in order?",
    ),
    "tint": (
        "One frame of this video is a pale colour. Which colour is it? Answer with one word.",
        "Name the colour of the odd frame, however pale. Answer with one word.",
        "What colour is the odd frame washed with?",
        "Which colour tints the odd picture? Answer with one word.",
    ),
    "digit_sum": (
        "Two frames of this video show numbers. Give the sum of the two numbers.",
        "Add the numbers on the two odd frames. What is the sum?",
        "What is the sum of the numbers that the two odd frames show?",
    ),
}
"""Training wordings of the odd-frame kinds (stage 5), several per kind so the model keys on the
question's meaning rather than one sentence; the evaluation asks `HELDOUT_QUESTIONS` instead."""


TINT_COLOURS = tuple(c for c in COLOUR_NAMES if c not in ("white", "black"))
"""Base colours of the `tint` odd frames: every colour name but white and black (white mixed with white is
white; black mixed with white is grey, which is not named), the held-out inks' names included -- flat frames
of those are trained anyway (the flat-colour needle), and a tint frame is flat, never an ink on white."""
TINT_WHITE = (0.0, 0.6)
"""Range of the share of white mixed into a `tint` frame (uniform)."""
TINT_JITTER = 12
"""Largest per-channel offset (uniform, in 0..255 levels) added to a `tint` frame's colour."""


def tint_image(colour: str, size: int, white: float, offset: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """(size, size, 3) uint8: the named `colour` mixed with white (255) in the share `white` (0: the flat
    colour, 1: white), plus a per-channel `offset`, one flat frame. Channels are clipped to 0..250 so no
    pixel is the pure white that the held-out needles' ground is made of."""
    base = np.array(COLOURS[colour], dtype=np.float64)
    rgb = (1.0 - white) * base + white * 255.0 + np.asarray(offset, dtype=np.float64)
    pixel = np.clip(np.round(rgb), 0, 250).astype(np.uint8)
    return np.broadcast_to(pixel, (size, size, 3)).copy()


def ink_colour(rng: np.random.Generator, heldout: bool) -> str:
    """A random ink colour for a digit or shape: one of HELDOUT_INKS or of TRAINING_INKS."""
    return _pick(rng, HELDOUT_INKS if heldout else TRAINING_INKS)


def render_word(word: str, size: int, colour: tuple[int, int, int] = (5, 5, 5)) -> np.ndarray:
    """(size, size, 3) uint8: `word` in PIL's built-in bitmap font, scaled up (nearest) to span the
    frame, dark on white, so the letters survive the tower's resize."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=10) if _pil_font_sizes() else ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font)
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 255)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), word, fill=0, font=font)
    scale = max(1, (size - 4) // canvas.width)
    big = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    y0, x0 = (size - big.height) // 2, (size - big.width) // 2
    ink = np.asarray(big) < 128
    region = image[y0 : y0 + big.height, x0 : x0 + big.width]
    region[ink[: region.shape[0], : region.shape[1]]] = colour
    return image


def _pil_font_sizes() -> bool:
    """Pillow >= 10.1 scales its built-in font; older ones have one fixed bitmap size."""
    import inspect

    from PIL import ImageFont

    return "size" in inspect.signature(ImageFont.load_default).parameters


def digit_image(digit: int, colour: str, size: int, box: tuple[int, int, int] | None = None) -> np.ndarray:
    """A `colour` seven-segment `digit` on white, (size, size, 3) uint8, filling the frame or the
    square `box` = (top, left, side)."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    top, left, side = box or (0, 0, size)
    draw_digit(image[top : top + side, left : left + side], digit, COLOURS[colour])
    return image


def shape_image(
    shape: str, colour: str, size: int, centre: tuple[float, float] | None = None, radius: float | None = None
) -> np.ndarray:
    """A `colour` `shape` on white, (size, size, 3) uint8; centred with radius size/3 by default."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    cx, cy = centre or (size / 2, size / 2)
    image[shape_mask(shape, size, cx, cy, radius or size / 3)] = COLOURS[colour]
    return image


def _jittered_digit(rng: np.random.Generator, digit: int, size: int) -> np.ndarray:
    """A training digit: one of TRAINING_INKS, a random square box of side 5/8..1 of the frame."""
    side = int(rng.integers(size * 5 // 8, size + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    return digit_image(digit, ink_colour(rng, heldout=False), size, (top, left, side))


def _jittered_shape(rng: np.random.Generator, shape: str, colour: str, size: int) -> np.ndarray:
    """A training shape: radius size/5..size/3 at a random centre that keeps it in the frame."""
    radius = float(rng.uniform(size / 5, size / 3))
    cx, cy = rng.uniform(radius, size - radius, 2)
    return shape_image(shape, colour, size, (float(cx), float(cy)), radius)


def odd_frame_probe(kind: str, rng: np.random.Generator, size: int) -> dict:
    """One training odd-frame probe of `kind` (a key of ODD_FRAME_QUESTIONS): {"images": [uint8
    (size, size, 3)] (two for MULTI_NEEDLE_KINDS), "question", "answer"}.

    Digits and shapes are drawn on white in one of TRAINING_INKS at a random size and place; a `tint` is
    one flat frame of a colour of TINT_COLOURS mixed with a random share (TINT_WHITE) of white and
    jittered per channel (TINT_JITTER), answered with the colour's name ("ink thinned with white is
    still named by the ink"); the question is one of the kind's training wordings."""
    question = _pick(rng, ODD_FRAME_QUESTIONS[kind])
    if kind == "digit":
        digit = int(rng.integers(10))
        return {"images": [_jittered_digit(rng, digit, size)], "question": question, "answer": str(digit)}
    if kind in ("shape", "shape_colour"):
        index = int(rng.integers(len(SHAPES)))
        colour = ink_colour(rng, heldout=False)
        answer = SHAPES[index] if kind == "shape" else colour
        return {
            "images": [_jittered_shape(rng, SHAPES[index], colour, size)],
            "question": question,
            "answer": answer,
        }
    if kind == "tint":
        colour = _pick(rng, TINT_COLOURS)
        white = float(rng.uniform(*TINT_WHITE))
        offset = tuple(int(v) for v in rng.integers(-TINT_JITTER, TINT_JITTER + 1, 3))
        return {"images": [tint_image(colour, size, white, offset)], "question": question, "answer": colour}
    if kind in MULTI_NEEDLE_KINDS:
        a, b = (int(d) for d in rng.integers(10, size=2))
        answer = f"{a} {b}" if kind == "two_digits" else str(a + b)
        images = [_jittered_digit(rng, a, size), _jittered_digit(rng, b, size)]
        return {"images": images, "question": question, "answer": answer}
    raise ValueError(f"unknown odd-frame kind {kind!r}; choose from {tuple(ODD_FRAME_QUESTIONS)}")


def heldout_needles(seed: int = 0, per_kind: int = 4, size: int = 64) -> dict[str, list[dict]]:
    """Held-out V-NIAH probes, `per_kind` of each kind in HELDOUT_QUESTIONS: {kind: [{"images":
    [uint8 (size, size, 3), ...], "question", "answer"}]}. One image per probe, two for the
    MULTI_NEEDLE_KINDS (placed in that order in the video). Seeded; answers drawn uniformly.

    Digits and shapes are drawn centred and full size in one of HELDOUT_INKS (never an ink in training);
    words are never drawn in training at all."""
    rng = np.random.default_rng([seed, 7919])  # a stream no training set draws from
    probes: dict[str, list[dict]] = {kind: [] for kind in HELDOUT_QUESTIONS}

    def digit(value: int) -> np.ndarray:
        return digit_image(value, ink_colour(rng, heldout=True), size)

    for _ in range(per_kind):
        value = int(rng.integers(10))
        probes["digit"].append({"images": [digit(value)], "answer": str(value)})
        index = int(rng.integers(len(SHAPES)))
        colour = ink_colour(rng, heldout=True)
        probes["shape"].append(
            {"images": [shape_image(SHAPES[index], colour, size)], "answer": SHAPES[index]}
        )
        word = _pick(rng, HELDOUT_WORDS)
        probes["word"].append({"images": [render_word(word, size)], "answer": word})
        shape, colour = _pick(rng, SHAPES), ink_colour(rng, heldout=True)
        probes["shape_colour"].append({"images": [shape_image(shape, colour, size)], "answer": colour})
        a, b = (int(d) for d in rng.integers(10, size=2))
        pair = [digit(a), digit(b)]
        probes["two_digits"].append({"images": pair, "answer": f"{a} {b}"})
        probes["digit_sum"].append({"images": pair, "answer": str(a + b)})
    for kind, items in probes.items():
        for item in items:
            item["question"] = HELDOUT_QUESTIONS[kind]
    return probes


# Sizes for generate_all: (full, quick).
SIZES = {
    "captions": ({"num_images": 64, "num_videos": 32}, {"num_images": 4, "num_videos": 2}),
    "video_qa": ({"num": 64}, {"num": 4, "num_frames": 8}),
    "passkey": ({"num": 32, "length": 4000}, {"num": 4, "length": 300}),
    "needle_qa": ({"num": 32, "num_frames": 256}, {"num": 3, "num_frames": 48, "min_sample_frames": 8}),
    "vniah": ({"haystack_seconds": 600}, {"haystack_seconds": 20, "num_needles": 4}),
}
STAGES = {
    "align": "captions.jsonl",
    "pretrain": "captions.jsonl",
    "short_sft": "video_qa.jsonl",
    "context_extension": "passkey.jsonl",
    "long_sft": "needle_qa.jsonl",
    "vniah": "vniah/needles.json",
}


def generate_all(
    out_dir: str | os.PathLike, seed: int = 0, quick: bool = False, sizes: dict[str, dict] | None = None
) -> dict[str, Path]:
    """Every set into `out_dir`, plus index.json mapping training stages to manifests.

    `sizes` overrides the keyword arguments of a set, e.g. {"needle_qa": {"num_frames": 512}}.
    Returns {set name: manifest path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {
        "captions": make_captions,
        "video_qa": make_video_qa,
        "passkey": make_passkey,
        "needle_qa": make_needle_qa,
        "vniah": make_vniah,
    }
    paths = {}
    for name, maker in makers.items():
        kwargs = dict(SIZES[name][1 if quick else 0])
        kwargs.update((sizes or {}).get(name, {}))
        paths[name] = maker(out, seed=seed, **kwargs)
    index = {
        "seed": seed,
        "quick": quick,
        "media_root": ".",
        "stages": STAGES,
        "sets": {k: str(p.relative_to(out)) for k, p in paths.items()},
    }
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return paths
