"""`longvila serve` measured through its HTTP API with the official `openai` client, baselines in the
same run:

1. Long-video reuse: the same 256-frame video asked about twice; time to first token (a request for
   one token, so its latency is the time to the first token) of the first request, of the second, and
   the same on a server with both caches turned off. Each server first answers a warm-up request on
   another video. Vision-tower calls are counted.
2. Dynamic batching: 16 requests of 32 tokens each sent at once against the same 16 sent one after
   another (serial serving), on one server with the caches off so both do the same work.

    python benchmarks/serve.py                   # the recorded run (tiny model, CPU)
    python benchmarks/serve.py --frames 16 --requests 4 --tokens 4    # smoke run

Prints JSON (and writes it to --out); the numbers go into benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import dump, machine  # noqa: E402

from longvila import LongVILA, LongVILAConfig, LongVILAProcessor  # noqa: E402
from longvila.data.synthetic import write_mp4 as write_video  # noqa: E402
from longvila.serve.engine import describe  # noqa: E402
from longvila.serve.server import create_server  # noqa: E402


def video_turn(path: Path, frames: int, text: str) -> list[dict]:
    part = {"type": "video_url", "video_url": {"url": str(path), "num_frames": frames}}
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def serve(model, processor, root: Path, **limits):
    """A loopback server reading media under `root`, and an `openai` client for it."""
    import openai

    server = create_server(
        model, processor, port=0, model_name="bench", allowed_local_media_path=root, **limits
    )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600, max_retries=0)
    return server, client


def first_token_seconds(client, messages) -> float:
    start = time.perf_counter()
    client.chat.completions.create(model="bench", messages=messages, max_tokens=1, temperature=0)
    return time.perf_counter() - start


def reuse(model, processor, video: Path, warm_up: Path, frames: int, root: Path) -> dict:
    out = {}
    for label, budget in (("cached", 4 << 30), ("caches_off", 0)):
        server, client = serve(
            model,
            processor,
            root,
            max_num_frames=frames,
            embedding_cache_bytes=budget,
            prefix_cache_bytes=budget,
        )
        with server:
            first_token_seconds(client, video_turn(warm_up, 4, "Warm up."))  # first-call costs
            messages = video_turn(video, frames, "What happens in this video?")
            first = first_token_seconds(client, messages)
            calls = describe(server.engine)["vision_tower_calls"]
            second = first_token_seconds(client, messages)
            stats = describe(server.engine)
            out[label] = {
                "first_s": first,
                "second_s": second,
                "ratio": first / second,
                "vision_tower_calls_second": stats["vision_tower_calls"] - calls,
                "prefix_tokens_reused": stats["prefix_tokens_reused"],
            }
    out["second_cached_vs_caches_off"] = out["caches_off"]["second_s"] / out["cached"]["second_s"]
    return out


def throughput(model, processor, videos: list[Path], root: Path, requests: int, tokens: int) -> dict:
    server, client = serve(
        model, processor, root, embedding_cache_bytes=0, prefix_cache_bytes=0, max_batch_size=requests
    )
    with server:

        def ask(i: int, tag: str) -> None:
            messages = video_turn(videos[i % len(videos)], 8, f"{tag} question {i}: what is shown?")
            reply = client.chat.completions.create(
                model="bench",
                messages=messages,
                max_tokens=tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert reply.usage.completion_tokens == tokens

        ask(0, "warm-up")
        start = time.perf_counter()
        for i in range(requests):
            ask(i, "serial")
        serial = time.perf_counter() - start
        threads = [threading.Thread(target=ask, args=(i, "batched")) for i in range(requests)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        batched = time.perf_counter() - start
        sizes = describe(server.engine)["batch_sizes"]
    total = requests * tokens
    return {
        "requests": requests,
        "tokens_each": tokens,
        "serial_s": serial,
        "batched_s": batched,
        "serial_tokens_per_s": total / serial,
        "batched_tokens_per_s": total / batched,
        "speedup": serial / batched,
        "batch_sizes_concurrent_phase": sizes[1 + requests :],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=256, help="frames of the reused video")
    parser.add_argument("--resolution", type=int, default=256, help="the reused video's width and height")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request in the batching test")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LongVILA(LongVILAConfig.tiny()).eval()
    processor = LongVILAProcessor.tiny()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = args.resolution
        long_video = write_video(
            root / "long.mp4", rng.integers(0, 255, (args.frames, size, size, 3), np.uint8)
        )
        short = [
            write_video(root / f"short{i}.mp4", rng.integers(0, 255, (8, 64, 64, 3), np.uint8))
            for i in range(4)
        ]
        results = {
            "machine": machine(),
            "model": "LongVILAConfig.tiny() (random weights)",
            "video": {
                "frames": args.frames,
                "resolution": f"{size}x{size}",
                "bytes": long_video.stat().st_size,
            },
            "reuse": reuse(model, processor, long_video, short[0], args.frames, root),
            "batching": throughput(model, processor, short, root, args.requests, args.tokens),
        }
    dump(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
