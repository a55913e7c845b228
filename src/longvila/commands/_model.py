"""Where and in which precision the inference commands (ask, serve, eval) run a checkpoint."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` with the same meaning in every inference command."""
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto (the first GPU when there is one)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights and activations; auto: bfloat16 on a GPU, the checkpoint's own dtype on CPU",
    )


def resolve_device(name: str):
    """torch.device for `--device`; a clear ValueError for a GPU that is not there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    return device


def resolve_dtype(name: str, device):
    """torch dtype for `--dtype`, or None to keep the checkpoint's."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return getattr(torch, name)


def load_for_inference(model_dir: str, device: str = "auto", dtype: str = "auto", *, torch_device=None):
    """(model in eval mode on the device, processor) from a checkpoint directory.

    `torch_device` overrides `device` (torchrun picks each rank's GPU)."""
    from pathlib import Path

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    from longvila import LongVILA, LongVILAProcessor

    target = torch_device if torch_device is not None else resolve_device(device)
    model = LongVILA.from_pretrained(model_dir, dtype=resolve_dtype(dtype, target))
    return model.to(target).eval(), LongVILAProcessor.from_pretrained(model_dir)
