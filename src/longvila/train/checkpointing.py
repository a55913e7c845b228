"""Resumable training state with torch.distributed.checkpoint (DCP).

Layout under `run_dir/checkpoints/`:

    step_000040/            model + optimizer (DCP shards, every rank writes its own),
                            extra_rank{r}.pt (scheduler, data position, RNG states of rank r),
                            COMPLETE (written last: the directory is whole)
    .tmp_step_000060/       a save in progress (never loaded)
    latest                  the name of the newest complete checkpoint, replaced atomically

A save writes into `.tmp_step_N`, marks it COMPLETE, renames it to `step_N` and only then points
`latest` at it, so a run killed at any moment leaves either the previous checkpoint or the new one, and
never a half-written directory that looks complete. DCP also works in a single process without a process
group (it detects that no group is initialised).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from longvila.files import write_text_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"
TMP_PREFIX = ".tmp_"


@dataclass
class DataPosition:
    """Where the data stream stands: the next micro-batch is batch `batch_in_epoch` of `epoch`."""

    epoch: int = 0
    batch_in_epoch: int = 0
    sampler_seed: int = 0


@dataclass
class TrainProgress:
    step: int = 0
    """Optimiser steps done."""
    data: DataPosition | None = None
    tokens_seen: int = 0


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(path: Path) -> bool:
    """A checkpoint directory that a save finished (never a temporary one)."""
    return path.is_dir() and not path.name.startswith(TMP_PREFIX) and (path / COMPLETE).is_file()


def find_latest(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, or else the highest complete step_*."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    complete = sorted(p for p in root.glob("step_*") if is_complete(p))
    return complete[-1] if complete else None


def save_checkpoint(
    checkpoints_dir: str | Path,
    progress: TrainProgress,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep_last: int = 2,
) -> Path:
    """Write the full training state for `progress.step`; returns the final directory."""
    root = Path(checkpoints_dir)
    name = step_dir_name(progress.step)
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-save
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    extra = {
        "progress": {**asdict(progress), "data": asdict(progress.data) if progress.data else None},
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
    }
    torch.save(extra, tmp / f"extra_rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(f"{progress.step}\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, name + "\n", fsync=True)
        _prune(root, keep_last)
    _barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> TrainProgress:
    """Restore model, optimizer, scheduler and this rank's RNG states; returns the progress."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(
            f"{path}: not a complete checkpoint (no {COMPLETE} marker, or a temporary directory)"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    # The model must be complete. The optimizer may lack the state of parameters that never had a
    # gradient (e.g. the vision tower's last layer when features come from the second-to-last):
    # AdamW creates state lazily, so those keep the zero state get_state_dict initialised, and
    # since they still get no gradient, AdamW skips them exactly as the uninterrupted run does.
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [key for key in model_state if f"model.{key}" not in stored]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks model weights {missing[:5]} (another model?)")
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=True),
    )
    rank = _rank()
    extra_path = path / f"extra_rank{rank}.pt"
    if not extra_path.is_file():
        extra_path = path / "extra_rank0.pt"  # resumed on a different world size: rank 0's position
    extra = torch.load(extra_path, weights_only=False)
    if scheduler is not None and extra["scheduler"] is not None:
        scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    raw = extra["progress"]
    data = DataPosition(**raw["data"]) if raw.get("data") else None
    return TrainProgress(step=raw["step"], data=data, tokens_seen=raw.get("tokens_seen", 0))


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it saves "in a single process" whenever no process group exists: expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*assuming the intent is to (save|load) in a single process"
        )
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if is_complete(p))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
