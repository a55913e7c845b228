"""`longvila data`: build data sets.

longvila data synth --out DIR [--seed 0] [--quick]     every stage's synthetic set + V-NIAH
longvila data long-sft --videos DIR|LIST --captioner M --writer LLM --out DIR [...]
                                                        stage 5: captioned clips -> summary + QA manifest
longvila data pack-text --input FILES|DIR --tokenizer T --length 262144 --out DIR [--workers N]
                                                        stage 4: text packed to the target length
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="write the synthetic sets of every stage and the V-NIAH set")
    synth.add_argument("--out", required=True, help="output folder (manifests, media, index.json)")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    synth.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests and demos")
    _add_long_sft(sub)
    _add_pack_text(sub)


def _add_long_sft(sub) -> None:
    p = sub.add_parser(
        "long-sft",
        help="long-video SFT data: caption clips, then an LLM writes a summary and QA (stage 5)",
        description="Caption each video's clips with a longvila model, have a text LLM write a summary "
        "and questions from the timed captions, validate its JSON, and write a manifest. Resumable "
        "(out/cache/), shardable (--shard i/n, and RANK/WORLD_SIZE under torchrun).",
    )
    p.add_argument(
        "--videos", required=True, help="a folder of videos, a .txt list (one path a line), or a video"
    )
    p.add_argument("--captioner", required=True, help="longvila checkpoint folder that captions the clips")
    p.add_argument(
        "--writer", required=True, help="Hugging Face causal LM folder (or hub name) that writes QA"
    )
    p.add_argument("--out", required=True, help="output folder: manifest.jsonl, errors.jsonl, cache/")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="clip length in seconds (default 10)")
    p.add_argument("--scene-cuts", action="store_true", help="also cut clips at detected scene changes")
    p.add_argument("--frames-per-clip", type=int, default=8, help="frames sampled per clip (default 8)")
    p.add_argument("--clips-per-batch", type=int, default=8, help="clips per captioner generate call")
    p.add_argument("--caption-tokens", type=int, default=96, help="max new tokens per caption")
    p.add_argument("--writer-tokens", type=int, default=1024, help="max new tokens per writer reply")
    p.add_argument("--questions", type=int, default=6, help="QA pairs asked for per video (default 6)")
    p.add_argument("--min-questions", type=int, default=3, help="fewer valid pairs is a failed attempt")
    p.add_argument("--retries", type=int, default=2, help="writer retries after invalid JSON (default 2)")
    p.add_argument(
        "--shard", default=None, help="i/n: take videos i, i+n, ... (split again by RANK/WORLD_SIZE)"
    )
    p.add_argument(
        "--prompts", default=None, help="folder of prompt templates (*.txt) replacing the defaults"
    )
    p.add_argument("--media-root", default=None, help="write video paths relative to this folder")
    p.add_argument("--merge", action="store_true", help="only merge the shard manifests of --shard's n")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_pack_text(sub) -> None:
    p = sub.add_parser(
        "pack-text",
        help="pack a text corpus into sequences of the target length (stage 4)",
        description="Tokenise .jsonl ('text' field), .parquet ('text' column) and .txt files in parallel, "
        "add an end-of-document token, and pack into sequences of exactly --length tokens with "
        "document boundaries (cu_seqlens). Streaming: one shard buffer in memory.",
    )
    p.add_argument("--input", required=True, nargs="+", help="files or folders (.jsonl, .parquet, .txt)")
    p.add_argument("--tokenizer", required=True, help="'tiny', a longvila checkpoint or a HF tokenizer")
    p.add_argument("--length", type=int, default=262144, help="tokens per sequence (default 262144)")
    p.add_argument("--out", required=True, help="output folder: shards + index.json")
    p.add_argument("--workers", type=int, default=1, help="tokeniser processes (default 1: in-process)")
    p.add_argument("--sequences-per-shard", type=int, default=64, help="sequences per shard file")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column (default 'text')")
    p.add_argument(
        "--pad-last", action="store_true", help="pad the final partial sequence (default: drop it)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from longvila.data.synthetic import generate_all

        start = time.perf_counter()
        paths = generate_all(args.out, seed=args.seed, quick=args.quick)
        for name, path in paths.items():
            print(f"{name:10s} {path}")
        print(f"wrote {len(paths)} sets to {args.out} in {time.perf_counter() - start:.1f} s (index.json)")
        return 0
    if args.data_command == "long-sft":
        return _run_long_sft(args)
    if args.data_command == "pack-text":
        return _run_pack_text(args)
    print(f"longvila data {args.data_command}: unknown action", file=sys.stderr)
    return 2


def _run_long_sft(args: argparse.Namespace) -> int:
    from longvila.build import long_sft as models
    from longvila.data import long_sft

    if args.merge:
        _, count = long_sft.resolve_shard(args.shard, environ={})
        print(f"merged into {long_sft.merge_shards(args.out, count)}")
        return 0
    config = long_sft.LongSFTConfig(
        clip_seconds=args.clip_seconds,
        scene_cuts=args.scene_cuts,
        frames_per_clip=args.frames_per_clip,
        clips_per_batch=args.clips_per_batch,
        caption_max_new_tokens=args.caption_tokens,
        writer_max_new_tokens=args.writer_tokens,
        num_questions=args.questions,
        min_questions=args.min_questions,
        max_retries=args.retries,
        prompts_dir=args.prompts,
        media_root=args.media_root,
        progress=not args.no_progress,
    )
    captioner = models.LongVILACaptioner(args.captioner, args.frames_per_clip, args.caption_tokens)
    writer = models.HFWriter(args.writer, args.writer_tokens)
    report = long_sft.build_long_sft(args.videos, captioner, writer, args.out, config, shard=args.shard)
    index, count = report.shard
    print(
        f"shard {index}/{count}: {report.done} of {report.videos} videos done ({report.reused} from cache), "
        f"{report.failed} failed -> {report.manifest}, errors in {report.errors} ({report.seconds:.1f} s)"
    )
    if report.merged:
        print(f"all shards done: merged into {report.merged}")
    # Failed videos are listed, not fatal; a run where nothing worked is.
    return 1 if report.videos and not report.done else 0


def _run_pack_text(args: argparse.Namespace) -> int:
    from longvila.data.pack_text import pack_text

    stats = pack_text(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        length=args.length,
        workers=args.workers,
        sequences_per_shard=args.sequences_per_shard,
        pad_last=args.pad_last,
        text_field=args.text_field,
        progress=not args.no_progress,
    )
    print(json.dumps({k: v for k, v in vars(stats).items() if k != "max_buffer_tokens"}, indent=1))
    print(
        f"{stats.documents} documents, {stats.corpus_tokens} tokens -> {stats.sequences} sequences of "
        f"{args.length} in {args.out} (dropped {stats.dropped_tokens}, padded {stats.padded_tokens}; "
        f"{stats.seconds:.1f} s)"
    )
    return 0
