"""The sequence-parallel layout rules that the runtime (`longvila.parallel`) and the planner both apply, written
once and torch-free so that `longvila plan` stays fast.

- Heads: Ulysses scatters heads, so U divides the query heads; K/V heads divide U (each is replicated
  U / Nk times) or U divides them; query heads are a multiple of the K/V heads (GQA).
- Communication: the bytes one rank moves in one SP attention call (docs/parallelism.md).
"""

from __future__ import annotations


def ulysses_head_problems(num_q_heads: int, num_kv_heads: int, ulysses_degree: int) -> list[str]:
    """The head rules a Ulysses degree breaks, as sentences; empty when the heads fit."""
    problems = []
    if num_q_heads % num_kv_heads:
        problems.append(f"query heads {num_q_heads} are not a multiple of K/V heads {num_kv_heads}")
    if num_q_heads % ulysses_degree:
        problems.append(f"query heads {num_q_heads} are not divisible by the Ulysses degree {ulysses_degree}")
    elif num_kv_heads % ulysses_degree and ulysses_degree % num_kv_heads:
        problems.append(
            f"K/V heads {num_kv_heads} neither divide nor are divisible by the Ulysses degree {ulysses_degree}"
        )
    return problems


def sp_attention_comm_bytes(
    *,
    batch: int,
    total_len: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    ulysses_degree: int,
    ring_degree: int,
    element_bytes: int,
    accumulation_bytes: int = 4,
) -> dict[str, dict[str, int]]:
    """Bytes one rank receives (= sends) in one `sp_attention` call, by pass and collective kind.

    With S = T / (U R) tokens per rank, Nk' = max(Nk, U) K/V heads after replication, e the element
    size and e_acc the dK/dV accumulation size (4; 8 for float64):
      all_to_all, forward = backward: (2 Nq + 2 Nk') * B * S * H * e * (U - 1) / U
          (q, k, v scattered to heads, the output gathered back; the backward moves dO, dQ, dK, dV);
      ring_p2p, forward: (R - 1) * 2 * B * (T / R) * (Nk' / U) * H * e        (K/V, R - 1 hops)
      ring_p2p, backward: the same again for K/V, plus R * 2 * B * (T / R) * (Nk' / U) * H * e_acc
          (dK/dV make R hops so that they end at their owner).
    Kinds that move nothing are left out. See docs/parallelism.md.
    """
    ulysses, ring = ulysses_degree, ring_degree
    local_len = total_len // (ulysses * ring)
    kv_heads = max(kv_heads, ulysses)
    forward: dict[str, int] = {}
    backward: dict[str, int] = {}
    if ulysses > 1:
        a2a = (2 * q_heads + 2 * kv_heads) * batch * local_len * head_dim * element_bytes
        forward["all_to_all"] = backward["all_to_all"] = a2a * (ulysses - 1) // ulysses
    if ring > 1:
        kv_elements = 2 * batch * (total_len // ring) * (kv_heads // ulysses) * head_dim
        forward["ring_p2p"] = (ring - 1) * kv_elements * element_bytes
        backward["ring_p2p"] = forward["ring_p2p"] + ring * kv_elements * accumulation_bytes
    return {"forward": forward, "backward": backward}
