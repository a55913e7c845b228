"""The launcher the torchrun tests use: a hung command tree fails with every process's Python stack."""

import sys

import pytest
from _torchrun import run_command

PARENT = """
import subprocess, sys, time
# like torchrun: the worker in a session of its own
subprocess.Popen([sys.executable, "-c", "import time\\ndef worker_stuck_here():\\n    time.sleep(120)\\nworker_stuck_here()"],
                 start_new_session=True)
def agent_waits_here():
    time.sleep(120)
agent_waits_here()
"""


def test_a_hung_process_tree_fails_with_each_process_stack():
    with pytest.raises(AssertionError) as failed:
        run_command([sys.executable, "-c", PARENT], timeout=4)
    head, stacks = str(failed.value).split("--- stacks and stderr ---")
    assert "timed out after 4 s" in head
    assert "line 3 in worker_stuck_here" in stacks and "line 7 in agent_waits_here" in stacks


def test_a_finished_command_returns_its_output():
    done = run_command([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
