"""Peak memory of one training step (forward + backward) of the tiny LongVILA on packed rows, as T grows.

Every length runs in a fresh process (so freed memory cached by the allocator of an earlier run cannot
hide a peak). A run resets the kernel's peak-RSS counter (`/proc/self/clear_refs`) once the model and
the batch exist, takes one step, and reports the peak RSS above that point: the memory the step itself
needs. With mask-free attention it grows linearly in T (ratio ~2 or less per doubling, fixed buffers
such as the loss's logits chunk pull it below 2); a dense (T x T) mask or score matrix makes it ~4.

  python benchmarks/memory_growth.py                                  # 8K, 16K, 32K; one process
  python benchmarks/memory_growth.py --ring 2                         # the same under SP world 2 (gloo)
  python benchmarks/memory_growth.py --tokens 65536 --precision bf16  # one 64K-token packed row
  python benchmarks/memory_growth.py --tokens 2048 4096 --attention dense   # the dense baseline

Linux only (reads /proc). Prints a table and, with --json, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SAMPLES = 4


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    """Set the peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _packed_batch(tokens: int, samples: int, config, seed: int = 0) -> dict:
    """One row of `samples` equal text samples (each >= 32 tokens): ids, labels, positions, bounds."""
    if tokens % samples:
        raise ValueError(f"--tokens {tokens} is not divisible by {samples} samples")
    g = torch.Generator().manual_seed(seed)
    vocab = config.llm["vocab_size"]
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    ids[ids == config.image_token_id] = 0  # text only: no frames
    length = tokens // samples
    # Like SFT on videos: only each sample's answer (its last 32 tokens) is supervised.
    labels = torch.full_like(ids, -100)
    for end in range(length, tokens + 1, length):
        labels[0, end - 32 : end] = ids[0, end - 32 : end]
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.arange(length).repeat(samples)[None],
        "cu_seqlens": torch.arange(0, tokens + 1, length, dtype=torch.int32),
    }


def _use_dense_attention() -> None:
    """Baseline: route packed rows through a dense (T x T) masked softmax (what the code did before)."""
    import longvila.model.attention as model_attention
    from longvila.kernels.attention import reference_attention

    def dense(q, k, v, *, scale, causal=True, boundaries=None):
        out = reference_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=causal,
            cu_seqlens=boundaries,
            scale=scale,
        )
        return out.transpose(1, 2)

    model_attention.local_attention = dense


def one_step(args, sp=None) -> dict:
    """Build the tiny model and a packed row, reset the peak, run forward + backward; this process's row."""
    from longvila import LongVILA, LongVILAConfig

    torch.manual_seed(0)
    model = LongVILA(LongVILAConfig.tiny()).train()
    batch = _packed_batch(args.tokens[0], SAMPLES, model.config)
    if args.attention == "dense":
        _use_dense_attention()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    with autocast:
        out = model(**batch, sp=sp)
    out.loss.backward()
    seconds = time.perf_counter() - start
    return {
        "tokens": args.tokens[0],
        "peak_step_mib": (_status_kib("VmHWM") - before) / 1024,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "step_s": seconds,
        "loss": out.loss.item(),
    }


def _rank_main(rank: int, world: int, port: int, args, results) -> None:
    import torch.distributed as dist

    from longvila.parallel import init_sp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results.put((rank, one_step(args, init_sp(ulysses=args.ulysses, ring=args.ring))))
    finally:
        dist.destroy_process_group()


def _single_run(args) -> dict:
    world = args.ulysses * args.ring
    if world == 1:
        torch.set_num_threads(args.threads)
        return {**one_step(args), "ranks": 1}
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    rows = dict(results.get(timeout=args.timeout) for _ in procs)
    for p in procs:
        p.join()
    worst = max(rows.values(), key=lambda row: row["peak_step_mib"])
    return {
        **worst,
        "ranks": world,
        "per_rank_peak_step_mib": [rows[r]["peak_step_mib"] for r in sorted(rows)],
    }


def measure(tokens: int, args) -> dict:
    """One length in a fresh process; returns its row."""
    cmd = [sys.executable, __file__, "--single-run", "--tokens", str(tokens), "--ring", str(args.ring),
           "--ulysses", str(args.ulysses), "--precision", args.precision, "--attention", args.attention,
           "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        raise RuntimeError(f"the {tokens}-token run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--ring", type=int, default=1, help="ring degree (world = ring x ulysses, gloo)")
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: CPU autocast")
    parser.add_argument("--attention", choices=["model", "dense"], default="model",
                        help="dense: a (T x T) masked softmax instead of the model's path (one process)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--single-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attention == "dense" and args.ring * args.ulysses > 1:
        parser.error("--attention dense runs in one process only")
    if args.single_run:
        print(json.dumps(_single_run(args)))
        return []
    print(
        f"tiny LongVILA, packed rows of {SAMPLES} samples, forward + backward, {args.precision}, "
        f"attention {args.attention}, ulysses {args.ulysses} x ring {args.ring}, torch {torch.__version__}, "
        f"{args.threads} thread(s)"
    )
    print(f"{'tokens':>8} {'step peak MiB':>14} {'growth':>7} {'process peak MiB':>17} {'step s':>8}")
    rows = []
    for tokens in args.tokens:
        row = measure(tokens, args)
        row["growth"] = row["peak_step_mib"] / rows[-1]["peak_step_mib"] if rows else None
        rows.append(row)
        growth = f"{row['growth']:.2f}" if row["growth"] is not None else "-"
        print(
            f"{tokens:>8} {row['peak_step_mib']:>14.1f} {growth:>7} {row['peak_rss_mib']:>17.1f} {row['step_s']:>8.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
