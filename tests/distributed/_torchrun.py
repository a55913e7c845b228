"""Run a command line that may start torchrun, and on a timeout say where every process was stuck.

```python
done = run_command([*TORCHRUN, "-m", "longvila.cli", "train", ...], timeout=900)
assert done.returncode == 0, done.stderr[-3000:]
```
A hung collective otherwise ends as a bare `TimeoutExpired` with no output. Here the command runs with
Python's fault handler on; on the timeout the command and every process under it (the torchrun agent
and its ranks, which torchrun starts in sessions of their own) get SIGABRT, the fault handler writes
each thread's Python stack to stderr, and the AssertionError carries that stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
"""torchrun of this interpreter; add `--nproc-per-node N`."""


def run_command(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 600.0
) -> subprocess.CompletedProcess:
    """`cmd` with stdout/stderr captured as text; raises AssertionError with every process's stacks
    after `timeout` seconds."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _process_tree(proc.pid)
        _signal(tree[1:], signal.SIGABRT)  # the ranks first: each dumps its threads' stacks and dies
        time.sleep(2)
        _signal(tree, signal.SIGABRT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            _signal(tree + _process_tree(proc.pid), signal.SIGKILL)  # reparented ones too
            stdout, stderr = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n--- stacks and stderr ---\n{stderr[-20000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _process_tree(root: int) -> list[int]:
    """`root` and its descendants, parents before children (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    tree, frontier = [], [root]
    while frontier:
        pid = frontier.pop(0)
        tree.append(pid)
        frontier.extend(children.get(pid, []))
    return tree


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
