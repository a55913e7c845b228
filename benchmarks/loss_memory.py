"""Peak memory of the chunked (fused LM head + cross entropy) loss against the naive one.

Runs each variant in its own process and reads the peak resident set size, so the number is what the
operating system saw. Usage: python benchmarks/loss_memory.py --tokens 8192 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(variant: str, tokens: int, vocab: int, hidden: int, dtype: str, chunk: int) -> dict:
    import torch

    from longvila.model.loss import chunked_cross_entropy_sum

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(tokens, hidden, dtype=dt, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).to(dt).requires_grad_()
    t = torch.randint(0, vocab, (tokens,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "naive":
        loss = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    else:
        loss = chunked_cross_entropy_sum(h, w, t, chunk_size=chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "extra_peak_mib": (peak - base) / 1024,
        "seconds": seconds,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument(
        "--variant", choices=["naive", "chunked"], help="internal: run one variant and print JSON"
    )
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_one(args.variant, args.tokens, args.vocab, args.hidden, args.dtype, args.chunk)))
        return
    results = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "variant"
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = results["naive"]["extra_peak_mib"] / max(results["chunked"]["extra_peak_mib"], 1e-9)
    print(
        json.dumps({"tokens": args.tokens, "vocab": args.vocab, **results, "memory_ratio": ratio}, indent=2)
    )


if __name__ == "__main__":
    main()
