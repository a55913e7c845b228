"""Run a function on a gloo process group of `world_size` CPU processes and collect the results.

```python
results = run_distributed(fn, 4, arg)   # fn(rank, world_size, arg) -> picklable; list indexed by rank
```
`fn` must live in an importable module (not the test file's `__main__`). One spawn costs a few
seconds (importing torch), so run many cases inside one call.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several processes share a few cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Spawn `world_size` ranks running `fn(rank, world_size, *args)`; return their results by rank.

    Raises RuntimeError with every failing rank's traceback, or on timeout (hung collectives).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    collected, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size and not errors:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in collected]
                if dead:  # died without reporting (e.g. failed to start); give a late result a moment
                    time.sleep(1.0)
                    if results.empty():
                        errors.append(
                            f"ranks {dead} exited without a result (exit codes "
                            f"{[procs[r].exitcode for r in dead]})"
                        )
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s; finished ranks: {sorted(collected)}")
                continue
            if ok:
                collected[rank] = value
            else:  # the other ranks may now hang in a collective
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    return [collected[r] for r in range(world_size)]
