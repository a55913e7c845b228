"""The one rule for picking a torch device from a user's word (`--device`, `run.device`).

`auto` is the GPU when torch sees one, else the CPU; `cpu`, `cuda` and `cuda:N` are checked against what
is there, so a missing GPU is a clear error rather than a CUDA crash later.
"""

from __future__ import annotations

import torch

DEVICE_WORDS = "cpu, cuda, cuda:N or auto"


def resolve_device(
    name: str = "auto", *, local_rank: int | None = None, what: str = "--device"
) -> torch.device:
    """torch.device for `name`; `local_rank` (a torchrun rank's GPU) gives a bare `cuda`/`auto` GPU its
    index. `what` names the setting in errors. Raises ValueError for an unknown name or a GPU not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} {name!r}: expected {DEVICE_WORDS}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"{what} {name!r}: expected {DEVICE_WORDS}")
    if not torch.cuda.is_available():
        raise ValueError(f"{what} {name}: no CUDA device is available")
    if device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{what} {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device
