"""The server's counters in Prometheus' text exposition format (`GET /metrics`).

Written by hand (a few counters, gauges and one histogram) rather than through prometheus_client, so
serving needs no metrics dependency; the format is Prometheus' text format 0.0.4.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Counters updated by the engine thread and the HTTP handlers (under one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.decode_seconds = 0.0
        self.last_tokens_per_second = 0.0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.vision_tower_calls = 0
        self.prefix_tokens_reused = 0
        self.batch_sizes: list[int] = []
        self.cancelled = 0

    def count_request(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def render(self, *, waiting: int, running: int, pending: int, caches: dict[str, object]) -> str:
        """The exposition text; `caches` maps a cache's name to an `LRUBytes`."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP longvila_{name} {help_text}")
            lines.append(f"# TYPE longvila_{name} {kind}")
            lines.extend(f"longvila_{name}{labels} {value}" for labels, value in samples)

        with self.lock:
            metric("num_requests_waiting", "gauge", "Requests queued for the model.", [("", waiting)])
            metric("num_requests_running", "gauge", "Requests in the batch being generated.", [("", running)])
            metric(
                "num_requests_pending",
                "gauge",
                "Admitted requests (reading, decoding, queued, running).",
                [("", pending)],
            )
            metric(
                "requests_total",
                "counter",
                "Finished chat completions by outcome.",
                [(f'{{outcome="{k}"}}', v) for k, v in sorted(self.requests.items())],
            )
            metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            rate = self.generation_tokens / self.decode_seconds if self.decode_seconds else 0.0
            metric(
                "generation_tokens_per_second",
                "gauge",
                "Tokens per second over all decoding so far.",
                [("", rate)],
            )
            metric(
                "vision_tower_calls_total",
                "counter",
                "Media items run through the vision tower.",
                [("", self.vision_tower_calls)],
            )
            metric(
                "prefix_tokens_reused_total",
                "counter",
                "Prompt tokens whose K/V came from the prefix cache.",
                [("", self.prefix_tokens_reused)],
            )
            metric(
                "requests_cancelled_total",
                "counter",
                "Generations stopped because the client left.",
                [("", self.cancelled)],
            )
            buckets = [(f'{{le="{b}"}}', c) for b, c in zip(self.ttft.buckets, self.ttft.counts)]
            buckets.append(('{le="+Inf"}', self.ttft.count))
            lines.append("# HELP longvila_time_to_first_token_seconds Arrival to first generated token.")
            lines.append("# TYPE longvila_time_to_first_token_seconds histogram")
            lines.extend(f"longvila_time_to_first_token_seconds_bucket{labels} {v}" for labels, v in buckets)
            lines.append(f"longvila_time_to_first_token_seconds_sum {self.ttft.total}")
            lines.append(f"longvila_time_to_first_token_seconds_count {self.ttft.count}")
        for name, cache in caches.items():
            metric(f"{name}_cache_hits_total", "counter", f"{name} cache hits.", [("", cache.hits)])
            metric(f"{name}_cache_misses_total", "counter", f"{name} cache misses.", [("", cache.misses)])
            metric(f"{name}_cache_bytes", "gauge", f"Bytes held by the {name} cache.", [("", cache.bytes)])
        return "\n".join(lines) + "\n"
