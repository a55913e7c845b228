"""`longvila convert SRC DST --to {longvila,official,hf}`: rewrite a checkpoint in another layout.

SRC is any layout `LongVILA.from_pretrained` reads (ours, the official split layout of the 2024-08 or
NVILA-era releases, the remote-code `vila` release, NVILA `-hf`). DST is written under a temporary name
beside it and renamed into place only when complete. Weights are copied as they are (no dtype change
unless `--dtype` asks for one), so ours -> official -> ours and ours -> hf -> ours give the same tensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
TARGETS = ("longvila", "official", "hf")
DTYPES = ("keep", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint directory to read (any layout longvila loads)")
    parser.add_argument("dst", help="directory to write; replaced only once fully written")
    parser.add_argument("--to", required=True, choices=TARGETS, help="layout to write")
    parser.add_argument(
        "--projector-order",
        choices=("column", "row"),
        default=None,
        help="2x2 token order of an mlp_downsample SRC when its configs do not say (docs/checkpoints.md)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="keep", help="cast the weights (default: keep)")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest weight file before sharding, e.g. 5GB or 500MB"
    )
    parser.add_argument("--force", action="store_true", help="replace DST when it already exists")


def stored_float_dtype(path: Path):
    """The floating dtype most weights under `path` are stored in (None when there are none), so that
    `--dtype keep` writes what it read: models are built in float32 before the weights are copied in."""
    import torch
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for file in path.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                name = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if name is not None:
                    counts[name] = counts.get(name, 0) + 1
    return getattr(torch, max(counts, key=counts.get)) if counts else None


def _error(message: str) -> int:
    print(f"longvila convert: error: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        return _error(f"{src}: no such checkpoint directory")
    if dst.resolve() == src.resolve():
        return _error("SRC and DST are the same directory")
    if dst.exists() and not args.force:
        return _error(f"{dst} exists (pass --force to replace it)")
    import torch

    from longvila.model.checkpoint import CheckpointError
    from longvila.model.export import save_hf, save_official
    from longvila.model.vlm import LongVILA
    from longvila.processor import LongVILAProcessor

    dtype = stored_float_dtype(src) if args.dtype == "keep" else getattr(torch, args.dtype)
    try:
        model = LongVILA.from_pretrained(src, dtype=dtype, projector_order=args.projector_order)
        processor = LongVILAProcessor.from_pretrained(src)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        return _error(str(exc))
    config = model.config
    if args.to != "longvila" and config.projector_token_order == "column":
        print(
            f"longvila convert: note: {src} merges 2x2 tokens column-major (LongVILA 2024-08); the {args.to} "
            "layout records that in projector_token_order, which longvila reads but other readers "
            "(VILA since 2024-12, SGLang) ignore: they would order the tokens row-major.",
            file=sys.stderr,
        )
    writer = {"longvila": LongVILA.save_pretrained, "official": save_official, "hf": save_hf}[args.to]
    writer(model, dst, processor=processor, max_shard_size=args.max_shard_size)
    print(
        f"{src} -> {dst} ({args.to}): {config.projector_type}, {config.projector_token_order}-major tokens, "
        f"{config.tokens_per_frame} tokens per frame"
    )
    return 0
