"""One process or many: read torchrun's environment, pick the device, start the process group.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process and no process
group is created (torch.distributed.checkpoint works without one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longvila.devices import resolve_device


@dataclass
class DistInfo:
    global_rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def setup_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK and initialise the default group when WORLD_SIZE > 1
    (nccl on GPU, gloo on CPU unless `backend` says otherwise)."""
    global_rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    torch_device = resolve_device(device, local_rank=local_rank, what="run.device")
    use_cuda = torch_device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(chosen, rank=global_rank, world_size=world_size)
    return DistInfo(global_rank, world_size, local_rank, torch_device)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
