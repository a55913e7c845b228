"""`longvila serve --model M`: an OpenAI-compatible chat-completions server for one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longvila.commands._model import add_model_arguments, load_for_inference

HELP = "OpenAI-compatible HTTP server"


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
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not Path(args.model).is_dir():
        print(f"longvila serve: error: model directory not found: {args.model}", file=sys.stderr)
        return 1
    from longvila.serve.server import create_server

    try:
        model, processor = load_for_inference(
            args.model, args.device, args.dtype, projector_order=args.projector_order
        )
        server = create_server(
            model,
            processor,
            host=args.host,
            port=args.port,
            model_name=args.served_model_name or Path(args.model).resolve().name,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            num_frames=args.frames,
            verbose=args.verbose,
        )
    except (OSError, ValueError) as exc:
        print(f"longvila serve: error: {exc}", file=sys.stderr)
        return 1
    # Tests and scripts read this line to learn the port when --port 0 was asked for.
    print(f"serving {server.worker.model_name} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
