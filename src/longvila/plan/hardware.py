"""Measured throughput and links of the GPUs the planner knows, with where each number comes from.

Every rate below was measured on one H100 80GB SXM (torch 2.11, bf16) and is recorded in
docs/reference.md ("Measured here"); the link speeds are the paper's cluster (LongVILA,
arXiv 2408.10188: 8 x H100 per node, NVLink 900 GB/s, InfiniBand 50 GB/s). The planner never assumes
peak (989 TFLOP/s dense bf16): it uses what a kernel actually reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

GIB = 1024**3

# The paper's zigzag ring on 64 H100s (8 nodes, InfiniBand 50 GB/s per GPU) at ~578K tokens took
# 77.2 s per iteration against 16.9 s for 2D attention (docs/reference.md). With the ring's hops at the full
# 50 GB/s this model hides them behind the block kernel (1.03x); the paper's gap needs the cross-node
# hops to reach about a tenth of the link. `benchmarks/plan_ring_fit.py` fits this number to that
# measurement (Llama-3-8B, U = 8 x R = 8 against U = 1 x R = 64) and checks it.
RING_P2P_EFFICIENCY = 0.10
# Attention kernel slowdown with the ring's transfers beside it (paper, forward): 4K and 32K tokens/GPU.
RING_OVERLAP_AT_4K = 0.186
RING_OVERLAP_AT_32K = 0.042


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One accelerator and the links between accelerators."""

    name: str
    """Short name (`h100`)."""
    memory_bytes: int
    """Memory one process may use for tensors (the card's capacity less the CUDA context)."""
    matmul_flops: float
    """bf16 matmul throughput reached on large GEMMs (FLOP/s)."""
    attention_forward_flops: float
    """Flash causal attention forward, FLOP/s counted as 4 * S^2 * heads * head_dim / 2."""
    attention_backward_flops: float
    """Flash causal attention backward, FLOP/s counted as 2.5 x the forward FLOPs."""
    memory_bandwidth: float
    """Device copy bandwidth (bytes/s): memory-bound work such as the ring's LSE merge."""
    vision_frames_per_second: float
    """SigLIP-so400m at 384 px forward, bf16, batch 64 (frames/s)."""
    intra_node_bandwidth: float
    """Per-GPU bandwidth inside a node (NVLink, bytes/s): Ulysses all-to-all, intra-node ring hops."""
    inter_node_bandwidth: float
    """Per-GPU bandwidth between nodes (InfiniBand, bytes/s): ring hops that cross nodes."""
    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain."""
    link_latency_s: float = 20e-6
    """Fixed cost of one collective or ring step (launch + network latency)."""
    ring_p2p_efficiency: float = RING_P2P_EFFICIENCY
    """Fraction of `inter_node_bandwidth` that a ring's cross-node point-to-point hops reach while
    they overlap the attention kernels (collectives such as FSDP's reach the full link). Fitted to the
    paper's measured zigzag ring (see RING_P2P_EFFICIENCY); measure your own with
    benchmarks/ring_p2p.py and pass `plan --ring-p2p-efficiency`."""

    @property
    def ring_inter_node_bandwidth(self) -> float:
        """Effective bytes/s of one cross-node ring hop."""
        return self.inter_node_bandwidth * self.ring_p2p_efficiency

    def ring_overlap_slowdown(self, local_tokens: float) -> float:
        """Relative slowdown of the attention kernel while the ring's transfers run beside it.

        The paper measures +18.6% at 4K tokens per GPU and +4.2% at 32K (the communication kernels
        take SMs and memory bandwidth); linear in log2(tokens) between those points, held at 18.6%
        below 4K and falling to 0 at 64K (where the block kernel dwarfs the transfer).
        """
        if local_tokens <= 0:
            return 0.0
        octaves = math.log2(local_tokens / 4096.0)
        slope = (RING_OVERLAP_AT_32K - RING_OVERLAP_AT_4K) / 3.0
        return min(RING_OVERLAP_AT_4K, max(0.0, RING_OVERLAP_AT_4K + slope * octaves))

    def with_links(
        self,
        *,
        intra_node_gbps: float | None = None,
        inter_node_gbps: float | None = None,
        gpus_per_node: int | None = None,
        ring_p2p_efficiency: float | None = None,
    ) -> Hardware:
        """A copy with other link speeds (GB/s, 1e9 bytes/s) or node size."""
        changes: dict = {}
        if intra_node_gbps is not None:
            changes["intra_node_bandwidth"] = float(intra_node_gbps) * 1e9
        if inter_node_gbps is not None:
            changes["inter_node_bandwidth"] = float(inter_node_gbps) * 1e9
        if gpus_per_node is not None:
            changes["gpus_per_node"] = int(gpus_per_node)
        if ring_p2p_efficiency is not None:
            if not 0 < ring_p2p_efficiency <= 1:
                raise ValueError(f"ring_p2p_efficiency must be in (0, 1], got {ring_p2p_efficiency}")
            changes["ring_p2p_efficiency"] = float(ring_p2p_efficiency)
        for key, value in changes.items():
            if value <= 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        return replace(self, **changes)


H100 = Hardware(
    name="h100",
    # 80 GiB card; ~1.5 GiB go to the CUDA context, NCCL and cuBLAS workspaces.
    memory_bytes=int(78.5 * GIB),
    matmul_flops=785e12,  # docs/reference.md: "bf16 matmul 785 TFLOP/s"
    attention_forward_flops=481e12,  # docs/reference.md: "SDPA flash causal forward 481 TFLOP/s at 131K tokens"
    attention_backward_flops=429e12,  # docs/reference.md: "... and backward 429 TFLOP/s"
    memory_bandwidth=3.0e12,  # docs/reference.md: "device copy 3.0 TB/s"
    vision_frames_per_second=469.0,  # docs/reference.md: "SigLIP-so400m at 384 px, bf16, batch 64: 469 frames/s"
    intra_node_bandwidth=900e9,  # paper: NVLink 900 GB/s
    inter_node_bandwidth=50e9,  # paper: InfiniBand 50 GB/s
    gpus_per_node=8,
)

HARDWARE: dict[str, Hardware] = {"h100": H100}


def get_hardware(name: str) -> Hardware:
    try:
        return HARDWARE[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(HARDWARE)}") from None
