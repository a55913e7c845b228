"""The attention path the model takes, against SDPA on the same work, forward + backward, causal.

For each sequence length T (a single sample, and a packed row of `--samples` equal samples) this times:
  sdpa         `F.scaled_dot_product_attention(is_causal=True)` on the whole sequence (the baseline);
  local        the model's one-process path for one sample: `local_attention` (one fused causal call,
               out/LSE kept for the backward);
  packed_sdpa  SDPA causal on each packed sample separately (the baseline for packed rows: the least
               work a varlen kernel could do);
  packed       the model's one-process path for a packed row: `local_attention` with the samples'
               bounds (one fused call per sample, no mask);
  ring         the zigzag ring of `--ring` ranks on the packed row on this device: the library's ring
               loop (`simulate_ring_attention`: every rank's mask-free pieces, LSE merges, piece
               backwards with the merged out/LSE and the dK/dV that travel the ring), the ranks run in
               turn and their messages are local copies, i.e. the compute of sequence parallelism
               summed over the ranks, without the network;
and prints the ratios to their baselines plus the ring's largest output difference from packed_sdpa.

  python benchmarks/attention.py                                   # GPU, 8K-128K tokens, bf16
  python benchmarks/attention.py --device cpu --tokens 256         # tiny CPU check (float32)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from longvila.kernels.attention import local_attention
from longvila.parallel.ring import simulate_ring_attention

# Shapes: B batch (1), N heads, T tokens, H head dim; kernel tensors (B, N, T, H).


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _leaves(*xs):
    return [x.detach().requires_grad_() for x in xs]


def run_sdpa(q, k, v, dout):
    q, k, v = _leaves(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    out.backward(dout)
    return out.detach()


def run_packed_sdpa(q, k, v, dout, bounds):
    """SDPA on each sample on its own: (B, N, T, H) output of the packed row."""
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        outs.append(run_sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dout[:, :, a:b]))
    return torch.cat(outs, dim=2)


def run_local(q, k, v, dout, bounds=None):
    q, k, v = _leaves(q, k, v)
    out = local_attention(q, k, v, scale=q.shape[-1] ** -0.5, boundaries=bounds)
    out.backward(dout)
    return out.detach()


def run_simulated_ring(q, k, v, dout, ring_degree: int, bounds=None):
    """The library's zigzag ring loop (`longvila.parallel.ring`), every rank's forward and backward on
    this device in lockstep, K/V and dK/dV passed by in-process copies: (B, N, T, H) output."""
    return simulate_ring_attention(q, k, v, dout, ring_degree, boundaries=bounds)[0]


def measure(tokens: int, args, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> dict:
    """Time every path at one length; one result row."""
    q = torch.randn(1, args.heads, tokens, args.head_dim, device=device, dtype=dtype, generator=g)
    k, v = (
        torch.randn(1, args.kv_heads, tokens, args.head_dim, device=device, dtype=dtype, generator=g)
        for _ in range(2)
    )
    dout = torch.randn_like(q)
    length = tokens // args.samples
    bounds = tuple(range(0, tokens + 1, length))
    sdpa_s = _timed(lambda: run_sdpa(q, k, v, dout), device, args.repeats)
    local_s = _timed(lambda: run_local(q, k, v, dout), device, args.repeats)
    packed_sdpa_s = _timed(lambda: run_packed_sdpa(q, k, v, dout, bounds), device, args.repeats)
    packed_s = _timed(lambda: run_local(q, k, v, dout, bounds), device, args.repeats)
    ring_s = _timed(lambda: run_simulated_ring(q, k, v, dout, args.ring, bounds), device, args.repeats)
    reference = run_packed_sdpa(q, k, v, dout, bounds).float()
    err = (run_simulated_ring(q, k, v, dout, args.ring, bounds).float() - reference).abs().max().item()
    return {
        "tokens": tokens,
        "samples": args.samples,
        "sdpa_ms": sdpa_s * 1e3,
        "local_ms": local_s * 1e3,
        "packed_sdpa_ms": packed_sdpa_s * 1e3,
        "packed_ms": packed_s * 1e3,
        "ring_ms": ring_s * 1e3,
        "local_ratio": local_s / sdpa_s,
        "packed_ratio": packed_s / packed_sdpa_s,
        "ring_ratio": ring_s / packed_sdpa_s,
        "ring_max_err": err,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--heads", type=int, default=14, help="query heads (Qwen2-1.5B: 12, 7B: 28)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ring", type=int, default=4, help="ring degree to simulate")
    parser.add_argument("--samples", type=int, default=4, help="samples per packed row")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, {dtype}, heads {args.heads}/{args.kv_heads}, head dim {args.head_dim}, "
        f"ring {args.ring}, packed rows of {args.samples} samples, causal, forward + backward"
    )
    print(
        f"{'tokens':>8} {'sdpa ms':>9} {'local ms':>9} {'local/sdpa':>11} {'packed sdpa':>12} {'packed ms':>10} "
        f"{'packed/sdpa':>12} {'ring ms':>9} {'ring/sdpa':>10} {'ring max err':>13}"
    )
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for tokens in args.tokens:
        if tokens % (2 * args.ring) or tokens % args.samples:
            raise ValueError(
                f"--tokens {tokens} is not divisible by 2 x ring = {2 * args.ring} and by --samples {args.samples}"
            )
        row = measure(tokens, args, device, dtype, g)
        rows.append(row)
        print(
            f"{tokens:>8} {row['sdpa_ms']:>9.2f} {row['local_ms']:>9.2f} {row['local_ratio']:>11.2f} "
            f"{row['packed_sdpa_ms']:>12.2f} {row['packed_ms']:>10.2f} {row['packed_ratio']:>12.2f} "
            f"{row['ring_ms']:>9.2f} {row['ring_ratio']:>10.2f} {row['ring_max_err']:>13.2e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "dtype": str(dtype), "args": vars(args), "rows": rows}, f, indent=1
            )
    return rows


if __name__ == "__main__":
    main()
