"""Helpers shared by the server tests: queueing requests behind a paused engine, waiting for it to idle."""

import threading
import time


def start_queued(engine, targets, timeout: float = 120) -> list[threading.Thread]:
    """Start one thread per callable in `targets` while the engine is paused, return once all of their
    requests wait in its queue (so they are taken together when the caller's `engine.hold()` ends)."""
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    deadline = time.time() + timeout
    while engine.waiting < len(threads) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.waiting == len(threads)
    return threads


def wait_idle(engine, timeout: float = 60) -> None:
    """Block until no request is admitted, queued or running."""
    deadline = time.time() + timeout
    while (engine.pending or engine.running or engine.waiting) and time.time() < deadline:
        time.sleep(0.02)
    assert not (engine.pending or engine.running or engine.waiting)
