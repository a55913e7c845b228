"""`longvila serve --model M`: an OpenAI-compatible chat-completions server for one model.

Security and limits take vLLM's flag names where vLLM has one (`--api-key`,
`--allowed-local-media-path`, `--max-num-seqs`) and uvicorn's for its own (`--timeout-keep-alive`,
`--limit-concurrency`). `--export-llm DIR` writes the LLM as a plain HF checkpoint for vLLM or SGLang
and exits (docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from longvila.commands._model import add_model_arguments, load_for_inference

GiB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument(
        "--served-model-name", default=None, help="model id in responses (default: the folder name)"
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="frames per video when a request does not say"
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="new tokens when a request does not say")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="when a request does not say (0: greedy)"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    security = parser.add_argument_group("security and limits")
    security.add_argument(
        "--api-key",
        default=os.environ.get("LONGVILA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LONGVILA_API_KEY; none: open)",
    )
    security.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="local paths and file:// URLs are read only inside this directory; unset: data URLs only",
    )
    security.add_argument("--max-num-frames", type=int, default=256, help="cap on frames per video")
    security.add_argument("--max-fps", type=float, default=4.0, help="cap on a request's fps")
    security.add_argument("--max-tokens-limit", type=int, default=4096, help="cap on a request's max_tokens")
    security.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit (413 above)")
    security.add_argument(
        "--max-pending", type=int, default=64, help="requests in flight at most (429 above)"
    )
    security.add_argument(
        "--timeout-header", type=float, default=10.0, help="seconds to send request headers"
    )
    security.add_argument("--timeout-body", type=float, default=60.0, help="seconds to send the body (408)")
    security.add_argument("--timeout-keep-alive", type=int, default=5, help="idle keep-alive seconds")
    security.add_argument("--timeout-request", type=float, default=None, help="arrival to last token (504)")
    security.add_argument(
        "--limit-concurrency", type=int, default=1024, help="connections at most (503 above)"
    )
    engine = parser.add_argument_group("batching and caches")
    engine.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together at most")
    engine.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait for more requests to batch")
    engine.add_argument(
        "--embedding-cache-gb", type=float, default=4.0, help="frame-embedding cache budget (0: off)"
    )
    engine.add_argument(
        "--prefix-cache-gb", type=float, default=4.0, help="prompt-prefix K/V cache budget (0: off)"
    )
    parser.add_argument(
        "--export-llm",
        metavar="DIR",
        default=None,
        help="write the LLM as a plain HF checkpoint (for vLLM / SGLang) to DIR and exit",
    )
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not Path(args.model).is_dir():
        print(f"longvila serve: error: model directory not found: {args.model}", file=sys.stderr)
        return 1
    try:
        model, processor = load_for_inference(
            args.model, args.device, args.dtype, projector_order=args.projector_order
        )
        if args.export_llm:
            from longvila.serve.handoff import export_llm

            print(f"wrote {export_llm(model, processor, args.export_llm)}")
            return 0
        server = _create(args, model, processor)
    except (OSError, ValueError) as exc:
        print(f"longvila serve: error: {exc}", file=sys.stderr)
        return 1
    # Tests and scripts read this line to learn the port when --port 0 was asked for.
    print(f"serving {server.settings.model_name} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _create(args: argparse.Namespace, model, processor):
    from longvila.serve.server import create_server

    return create_server(
        model,
        processor,
        host=args.host,
        port=args.port,
        model_name=args.served_model_name or Path(args.model).resolve().name,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        num_frames=args.frames,
        api_key=args.api_key,
        allowed_local_media_path=args.allowed_local_media_path,
        verbose=args.verbose,
        max_num_frames=args.max_num_frames,
        max_fps=args.max_fps,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_pending=args.max_pending,
        timeout_header_s=args.timeout_header,
        timeout_body_s=args.timeout_body,
        timeout_keep_alive_s=args.timeout_keep_alive,
        timeout_request_s=args.timeout_request,
        limit_concurrency=args.limit_concurrency,
        max_batch_size=args.max_num_seqs,
        batch_wait_s=args.batch_wait_ms / 1000,
        embedding_cache_bytes=int(args.embedding_cache_gb * GiB),
        prefix_cache_bytes=int(args.prefix_cache_gb * GiB),
    )
