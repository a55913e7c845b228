"""`longvila plan`: choose a parallel layout for a model, a frame count and a cluster.

    longvila plan --model 7b --frames 2048 --gpus 256
    longvila plan --model path/to/config.json --frames 1024 --gpus 64 --emit-overrides

Predicts per-GPU memory and step time of every layout (docs/scaling.md), prints them ranked and
explains the choice; `--emit-overrides` ends with the recipe overrides of the winner.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="7b", help="preset (7b, 1.5b, 0.5b, 8b) or a config.json")
    parser.add_argument("--frames", type=int, default=0, help="video frames per sample")
    parser.add_argument("--tokens-per-frame", type=int, default=196, help="LLM tokens per frame (196)")
    parser.add_argument("--text-tokens", type=int, default=512, help="text tokens per sample (supervised)")
    parser.add_argument(
        "--tokens", type=int, default=0, help="total tokens instead of frames x per-frame + text"
    )
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (NVLink domain)")
    parser.add_argument("--intra-node-gbps", type=float, default=900.0, help="NVLink GB/s per GPU")
    parser.add_argument("--inter-node-gbps", type=float, default=50.0, help="InfiniBand GB/s per GPU")
    parser.add_argument(
        "--ring-p2p-efficiency",
        type=float,
        default=None,
        help="fraction of the inter-node link a ring's cross-node hops reach (default 0.10, fitted to the "
        "paper's zigzag ring; measure yours with benchmarks/ring_p2p.py)",
    )
    parser.add_argument("--gpu", default="h100", help="accelerator whose measured rates to use")
    parser.add_argument("--frozen-vision", action="store_true", help="the vision tower is not trained")
    parser.add_argument("--top", type=int, default=12, help="rows of the table (0: all)")
    parser.add_argument("--max-length", action="store_true", help="also print the longest trainable sequence")
    parser.add_argument(
        "--emit-overrides", action="store_true", help="end with the winner's recipe overrides on one line"
    )


def format_table(result, top: int = 12) -> str:
    from longvila.plan.hardware import GIB

    rows = [("layout", "role", "memory GiB", "fits", "step s", "tokens/s", "why not")]
    shown = result.candidates if top <= 0 else result.candidates[:top]
    # Always show the baselines at the winner's SP degree.
    best = result.best
    if best is not None:
        for role in ("ring only", "Ulysses only"):
            base = result.baseline(role, best.layout.sp)
            if base is not None and base not in shown:
                shown = [*shown, base]
    for c in shown:
        rows.append(
            (
                c.layout.label,
                c.role or "dp only",
                f"{c.memory.peak / GIB:.1f}",
                "yes" if c.fits else "no",
                f"{c.time.total:.2f}",
                f"{c.tokens_per_second:,.0f}",
                "; ".join(c.problems),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import sys

    from longvila.plan import Workload, get_hardware, load_shape
    from longvila.plan.search import max_sequence_length, plan

    try:
        shape = load_shape(args.model)
        hardware = get_hardware(args.gpu).with_links(
            intra_node_gbps=args.intra_node_gbps,
            inter_node_gbps=args.inter_node_gbps,
            gpus_per_node=args.gpus_per_node,
            ring_p2p_efficiency=args.ring_p2p_efficiency,
        )
        for name in ("frames", "tokens", "text_tokens"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
        if args.tokens_per_frame < 1:
            raise ValueError(f"--tokens-per-frame must be >= 1, got {args.tokens_per_frame}")
        if args.tokens:
            workload = Workload(
                tokens=args.tokens,
                frames=args.frames,
                supervised_tokens=args.text_tokens,
                train_vision=not args.frozen_vision,
            )
        else:
            workload = Workload.from_frames(
                args.frames, args.tokens_per_frame, args.text_tokens, train_vision=not args.frozen_vision
            )
        if workload.tokens < 1:
            raise ValueError("the sample is empty: give --frames, --text-tokens or --tokens")
        result = plan(shape, workload, args.gpus, hardware)
    except ValueError as exc:
        print(f"longvila plan: {exc}", file=sys.stderr)
        return 2
    nodes = max(1, args.gpus // hardware.gpus_per_node)
    print(
        f"{shape.name}: {shape.params / 1e9:.2f}B parameters; {workload.tokens:,} tokens per sample "
        f"({workload.frames} frames); {args.gpus} x {hardware.name} ({nodes} node(s) of "
        f"{hardware.gpus_per_node}), NVLink {hardware.intra_node_bandwidth / 1e9:g} GB/s, "
        f"inter-node {hardware.inter_node_bandwidth / 1e9:g} GB/s (ring hops at "
        f"{hardware.ring_p2p_efficiency:g} of it: {hardware.ring_inter_node_bandwidth / 1e9:.1f} GB/s)"
    )
    print("precision: bf16 compute; FSDP2 over dp x sp shards bf16 params/grads, fp32 master + AdamW moments")
    print()
    print(format_table(result, args.top))
    print()
    print(result.explain())
    if args.max_length:
        for ckpt in (False, True):
            tokens, cand = max_sequence_length(
                shape, args.gpus, hardware, checkpointing=ckpt, tokens_per_frame=args.tokens_per_frame
            )
            label = cand.layout.label if cand else "-"
            print(
                f"longest sequence on {args.gpus} GPUs{' with' if ckpt else ' without'} checkpointing: "
                f"{tokens:,} tokens ({label})"
            )
    if result.best is None:
        return 1
    if args.emit_overrides:
        print()
        print(" ".join(result.best.layout.overrides()))
    return 0
