"""Video needle in a haystack (V-NIAH), as LongVILA and LongVA run it (docs/evaluation.md).

The haystack frames are encoded once (vision tower + projector) and cached; each needle image too. For
N frames at depth d the input is built at the embedding level:

    prompt + haystack[:round(d*N)] + needle + haystack[round(d*N):N] + question

with every frame's tokens followed by the "\\n" embedding, exactly the layout the processor gives a
video of N + 1 frames. A multi-needle probe (K images) puts needle k before haystack frame
round((d + k) / K * N), keeping the needles in order (`needle_positions`). Each cell is scored two ways:
- generation (LongVILA): greedy decoding, exact match after lower-casing and removing spaces;
- teacher forcing (LongVA): correct only if the argmax at every answer position is the answer token.

One JSON per cell (`out_dir/cells/`) holds the per-needle results, so an interrupted sweep resumes.

    grid = run_niah(model, processor, haystack_frames, needles, [32, 64], [0.0, 0.5, 1.0], out_dir)
    grid.accuracy            # [depth][frame count]

Shapes: N frames, P tokens per frame, D LLM width, T tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longvila.config import IMAGE_TOKEN


@dataclass
class Needle:
    """One probe: an image (uint8 (H, W, 3) or a path) or a list of them (a multi-needle probe: K
    frames, placed in list order), the question asked after the video, and the answer."""

    image: Any
    question: str
    answer: str

    @property
    def images(self) -> list[Any]:
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]


@dataclass
class NiahGrid:
    frame_counts: list[int]
    depths: list[float]
    accuracy: list[list[float]]
    """[depth][frame count] exact-match accuracy of the generated answers."""
    accuracy_teacher_forced: list[list[float]]
    """[depth][frame count] accuracy under teacher forcing (argmax at every answer position)."""
    num_needles: int
    seconds: float = 0.0
    cells: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def mean_accuracy_teacher_forced(self) -> float:
        return float(np.mean(self.accuracy_teacher_forced))

    def accuracy_at(self, frames: int, teacher_forced: bool = False) -> float:
        """Mean over depths at one frame count."""
        grid = np.array(self.accuracy_teacher_forced if teacher_forced else self.accuracy)
        return float(grid[:, self.frame_counts.index(frames)].mean())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cells")
        data["mean_accuracy"] = self.mean_accuracy
        data["mean_accuracy_teacher_forced"] = self.mean_accuracy_teacher_forced
        return data


def normalise_answer(text: str) -> str:
    """LongVILA's comparison: lower-case, all whitespace removed."""
    return "".join(text.lower().split())


def load_needles(path: str | Path) -> tuple[str, list[Needle]]:
    """Read a `needles.json` as `longvila data synth` writes it: ({haystack video path}, needles)."""
    path = Path(path)
    index = json.loads(path.read_text())
    needles = [Needle(path.parent / n["image"], n["question"], n["answer"]) for n in index["needles"]]
    return str(path.parent / index["haystack"]), needles


def _needle_pixels(processor, needle: Needle) -> torch.Tensor:
    """A needle's K images -> (K, 3, S, S) normalised pixels."""
    images = []
    for image in needle.images:
        if isinstance(image, (str, Path)):
            from longvila.data.image import load_image

            image = load_image(image)
        images.append(np.asarray(image, dtype=np.uint8))
    return processor.preprocess_frames(np.stack(images))


@torch.no_grad()
def encode_frames(model, processor, frames: np.ndarray, micro_batch: int = 64, sp=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, P, D) frame embeddings (vision tower + projector), in chunks.

    Under `sp` (degree > 1) each rank encodes its contiguous share of the frames and the shares are
    all-gathered (MM-SP's first stage), so every rank ends with all N.
    """
    if sp is not None and sp.sp_degree > 1:
        from longvila.parallel.mmsp import frame_split

        start, stop = frame_split(len(frames), sp.sp_degree, sp.sp_rank)
        if stop > start:
            local = encode_frames(model, processor, frames[start:stop], micro_batch)
        else:  # more ranks than frames: an empty share of the right shape and dtype
            local = encode_frames(model, processor, frames[:1], micro_batch)[:0]
        return sp.gather_frames(local, total=len(frames))
    chunks = [
        model.encode_frames(processor.preprocess_frames(frames[i : i + micro_batch]))
        for i in range(0, len(frames), micro_batch)
    ]
    return torch.cat(chunks)


class PromptBuilder:
    """Token ids around the frames for one question: [prefix] frames [suffix]; embeds whole inputs."""

    def __init__(self, model, processor, question: str):
        self.model = model
        size = processor.image_size
        dummy = np.zeros((1, size, size, 3), dtype=np.uint8)
        messages = [
            {
                "role": "user",
                "content": [{"type": "video", "video": dummy}, {"type": "text", "text": question}],
            }
        ]
        ids = processor(messages, num_frames=1, add_generation_prompt=True)["input_ids"]
        image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        where = (ids == image_id).nonzero().squeeze(1)
        first, last = int(where[0]), int(where[-1])
        newline = len(processor.newline_ids)
        self.prefix = ids[:first]
        self.newline = ids[last + 1 : last + 1 + newline]
        self.suffix = ids[last + 1 + newline :]
        embed = model.llm.get_input_embeddings()
        device = model.device
        self.prefix_embeds = embed(self.prefix.to(device))
        self.newline_embeds = embed(self.newline.to(device))
        self.suffix_embeds = embed(self.suffix.to(device))

    def embeds(self, frame_embeds: torch.Tensor, answer_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, P, D) frames -> (1, T, D) inputs: prefix, each frame + "\\n", suffix, answer ids."""
        num, _, width = frame_embeds.shape
        newline = self.newline_embeds.to(frame_embeds.dtype)[None].expand(num, -1, -1)
        frames = torch.cat([frame_embeds, newline], dim=1).reshape(-1, width)
        parts = [self.prefix_embeds.to(frames.dtype), frames, self.suffix_embeds.to(frames.dtype)]
        if answer_ids is not None:
            parts.append(
                self.model.llm.get_input_embeddings()(answer_ids.to(self.model.device)).to(frames.dtype)
            )
        return torch.cat(parts)[None]


@torch.no_grad()
def greedy_generate(
    model, inputs_embeds: torch.Tensor, max_new_tokens: int, end_ids: list[int], sp=None
) -> list[int]:
    """Greedy decoding of one prompt given as embeddings (1, T, D), with the LLM's KV cache (under
    `sp`: prefilled with MM-SP, each rank caching its shard; every rank returns the same tokens)."""
    tokens = model.generate(
        inputs_embeds=inputs_embeds, max_new_tokens=max_new_tokens, eos_token_id=end_ids, sp=sp
    )
    tokens = tokens[0].tolist()
    # Stop at (and keep) the first end id, as LongVILA's decoding does; the rest is padding.
    for i, token in enumerate(tokens):
        if token in end_ids:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def teacher_forced_correct(
    model, builder: PromptBuilder, frame_embeds: torch.Tensor, answer_ids, sp=None
) -> bool:
    """True when the argmax at every answer position equals the answer token (LongVA's score)."""
    from longvila.model.generation import last_position_logits

    answer_ids = torch.as_tensor(answer_ids, dtype=torch.long)
    embeds = builder.embeds(frame_embeds, answer_ids)
    logits = last_position_logits(model, embeds, len(answer_ids) + 1, sp=sp)
    predicted = logits[:-1].argmax(-1).cpu()
    return bool((predicted == answer_ids).all())


def needle_positions(num_frames: int, num_needles: int, depth: float) -> list[int]:
    """Haystack cut points of K needles at `depth`: needle k goes before haystack frame
    round((depth + k) / K * N), so one needle sits at round(depth * N) and K needles keep their
    order, each sweeping its own 1/K of the video as the depth goes 0 -> 1."""
    return [int(round((depth + k) / num_needles * num_frames)) for k in range(num_needles)]


def insert_needle(haystack: torch.Tensor, needle: torch.Tensor, depth: float) -> torch.Tensor:
    """(N, P, D) haystack and (K, P, D) needle frames -> (N + K, P, D), the needles at
    `needle_positions(N, K, depth)` (K = 1: at frame round(depth * N))."""
    cuts = needle_positions(haystack.shape[0], needle.shape[0], depth)
    parts, start = [], 0
    for k, at in enumerate(cuts):
        parts += [haystack[start:at], needle[k : k + 1]]
        start = at
    return torch.cat(parts + [haystack[start:]])


def _cell_path(out_dir: Path, frames: int, depth: float) -> Path:
    return out_dir / "cells" / f"frames{frames:06d}_depth{depth:.3f}.json"


@torch.no_grad()
def run_niah(
    model,
    processor,
    haystack_frames: np.ndarray | str | Path,
    needles: list[Needle] | list[dict[str, Any]],
    frame_counts: list[int],
    depths: list[float],
    out_dir: str | Path | None = None,
    *,
    max_new_tokens: int = 8,
    progress: bool = False,
    sp=None,
) -> NiahGrid:
    """Sweep frame counts x depths (fractions 0..1); accuracy is the mean over needles in each cell.

    `haystack_frames`: uint8 (N, H, W, 3) with N >= max(frame_counts), or a video path (decoded to
    max(frame_counts) frames uniformly). A cell whose JSON exists in `out_dir/cells/` is read, not rerun.

    `sp`: a `SequenceParallel` group (torchrun; data-parallel degree 1): the haystack is encoded in
    shares across the ranks and every prompt is prefilled with MM-SP, so a haystack too long for one
    device's activations fits; every rank computes the same grid and SP rank 0 writes the files.
    """
    if sp is not None and sp.sp_degree > 1 and sp.dp_degree != 1:
        raise ValueError(
            f"V-NIAH under sequence parallelism needs data-parallel degree 1 (ulysses x ring = world size); "
            f"got dp={sp.dp_degree}"
        )
    parallel = sp is not None and sp.sp_degree > 1
    writer = not parallel or sp.sp_rank == 0
    progress = progress and writer
    began = time.perf_counter()
    needles = [n if isinstance(n, Needle) else Needle(**n) for n in needles]
    if not needles:
        raise ValueError("run_niah needs at least one needle")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths are fractions in [0, 1], got {depths}")
    if any(n < 1 for n in frame_counts):
        raise ValueError(f"frame counts must be >= 1, got {frame_counts}")
    longest = max(frame_counts)
    if isinstance(haystack_frames, (str, Path)):
        from longvila.data.video import decode_frames

        haystack_frames, _ = decode_frames(haystack_frames, num_frames=longest)
    if len(haystack_frames) < longest:
        raise ValueError(f"the haystack has {len(haystack_frames)} frames; the sweep needs {longest}")
    out = Path(out_dir) if out_dir is not None else None
    was_training = model.training
    model.eval()
    haystack = encode_frames(model, processor, np.asarray(haystack_frames[:longest]), sp=sp)
    needle_embeds = [model.encode_frames(_needle_pixels(processor, n)) for n in needles]
    builders: dict[str, PromptBuilder] = {}
    end_ids = processor.stop_token_ids
    cells = []
    total = len(frame_counts) * len(depths)
    for i, (depth, frames) in enumerate((d, f) for d in depths for f in frame_counts):
        path = _cell_path(out, frames, depth) if out is not None else None
        done = path is not None and path.is_file()
        if parallel:  # resume a cell only if every rank can read it, or the ranks' collectives part ways
            done = (
                int(sp.all_reduce_sum(torch.tensor(float(done), device=model.device)).item()) == sp.sp_degree
            )
        if done:
            cells.append(json.loads(path.read_text()))
            continue
        results = []
        for needle, needle_embed in zip(needles, needle_embeds):
            builder = builders.setdefault(needle.question, PromptBuilder(model, processor, needle.question))
            frame_embeds = insert_needle(haystack[:frames], needle_embed, depth)
            tokens = greedy_generate(model, builder.embeds(frame_embeds), max_new_tokens, end_ids, sp=sp)
            text = processor.decode(tokens)
            answer_ids = processor.tokenizer.encode(needle.answer, add_special_tokens=False)
            results.append(
                {
                    "answer": needle.answer,
                    "generated": text,
                    "correct": normalise_answer(text) == normalise_answer(needle.answer),
                    "correct_teacher_forced": teacher_forced_correct(
                        model, builder, frame_embeds, answer_ids, sp=sp
                    ),
                }
            )
        cell = {
            "frames": frames,
            "depth": depth,
            "accuracy": float(np.mean([r["correct"] for r in results])),
            "accuracy_teacher_forced": float(np.mean([r["correct_teacher_forced"] for r in results])),
            "needles": results,
        }
        if path is not None and writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cell, indent=1) + "\n")
            tmp.replace(path)
        cells.append(cell)
        if progress:
            print(
                f"  V-NIAH {i + 1}/{total}: {frames} frames, depth {depth:.0%}: {cell['accuracy']:.2f}",
                flush=True,
            )
    model.train(was_training)
    by_key = {(c["depth"], c["frames"]): c for c in cells}
    grid = NiahGrid(
        frame_counts=list(frame_counts),
        depths=list(depths),
        accuracy=[[by_key[(d, f)]["accuracy"] for f in frame_counts] for d in depths],
        accuracy_teacher_forced=[
            [by_key[(d, f)]["accuracy_teacher_forced"] for f in frame_counts] for d in depths
        ],
        num_needles=len(needles),
        seconds=time.perf_counter() - began,
        cells=cells,
    )
    if out is not None and writer:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "grid.json.tmp"
        tmp.write_text(json.dumps(grid.to_dict(), indent=1) + "\n")
        tmp.replace(out / "grid.json")
    return grid
