"""`longvila info [CHECKPOINT]`: versions, devices, and a checkpoint's shapes."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="a longvila or official LongVILA checkpoint directory")


def run(args: argparse.Namespace) -> int:
    import platform

    import torch
    import transformers

    from longvila.version import __version__

    print(f"longvila {__version__}  python {platform.python_version()}")
    print(f"torch {torch.__version__}  transformers {transformers.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print("no CUDA device; running on CPU")
    if args.checkpoint:
        from longvila.model.vlm import LongVILA

        model = LongVILA.from_pretrained(args.checkpoint)
        c = model.config
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.checkpoint}: {params / 1e6:.2f}M parameters")
        print(
            f"  llm: {c.llm.get('model_type')} hidden {c.llm_hidden_size}, {c.llm.get('num_hidden_layers')} layers"
        )
        print(
            f"  vision: {c.image_size}px, patch {c.vision['patch_size']}, {c.tokens_per_frame} tokens per frame"
        )
    return 0
