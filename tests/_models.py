"""Tiny models shared by the tests (unit and distributed: tests/conftest.py puts this folder on the path)."""

from pathlib import Path

import torch

from longvila import LongVILA, LongVILAConfig


def lively_tiny_model(seed: int = 0, std: float = 0.3) -> LongVILA:
    """The tiny model with weights wide enough that its greedy replies vary with the input
    (at the default init every reply is a run of newlines, which would make comparisons vacuous)."""
    torch.manual_seed(seed)
    model = LongVILA(LongVILAConfig.tiny()).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim >= 2:
                weight.normal_(0, std)
    return model


def lively_checkpoint(path, seed: int = 0) -> Path:
    """`lively_tiny_model(seed)` saved with the tiny processor as a checkpoint directory at `path`."""
    from longvila import LongVILAProcessor

    path = Path(path)
    lively_tiny_model(seed).save_pretrained(path, processor=LongVILAProcessor.tiny())
    return path
