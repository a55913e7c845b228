"""Choosing the 2D layout: Ulysses degree U inside a node, ring degree R across nodes.

Rules (docs/reference.md, MM-SP):
- Ulysses moves every token's activations by all-to-all, so its group must stay on NVLink: U divides
  the GPUs per node (then contiguous ranks never straddle nodes).
- Ulysses scatters heads: U divides the query heads; when U exceeds the K/V heads, the K/V heads are
  replicated (U must then be a multiple of them), otherwise U divides the K/V heads.
- The ring takes the rest: R = P / U, passing K/V between nodes, overlapped with compute.
Among the U that satisfy these, the largest wins: the ring's cross-node traffic shrinks by U.

Examples for Qwen2-7B (28 query heads, 4 K/V heads) on 8-GPU nodes:
    sp degree 8   -> U 4, R 2      (7 does not divide 8; 8 does not divide 28)
    sp degree 32  -> U 4, R 8
    sp degree 256 -> U 4, R 64
and for Qwen2-1.5B (12 query heads, 2 K/V heads): sp 8 -> U 4 (K/V heads replicated 2x), R 2.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SPLayout:
    ulysses_degree: int
    ring_degree: int
    reason: str

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree


def ulysses_fits(ulysses: int, num_q_heads: int, num_kv_heads: int) -> bool:
    if num_q_heads % ulysses:
        return False
    return num_kv_heads % ulysses == 0 or ulysses % num_kv_heads == 0


def choose_sp_layout(sp_degree: int, gpus_per_node: int, num_q_heads: int, num_kv_heads: int) -> SPLayout:
    """The largest Ulysses degree that fits a node and the heads; the ring takes the rest."""
    for name, value in (
        ("sp_degree", sp_degree),
        ("gpus_per_node", gpus_per_node),
        ("num_q_heads", num_q_heads),
        ("num_kv_heads", num_kv_heads),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads {num_q_heads} are not a multiple of K/V heads {num_kv_heads}")
    candidates = [
        u
        for u in range(min(sp_degree, gpus_per_node), 0, -1)
        if sp_degree % u == 0 and gpus_per_node % u == 0 and ulysses_fits(u, num_q_heads, num_kv_heads)
    ]
    ulysses = candidates[0]  # 1 always fits
    ring = sp_degree // ulysses
    why = [
        f"U={ulysses}: the largest degree dividing the SP degree {sp_degree}, the node's {gpus_per_node} GPUs "
        f"and the {num_q_heads} query heads"
    ]
    if ulysses > num_kv_heads:
        why.append(f"K/V heads {num_kv_heads} replicated {ulysses // num_kv_heads}x")
    if ring > 1:
        why.append(f"R={ring} ring steps carry K/V across {'nodes' if sp_degree > gpus_per_node else 'GPUs'}")
    return SPLayout(ulysses, ring, "; ".join(why))
