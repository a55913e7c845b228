"""Step time of one training step under a layout, from measured kernel rates and link speeds.

Compute: matmul FLOPs at the measured matmul rate, causal attention FLOPs at the measured flash forward
and backward rates, the vision tower at its measured frames/s. Communication: the bytes the SP code
moves (`attention_comm_bytes`: the formula of `longvila.plan.rules`, which `sp_attention` moves) over the link each
collective crosses; the ring overlaps its K/V (and dK/dV) transfer with the block computation, so each
ring step costs max(compute, transfer) plus a small exposed part (latency and the LSE merge pass);
FSDP's all-gathers and reduce-scatters overlap the whole step's compute. docs/scaling.md has the
equations and their calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from longvila.plan.hardware import Hardware
from longvila.plan.memory import BF16_FSDP, Layout, PrecisionPolicy, Workload
from longvila.plan.rules import sp_attention_comm_bytes
from longvila.plan.shapes import LLMShape, ModelShape


def attention_comm_bytes(
    llm: LLMShape,
    *,
    batch: int,
    total_len: int,
    ulysses_degree: int,
    ring_degree: int,
    element_bytes: int = 2,
    accumulation_bytes: int = 4,
) -> dict[str, dict[str, int]]:
    """Bytes one rank receives (= sends) in one SP attention call (one layer), by pass and kind: the
    formula of `longvila.plan.rules.sp_attention_comm_bytes` (which `sp_attention` moves) for `llm`'s heads."""
    return sp_attention_comm_bytes(
        batch=batch,
        total_len=total_len,
        q_heads=llm.q_heads,
        kv_heads=llm.kv_heads,
        head_dim=llm.head_dim,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        element_bytes=element_bytes,
        accumulation_bytes=accumulation_bytes,
    )


def padded_length(tokens: int, layout: Layout) -> int:
    """The SP layout needs T divisible by 2 R U (zigzag chunks split among Ulysses ranks): pad."""
    multiple = 2 * layout.ring * layout.ulysses
    return math.ceil(tokens / multiple) * multiple


@dataclass
class StepTime:
    """Seconds per step on every rank, by part."""

    linear: float = 0.0
    """Matmuls of the LLM layers and the LM head (forward, backward, recompute)."""
    attention: float = 0.0
    """Attention kernels, including ring steps where the transfer is slower than the block."""
    ring_exposed: float = 0.0
    """Ring costs not hidden: per-step latency, the LSE merge pass, the last dK/dV hop."""
    ulysses: float = 0.0
    """All-to-alls (not overlapped)."""
    vision: float = 0.0
    """Vision tower and projector on this rank's frames."""
    fsdp_exposed: float = 0.0
    """Parameter all-gather / gradient reduce-scatter time not hidden behind compute."""
    ring_link: str = "-"
    """Link the ring's hops are bounded by: nvlink, infiniband or - (no ring)."""

    @property
    def total(self) -> float:
        return (
            self.linear + self.attention + self.ring_exposed + self.ulysses + self.vision + self.fsdp_exposed
        )


def predict_step_time(
    shape: ModelShape,
    layout: Layout,
    workload: Workload,
    hardware: Hardware,
    policy: PrecisionPolicy = BF16_FSDP,
) -> StepTime:
    """Seconds of one optimizer step (one row per SP group, no gradient accumulation)."""
    llm = shape.llm
    e, acc = policy.activation_bytes, policy.accumulation_bytes
    sp, ulysses, ring = layout.sp, layout.ulysses, layout.ring
    tokens = padded_length(workload.tokens, layout)
    local = tokens / sp
    recompute = 1 if layout.checkpointing else 0
    out = StepTime()

    # Linear layers: 2 FLOPs per weight per token forward, 4 backward (+2 recomputed); the head
    # only on supervised tokens (the chunked loss skips the rest).
    layer_flops = 2 * local * llm.layers * llm.layer_matmul_params
    head_flops = 2 * (workload.supervised_tokens / sp) * llm.vocab * llm.hidden
    out.linear = ((3 + recompute) * layer_flops + 3 * head_flops) / hardware.matmul_flops

    # Causal attention FLOPs of one layer on one rank: 4 T^2 Nq H / 2 / P forward, 2.5x backward.
    fwd_flops = 2 * tokens * tokens * llm.q_dim / sp
    fwd_s = fwd_flops / hardware.attention_forward_flops
    bwd_s = 2.5 * fwd_flops / hardware.attention_backward_flops
    comm = attention_comm_bytes(
        llm,
        batch=1,
        total_len=tokens,
        ulysses_degree=ulysses,
        ring_degree=ring,
        element_bytes=e,
        accumulation_bytes=acc,
    )
    if ring > 1:
        crosses_nodes = sp > hardware.gpus_per_node
        bandwidth = hardware.ring_inter_node_bandwidth if crosses_nodes else hardware.intra_node_bandwidth
        out.ring_link = "infiniband" if crosses_nodes else "nvlink"
        kv_hop = comm["forward"]["ring_p2p"] / (ring - 1) / bandwidth
        dkv_hop = (comm["backward"]["ring_p2p"] - comm["forward"]["ring_p2p"]) / ring / bandwidth
        # Steps that overlap a transfer run the kernel slower (the last step has none to hide).
        slow = 1.0 + hardware.ring_overlap_slowdown(local)
        step_f, step_b = fwd_s / ring, bwd_s / ring
        forward = (ring - 1) * max(step_f * slow, kv_hop) + step_f
        backward = (ring - 1) * max(step_b * slow, kv_hop + dkv_hop) + step_b
        attention_layer = (1 + recompute) * forward + backward
        # Exposed: latency of every hop, the float32 LSE merge of each step's partial output
        # (read out, lse and the block's, write out and lse: ~4 passes over S x q float32), the
        # last dK/dV hop home.
        merge = 4 * local * llm.q_dim * acc / hardware.memory_bandwidth
        exposed = (1 + recompute) * ring * (hardware.link_latency_s + merge)
        exposed += ring * hardware.link_latency_s + dkv_hop
        out.ring_exposed = llm.layers * exposed
    else:
        attention_layer = (1 + recompute) * fwd_s + bwd_s
    out.attention = llm.layers * attention_layer
    if ulysses > 1:
        a2a = comm["forward"]["all_to_all"] / hardware.intra_node_bandwidth + 4 * hardware.link_latency_s
        out.ulysses = llm.layers * (2 + recompute) * a2a

    # Vision tower: measured forward rate, backward 2x forward when trained (+1 forward recomputed).
    frames_local = math.ceil(workload.frames / sp)
    passes = (3 + recompute) if workload.train_vision else 1
    out.vision = passes * frames_local / hardware.vision_frames_per_second

    # FSDP2 over dp x sp: all-gather bf16 params in forward and again in backward, reduce-scatter
    # grads; hidden behind compute unless slower. The slowest hop sets the pace.
    world = layout.world
    if policy.sharded and world > 1:
        link = (
            hardware.inter_node_bandwidth if world > hardware.gpus_per_node else hardware.intra_node_bandwidth
        )
        moved = shape.params * (2 * policy.param_bytes + policy.grad_bytes) * (world - 1) / world
        compute = out.linear + out.attention + out.vision
        out.fsdp_exposed = max(0.0, moved / link - compute)
    return out
