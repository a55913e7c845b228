"""Cases run inside one world-4 gloo group by test_sp_attention.py (spawned ranks import this module).

Every case compares the sequence-parallel path in float64 with single-process
`F.scaled_dot_product_attention` on the same full inputs, under a mask this module builds from the
sample lengths (nothing of the project's masking). Traffic is counted by wrapping torch.distributed's
calls (`_comm_traffic.DistTraffic`), not by the code's own CommCounter.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _comm_traffic import DistTraffic

from longvila.parallel import init_sp, sp_attention
from longvila.parallel.hybrid import sp_attention_comm_bytes

WORLD_SIZE = 4
# name: (ulysses, ring); dp = 4 / (ulysses * ring)
LAYOUTS = {"u4": (4, 1), "r4": (1, 4), "u2r2": (2, 2), "dp2_u2": (2, 1)}
HEADS = [(4, 4), (8, 2), (8, 1)]  # (query heads, K/V heads): MHA, GQA, GQA with U > K/V heads
HEAD_DIM = 8
BATCH = 2


def _cu_seqlens(rng: random.Random, total_len: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    cuts = sorted(rng.sample(range(1, total_len - 1), 3))
    end = (
        total_len if kind == "packed" else rng.randrange(cuts[-1] + 1, total_len)
    )  # "padded": tail is padding
    return torch.tensor([0, *cuts, end], dtype=torch.int32)


def attention_cases() -> list[tuple]:
    """(name, layout, causal, q_heads, kv_heads, total_len, cu_seqlens or None)."""
    rng = random.Random(1234)
    cases = []
    for layout, (ulysses, ring) in LAYOUTS.items():
        multiple = 2 * ulysses * ring
        for causal in (True, False):
            for q_heads, kv_heads in HEADS:
                for kind in ("none", "packed", "padded"):
                    total_len = multiple * rng.randrange(16 // multiple + 1, 96 // multiple + 1)
                    cu = _cu_seqlens(rng, total_len, kind)
                    name = f"{layout}-{'causal' if causal else 'full'}-h{q_heads}kv{kv_heads}-T{total_len}-{kind}"
                    cases.append((name, layout, causal, q_heads, kv_heads, total_len, cu))
    return cases


def sample_mask(total_len: int, cu_seqlens, causal: bool) -> torch.Tensor:
    """(T, T) bool, True = query row may attend key column: same sample (samples are the runs
    cu[i]:cu[i+1]; tokens from cu[-1] on are padding and see nothing) and, if causal, key <= query."""
    sample = [0] * total_len
    if cu_seqlens is not None:
        bounds = [int(x) for x in cu_seqlens]
        sample = [-1] * total_len
        for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            for position in range(start, end):
                sample[position] = index
    mask = torch.tensor([[a == b and a >= 0 for b in sample] for a in sample], dtype=torch.bool)
    if causal:
        mask &= torch.ones(total_len, total_len, dtype=torch.bool).tril()
    return mask


def sdpa_reference(q, k, v, *, causal: bool, cu_seqlens=None) -> torch.Tensor:
    """q (B, T, Nq, H), k/v (B, T, Nk, H) -> (B, T, Nq, H) by torch's SDPA; GQA by repeating each K/V
    head for its Nq / Nk query heads (Qwen2's layout). Rows that see no key (padding) give 0."""
    total_len, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    mask = sample_mask(total_len, cu_seqlens, causal)
    empty = ~mask.any(-1)
    # An empty row would softmax to NaN (and NaN its gradients): let it see itself, then zero it.
    mask = mask | (torch.diag(empty))
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(nq // nk, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(nq // nk, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    out = torch.where(empty[None, None, :, None], torch.zeros_like(out), out)
    return out.transpose(1, 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _inputs(seed: int, total_len: int, q_heads: int, kv_heads: int):
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (BATCH, total_len, q_heads, HEAD_DIM), (BATCH, total_len, kv_heads, HEAD_DIM)
    q, dout = (torch.randn(shape_q, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(shape_kv, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout


def _run_attention_case(sp, case, seed):
    name, _, causal, q_heads, kv_heads, total_len, cu = case
    q, k, v, dout = _inputs(seed, total_len, q_heads, kv_heads)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out = sdpa_reference(*ref_leaves, causal=causal, cu_seqlens=cu)
    ref_out.backward(dout)
    # Every SP rank holds the same full inputs; shard's backward scatters into a zero full grad.
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out_local = sp_attention(*(sp.shard(x, 1) for x in leaves), sp, causal=causal, cu_seqlens=cu)
    out_local.backward(sp.shard(dout, 1))
    local_grads = [x.grad.clone() for x in leaves]
    summed = []
    for grad in local_grads:
        grad = grad.clone()
        dist.all_reduce(grad, group=sp.sp_group)
        summed.append(grad)
    out_full = sp.gather(out_local.detach(), 1)
    result = {
        "out": _rel(out_full, ref_out.detach()),
        "out_local": _rel(out_local.detach(), sp.shard(ref_out.detach(), 1)),
        **{f"d{n}": _rel(g, r.grad) for n, g, r in zip("qkv", summed, ref_leaves)},
        "nan": bool(torch.isnan(out_local).any() or any(torch.isnan(g).any() for g in local_grads)),
    }
    return result


def _run_padded_rank_case(sp):
    """U = 4, R = 1: the last two ranks hold only padding; they must return zeros and zero grads."""
    total_len = 32
    cu = torch.tensor([0, 5, 11, 16], dtype=torch.int32)
    q, k, v, dout = _inputs(7, total_len, 8, 2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out_local = sp_attention(*(sp.shard(x, 1) for x in leaves), sp, causal=True, cu_seqlens=cu)
    out_local.backward(sp.shard(dout, 1))
    local_grads = [sp.shard(x.grad, 1) for x in leaves]
    return {
        "all_padding": bool(sp.local_positions(total_len).min() >= 16),
        "out_zero": bool((out_local == 0).all()),
        "grads_zero": all(bool((g == 0).all()) for g in local_grads),
        "finite": bool(torch.isfinite(out_local).all() and all(torch.isfinite(g).all() for g in local_grads)),
    }


def _run_bytes_case(sp, q_heads, kv_heads, total_len=32):
    q, k, v, dout = _inputs(3, total_len, q_heads, kv_heads)
    local = [sp.shard(x, 1).requires_grad_() for x in (q, k, v)]
    with DistTraffic() as forward:
        out = sp_attention(*local, sp, causal=True)
    with DistTraffic() as backward:
        out.backward(sp.shard(dout, 1))
    expected = sp_attention_comm_bytes(
        batch=BATCH,
        total_len=total_len,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=HEAD_DIM,
        ulysses_degree=sp.ulysses_degree,
        ring_degree=sp.ring_degree,
        element_bytes=8,
        accumulation_bytes=8,
    )
    return {"forward": dict(forward.bytes), "backward": dict(backward.bytes), "expected": expected}


def _run_gather_convention_case(sp):
    """Summing a parameter's grad over the SP group gives the single-process grad through
    shard -> gather -> shard; and gather(shard(x)) == x."""
    total_len = 24
    g = torch.Generator().manual_seed(11)
    x, c = torch.randn(total_len, 3, generator=g, dtype=torch.float64), torch.randn(total_len, 1, generator=g)
    weight = torch.randn(3, generator=g, dtype=torch.float64)
    w = weight.clone().requires_grad_()
    with DistTraffic() as counter:
        z = sp.gather(torch.sin(sp.shard(x * w, 0)), 0)
        loss = (sp.shard(z, 0) ** 2 * sp.shard(c, 0)).sum()  # the ranks' losses add up to the total
        loss.backward()
    share_bytes = total_len // sp.sp_degree * 3 * 8
    expected_bytes = {
        "all_gather": (sp.sp_degree - 1) * share_bytes,
        "reduce_scatter": (sp.sp_degree - 1) * share_bytes,
    }
    grad = w.grad.clone()
    dist.all_reduce(grad, group=sp.sp_group)
    w_ref = weight.clone().requires_grad_()
    (torch.sin(x * w_ref) ** 2 * c).sum().backward()
    return {
        "grad": _rel(grad, w_ref.grad),
        "round_trip": bool(torch.equal(sp.gather(sp.shard(x, 0), 0), x)),
        "bytes_match": dict(counter.bytes) == expected_bytes,
    }


def _errors():
    """Bad layouts and heads raise ValueError (checked before any collective)."""
    raised = {}
    for name, call in {
        "ulysses3": lambda: init_sp(3, 1),
        "too_big": lambda: init_sp(4, 2),
    }.items():
        try:
            call()
            raised[name] = False
        except ValueError:
            raised[name] = True
    return raised


def run_all(rank: int, world_size: int) -> dict:
    layouts = {name: init_sp(ulysses=u, ring=r) for name, (u, r) in LAYOUTS.items()}
    results = {"attention": {}, "bytes": {}, "gather": {}}
    for i, case in enumerate(attention_cases()):
        sp = layouts[case[1]]
        # dp replicas get different data, so a mix-up between dp groups would show.
        results["attention"][case[0]] = _run_attention_case(sp, case, seed=100 * i + sp.dp_rank)
    for name, sp in layouts.items():
        for q_heads, kv_heads in HEADS:
            results["bytes"][f"{name}-h{q_heads}kv{kv_heads}"] = _run_bytes_case(sp, q_heads, kv_heads)
        results["gather"][name] = _run_gather_convention_case(sp)
    results["padded_rank"] = _run_padded_rank_case(layouts["u4"])
    results["errors"] = _errors()
    results["coords"] = {
        name: (sp.dp_rank, sp.ring_rank, sp.ulysses_rank, sp.sp_rank, sp.sp_degree, sp.dp_degree)
        for name, sp in layouts.items()
    }
    return results


def _merge_by_max(out, lse, block_out, block_lse):
    """A broken LSE merge: keep whichever partial has the larger LSE (max instead of log-sum-exp)."""
    take = (block_lse > lse).unsqueeze(-1)
    return torch.where(take, block_out, out), torch.maximum(lse, block_lse)


def run_with_broken_lse_merge(rank: int, world_size: int) -> dict:
    """The ring layouts' attention cases with the ring's LSE merge replaced by `_merge_by_max`
    (the mutation test_mutations_sp.py requires test_sp_attention's check to catch)."""
    # The ring merges every piece's partial output into the running one through the kernels' merge.
    import longvila.kernels.attention as kernels

    kernels.merge_partial = _merge_by_max
    layouts = {name: init_sp(ulysses=u, ring=r) for name, (u, r) in LAYOUTS.items() if r > 1}
    results = {"attention": {}}
    for i, case in enumerate(attention_cases()):
        if case[1] in layouts:
            results["attention"][case[0]] = _run_attention_case(layouts[case[1]], case, 100 * i)
    return results
