"""Measure the two ring numbers the scale planner needs on your own cluster.

1. `ring_p2p_efficiency`: the bandwidth of one ring step (every rank sends a K/V-sized message to the
   next rank and receives one from the previous, `batch_isend_irecv`, as longvila.parallel.ring does)
   as a fraction of the link's nominal bandwidth (`--link-gbps`). An all-gather of the same message
   size is timed in the same run as the baseline of what a collective reaches over the same links.
2. The attention kernel's slowdown while ring transfers run beside it (CUDA: NCCL's kernels share the
   SMs): a matmul loop timed alone and with a ring step in flight on every iteration.

Launch one rank per GPU across the nodes the ring would span (ranks in ring order), e.g. on 8 nodes:

    torchrun --nnodes 8 --nproc-per-node 8 ... benchmarks/ring_p2p.py --mb 18.5 --link-gbps 50
    longvila plan ... --ring-p2p-efficiency <printed value>

and on one machine, as a smoke run of the script (gloo, CPU: the numbers mean nothing for a cluster):

    python benchmarks/ring_p2p.py --spawn 2 --mb 1 --iters 3

`--mb` defaults to the K/V hop of LongVILA-7B at ~578K tokens on a ring of 64 (2 x 578K/64 tokens x
4 KV heads x 128 x 2 bytes = 18.5 MB). Rank 0 prints a JSON line (and writes `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ring_step(send: torch.Tensor, recv: torch.Tensor, rank: int, world: int) -> list:
    ops = [
        dist.P2POp(dist.isend, send, (rank + 1) % world),
        dist.P2POp(dist.irecv, recv, (rank - 1) % world),
    ]
    return dist.batch_isend_irecv(ops)


def _time(fn, device: torch.device, iters: int) -> float:
    """Slowest rank's mean seconds per call (a synchronous ring moves at its slowest rank's pace)."""
    fn()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    if device.type == "cuda":
        elapsed = elapsed.to(device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def measure(args: argparse.Namespace, device: torch.device) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("ring_p2p.py needs at least 2 ranks (torchrun --nproc-per-node ... or --spawn N)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    element = torch.tensor([], dtype=dtype).element_size()
    numel = max(1, int(args.mb * 1e6) // element)
    size = numel * element
    send = torch.randn(numel, device=device).to(dtype)
    recv = torch.empty_like(send)
    gathered = torch.empty(world * numel, dtype=dtype, device=device)

    def ring():
        for req in _ring_step(send, recv, rank, world):
            req.wait()

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13

    def all_gather():
        gather(gathered, send)

    ring_s = _time(ring, device, args.iters)
    gather_s = _time(all_gather, device, args.iters)

    # Kernel slowdown beside the transfers: a matmul sized to take about one ring step.
    n = args.matmul
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def compute():
        a @ b

    def compute_beside_ring():
        reqs = _ring_step(send, recv, rank, world)
        a @ b
        for req in reqs:
            req.wait()

    compute_s = _time(compute, device, args.iters)
    overlapped_s = _time(compute_beside_ring, device, args.iters)

    ring_gbps = size / ring_s / 1e9
    # All-gather bus bandwidth: each rank receives (world - 1) messages.
    gather_gbps = size * (world - 1) / gather_s / 1e9
    result = {
        "world": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": dist.get_backend(),
        "message_bytes": size,
        "ring_step_s": ring_s,
        "ring_p2p_gbps": ring_gbps,
        "all_gather_s": gather_s,
        "all_gather_bus_gbps": gather_gbps,
        "ring_vs_all_gather": ring_gbps / gather_gbps,
        "link_gbps": args.link_gbps,
        "ring_p2p_efficiency": min(1.0, ring_gbps / args.link_gbps),
        "matmul_s": compute_s,
        "matmul_beside_ring_s": overlapped_s,
        "exposed_ring_s": max(0.0, overlapped_s - max(compute_s, ring_s)),
        "kernel_slowdown_upper_bound": overlapped_s / max(compute_s, ring_s) - 1.0,
    }
    return result if rank == 0 else None


def _worker(local_rank: int, args: argparse.Namespace, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(world)
    )
    _main_in_group(args)


def _main_in_group(args: argparse.Namespace) -> None:
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    try:
        result = measure(args, device)
        if result is not None:
            line = json.dumps(result)
            print(line, flush=True)
            print(
                f"ring step {result['ring_p2p_gbps']:.2f} GB/s per rank = {result['ring_p2p_efficiency']:.3f} of "
                f"{args.link_gbps:g} GB/s ({result['ring_vs_all_gather']:.2f}x the all-gather bus bandwidth); "
                f"pass `longvila plan --ring-p2p-efficiency {result['ring_p2p_efficiency']:.3f}`",
                flush=True,
            )
            if args.out:
                tmp = f"{args.out}.tmp"
                with open(tmp, "w") as f:
                    f.write(line + "\n")
                os.replace(tmp, args.out)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mb", type=float, default=18.5, help="message per ring step, MB (default: 7B K/V hop)"
    )
    parser.add_argument("--link-gbps", type=float, default=50.0, help="nominal per-GPU link bandwidth, GB/s")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    parser.add_argument("--matmul", type=int, default=8192, help="side of the matmul timed beside the ring")
    parser.add_argument("--spawn", type=int, default=0, help="start this many local ranks (no torchrun)")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even when CUDA is present")
    parser.add_argument("--out", default="", help="also write rank 0's JSON line here")
    args = parser.parse_args(argv)
    for name in ("mb", "link_gbps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.iters < 1 or args.matmul < 1:
        parser.error("--iters and --matmul must be >= 1")
    if args.spawn:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args, args.spawn, port), nprocs=args.spawn, join=True)
    else:
        if "RANK" not in os.environ:
            parser.error("run under torchrun, or pass --spawn N")
        _main_in_group(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
