"""The ring's compute on one device against SDPA flash on the same total work.

For each sequence length T this times, forward + backward, causal:
  sdpa   `F.scaled_dot_product_attention(is_causal=True)` on the whole sequence (the baseline);
  block  the block kernel (longvila.parallel.attention) on the whole sequence as one causal block,
         backward with its own out/LSE (the cost of the LSE interface alone);
  ring   the zigzag ring of `--ring` ranks simulated on this device with no communication: every
         rank's blocks, LSE merges and block backwards with the merged out/LSE, i.e. exactly the
         compute the ring does, summed over the ranks (the same FLOPs as `sdpa`).
and prints the ratios to sdpa plus the ring's largest output difference from sdpa.

  python benchmarks/attention.py                                   # GPU, 8K-128K tokens, bf16
  python benchmarks/attention.py --device cpu --tokens 256         # tiny CPU check (float32)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from longvila.parallel.attention import block_attention_backward, block_attention_forward, merge_partial
from longvila.parallel.ring import RingPlan

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


def run_sdpa(q, k, v, dout):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    out.backward(dout)
    return out.detach()


def run_block(q, k, v, dout):
    scale = q.shape[-1] ** -0.5
    out, lse, aux = block_attention_forward(q, k, v, scale=scale, causal=True)
    block_attention_backward(dout, q, k, v, out, lse, aux, scale=scale, causal=True)
    return out


def run_simulated_ring(q, k, v, dout, ring_degree: int):
    """Every ring rank's zigzag blocks, merges and block backwards, on one device, no communication."""
    total_len = q.shape[2]
    scale = q.shape[-1] ** -0.5
    full_out = torch.empty(
        q.shape, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype, device=q.device
    )
    for ring_rank in range(ring_degree):
        plan = RingPlan(
            group=None,
            ring_rank=ring_rank,
            ring_degree=ring_degree,
            causal=True,
            scale=scale,
            total_len=total_len,
            segment_ids=None,
        )
        pair = plan.positions(ring_rank, q.device)
        q_r, dout_r = q[:, :, pair], dout[:, :, pair]
        out = torch.zeros(q_r.shape, dtype=full_out.dtype, device=q.device)
        lse = torch.full(q_r.shape[:-1], float("-inf"), dtype=full_out.dtype, device=q.device)
        steps = []
        for step in range(ring_degree):
            src = (ring_rank - step) % ring_degree
            kv_pos = plan.positions(src, q.device)
            k_s, v_s = k[:, :, kv_pos], v[:, :, kv_pos]
            for qs, ks, causal, mask in plan.blocks(step, q.device):
                o_b, l_b, aux = block_attention_forward(
                    q_r[:, :, qs], k_s[:, :, ks], v_s[:, :, ks], scale=scale, causal=causal, mask=mask
                )
                out[:, :, qs], lse[:, :, qs] = merge_partial(out[:, :, qs], lse[:, :, qs], o_b, l_b)
                steps.append((qs, ks, causal, mask, k_s, v_s, aux))
        out_cast = out.to(q.dtype)
        for qs, ks, causal, mask, k_s, v_s, aux in steps:
            block_attention_backward(
                dout_r[:, :, qs],
                q_r[:, :, qs],
                k_s[:, :, ks],
                v_s[:, :, ks],
                out_cast[:, :, qs],
                lse[:, :, qs],
                aux,
                scale=scale,
                causal=causal,
                mask=mask,
            )
        full_out[:, :, pair] = out
    return full_out


def measure(tokens: int, args, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> dict:
    """Time sdpa, the block kernel and the simulated ring at one length; one result row."""
    q = torch.randn(1, args.heads, tokens, args.head_dim, device=device, dtype=dtype, generator=g)
    k, v = (
        torch.randn(1, args.kv_heads, tokens, args.head_dim, device=device, dtype=dtype, generator=g)
        for _ in range(2)
    )
    dout = torch.randn_like(q)
    sdpa_s = _timed(lambda: run_sdpa(q, k, v, dout), device, args.repeats)
    block_s = _timed(lambda: run_block(q, k, v, dout), device, args.repeats)
    ring_s = _timed(lambda: run_simulated_ring(q, k, v, dout, args.ring), device, args.repeats)
    err = (run_simulated_ring(q, k, v, dout, args.ring) - run_sdpa(q, k, v, dout).float()).abs().max().item()
    row = {
        "tokens": tokens,
        "sdpa_ms": sdpa_s * 1e3,
        "block_ms": block_s * 1e3,
        "ring_ms": ring_s * 1e3,
        "block_ratio": block_s / sdpa_s,
        "ring_ratio": ring_s / sdpa_s,
        "ring_max_err": err,
    }
    return row


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
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, {dtype}, heads {args.heads}/{args.kv_heads}, head dim {args.head_dim}, "
        f"ring {args.ring}, causal, forward + backward"
    )
    print(
        f"{'tokens':>8} {'sdpa ms':>9} {'block ms':>9} {'ring ms':>9} {'block/sdpa':>11} {'ring/sdpa':>10} "
        f"{'ring max err':>13}"
    )
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for tokens in args.tokens:
        if tokens % (2 * args.ring):
            raise ValueError(f"--tokens {tokens} is not divisible by 2 x ring = {2 * args.ring}")
        row = measure(tokens, args, device, dtype, g)
        rows.append(row)
        print(
            f"{tokens:>8} {row['sdpa_ms']:>9.2f} {row['block_ms']:>9.2f} {row['ring_ms']:>9.2f} "
            f"{row['block_ratio']:>11.2f} {row['ring_ratio']:>10.2f} {row['ring_max_err']:>13.2e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "dtype": str(dtype), "args": vars(args), "rows": rows}, f, indent=1
            )
    return rows


if __name__ == "__main__":
    main()
