"""`longvila ask MEDIA "question" --model M`: stream a model's answer about a video or an image.

With `--chat`, follow-up questions are read from standard input, one a line, until end of input or an
empty line; the media stay in the conversation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longvila.commands._model import (
    add_model_arguments,
    add_parallel_arguments,
    load_for_inference,
    sequence_parallel_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("media", help="a video, or an image (by extension, or with --image)")
    parser.add_argument("question", nargs="?", help="the question (with --chat, read from stdin if left out)")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--image", action="store_true", help="treat MEDIA as an image whatever its extension")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None, help="frames sampled uniformly from the video")
    frames.add_argument(
        "--fps", type=float, default=None, help="sample at this rate instead (see --max-frames)"
    )
    parser.add_argument("--max-frames", type=int, default=None, help="cap on frames when sampling by --fps")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--chat", action="store_true", help="keep asking: follow-up questions from stdin")
    add_model_arguments(parser)
    add_parallel_arguments(parser)


def _error(message: str) -> int:
    print(f"longvila ask: error: {message}", file=sys.stderr)
    return 1


def _read_question() -> str | None:
    if sys.stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.strip() or None


def run(args: argparse.Namespace) -> int:
    media = Path(args.media)
    if not media.exists():
        return _error(f"file not found: {media}")
    if media.is_dir():
        return _error(f"{media} is a directory, not a video or image file")
    if not Path(args.model).is_dir():
        return _error(f"model directory not found: {args.model}")
    question = args.question or (_read_question() if args.chat else None)
    if not question:
        return _error("no question given")
    for name in ("frames", "max_frames", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _error(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    if args.chat and args.ulysses * args.ring > 1:
        return _error("--chat reads standard input and cannot run under torchrun; ask one question")
    from longvila.parallel.launch import teardown_distributed

    try:
        sp, device = sequence_parallel_from_args(args, "ask")
    except ValueError as exc:
        return _error(str(exc))
    try:
        return _answer(args, media, question, sp, device)
    finally:
        teardown_distributed()


def _answer(args: argparse.Namespace, media: Path, question: str, sp, device) -> int:
    from longvila.chat import ChatSession, is_image_path

    try:
        model, processor = load_for_inference(
            args.model, args.device, args.dtype, torch_device=device, projector_order=args.projector_order
        )
    except (OSError, ValueError) as exc:
        return _error(f"cannot load the model from {args.model}: {exc}")
    session = ChatSession(
        model,
        processor,
        num_frames=args.frames,
        fps=args.fps,
        max_frames=args.max_frames,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        sp=sp,
    )
    speaker = sp is None or sp.sp_rank == 0
    as_image = args.image or is_image_path(media)
    media_kwargs = {"image": str(media)} if as_image else {"video": str(media)}
    write = lambda piece: print(piece, end="", flush=True)
    try:
        while question:
            session.ask(question, stream=write if speaker else None, **media_kwargs)
            if speaker:
                print(flush=True)
            media_kwargs = {}
            question = _read_question() if args.chat else None
    except (FileNotFoundError, ValueError) as exc:
        # decode errors name the file; the context check says how long the prompt was.
        return _error(str(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0
