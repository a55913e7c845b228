"""`longvila eval videoqa|niah`: multiple-choice video QA (Video-MME format) and needle in a haystack."""

from __future__ import annotations

import argparse

from longvila.commands._model import (
    add_model_arguments,
    add_parallel_arguments,
    load_for_inference,
    report_from_sp_rank0,
    sequence_parallel_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    qa = sub.add_parser("videoqa", help="multiple-choice video QA in Video-MME's format (JSONL or parquet)")
    qa.add_argument("--model", required=True, help="checkpoint directory")
    qa.add_argument("--data", required=True, help="questions: .jsonl or .parquet")
    frames = qa.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None, help="frames sampled uniformly per video")
    frames.add_argument(
        "--fps", type=float, default=None, help="sample at this rate instead (see --max-frames)"
    )
    qa.add_argument("--max-frames", type=int, default=None, help="cap on frames when sampling by --fps")
    qa.add_argument("--media-root", default=None, help="folder of relative video paths (default: the data's)")
    qa.add_argument("--out", default="eval_videoqa", help="output folder (predictions.jsonl, summary.json)")
    qa.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    qa.add_argument("--max-new-tokens", type=int, default=16, help="reply length (Video-MME: 16)")
    qa.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(qa)
    add_parallel_arguments(qa)
    niah = sub.add_parser("niah", help="video needle in a haystack (V-NIAH)")
    niah.add_argument("--model", required=True, help="checkpoint directory")
    niah.add_argument("--out", default="eval_niah", help="output folder (one JSON per cell: reruns resume)")
    niah.add_argument(
        "--haystack", default="synthetic", help="a video file, or `synthetic` (seeded noise frames)"
    )
    niah.add_argument(
        "--needles",
        default="synthetic",
        help="needles.json as `longvila data synth` writes it (or its folder), or `synthetic` (colour frames)",
    )
    niah.add_argument(
        "--frames", default="300:6000:300", help="frame counts: start:stop:step (inclusive) or a,b,c"
    )
    niah.add_argument(
        "--depths", default="0:100:20", help="needle depths in percent: start:stop:step or a,b,c"
    )
    niah.add_argument("--num-needles", type=int, default=10, help="synthetic needles (colours), at most 10")
    niah.add_argument("--seed", type=int, default=0, help="seed of the synthetic haystack")
    niah.add_argument("--max-new-tokens", type=int, default=8)
    niah.add_argument("--progress", action="store_true", help="a line per cell")
    add_parallel_arguments(niah)
    add_model_arguments(niah)


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "videoqa":
        return run_videoqa_command(args)
    return run_niah_command(args)


def run_videoqa_command(args: argparse.Namespace) -> int:
    from longvila.eval.videoqa import format_summary, run_videoqa

    def work():
        sp, device = sequence_parallel_from_args(args, "eval videoqa")
        model, processor = load_for_inference(
            args.model, args.device, args.dtype, torch_device=device, projector_order=args.projector_order
        )
        summary = run_videoqa(
            model,
            processor,
            args.data,
            args.out,
            num_frames=args.frames,
            fps=args.fps,
            max_frames=args.max_frames,
            media_root=args.media_root,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
            sp=sp,
        )
        return sp, summary

    code, summary = report_from_sp_rank0("eval videoqa", (FileNotFoundError, ValueError, RuntimeError), work)
    if summary is None:
        return code
    print(format_summary(summary))
    print(f"predictions and summary in {args.out}")
    return 0


def parse_grid(text: str, what: str) -> list[int]:
    """`start:stop:step` (stop included) or a comma list of integers."""
    try:
        if ":" in text:
            start, stop, step = (int(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            return list(range(start, stop + 1, step))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"{what} {text!r}: expected start:stop:step with step > 0, or a comma list"
        ) from None


def run_niah_command(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from longvila.eval.niah import Needle, load_needles, run_niah
    from longvila.eval.plots import plot_niah_heatmap

    def work():
        frame_counts = parse_grid(args.frames, "--frames")
        depths = [d / 100.0 for d in parse_grid(args.depths, "--depths")]
        sp, device = sequence_parallel_from_args(args, "eval niah")
        model, processor = load_for_inference(
            args.model, args.device, args.dtype, torch_device=device, projector_order=args.projector_order
        )
        haystack: object = args.haystack
        if args.needles == "synthetic":
            from longvila.data.synthetic import COLOUR_NAMES, NEEDLE_QUESTION, needle_frame

            if not 1 <= args.num_needles <= len(COLOUR_NAMES):
                raise ValueError(f"--num-needles {args.num_needles}: between 1 and {len(COLOUR_NAMES)}")
            size = processor.image_size
            needles = [
                Needle(needle_frame(c, size), NEEDLE_QUESTION, c) for c in COLOUR_NAMES[: args.num_needles]
            ]
        else:
            path = Path(args.needles)
            path = path / "needles.json" if path.is_dir() else path
            if not path.exists():
                raise FileNotFoundError(f"needles file not found: {path}")
            default_haystack, needles = load_needles(path)
            if args.haystack == "synthetic" and Path(default_haystack).exists():
                haystack = default_haystack
        if haystack == "synthetic":
            from longvila.data.synthetic import noise_frames

            # The demo's held-out haystack stream, so `eval niah` on the demo's model reproduces its grid.
            haystack = noise_frames(
                np.random.default_rng([args.seed, 99]), max(frame_counts), processor.image_size
            )
        elif not Path(str(haystack)).exists():
            raise FileNotFoundError(f"haystack video not found: {haystack}")
        out = Path(args.out)
        grid = run_niah(model, processor, haystack, needles, frame_counts, depths, out,
                        max_new_tokens=args.max_new_tokens, progress=args.progress, sp=sp)  # fmt: skip
        return sp, grid

    code, grid = report_from_sp_rank0("eval niah", (FileNotFoundError, ValueError), work)
    if grid is None:
        return code
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(grid.to_dict(), indent=2) + "\n")
    png = plot_niah_heatmap(grid, out / "niah.png", title=f"V-NIAH: {args.model}")
    for frames in grid.frame_counts:
        print(f"{frames:>7} frames: {grid.accuracy_at(frames):.3f}  (teacher-forced "
              f"{grid.accuracy_at(frames, teacher_forced=True):.3f})")  # fmt: skip
    print(
        f"mean {grid.mean_accuracy:.3f} over {len(grid.depths)} depths; report {out / 'report.json'}, heat map {png}"
    )
    return 0
