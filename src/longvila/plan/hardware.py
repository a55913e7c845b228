"""Measured throughput and links of the GPUs the planner knows, with where each number comes from.

Every rate below was measured on one H100 80GB SXM (torch 2.11, bf16) and is recorded in
/work/shared/REFERENCE.md ("Measured here"); the link speeds are the paper's cluster (LongVILA,
arXiv 2408.10188: 8 x H100 per node, NVLink 900 GB/s, InfiniBand 50 GB/s). The planner never assumes
peak (989 TFLOP/s dense bf16): it uses what a kernel actually reached.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 1024**3


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

    def with_links(
        self,
        *,
        intra_node_gbps: float | None = None,
        inter_node_gbps: float | None = None,
        gpus_per_node: int | None = None,
    ) -> Hardware:
        """A copy with other link speeds (GB/s, 1e9 bytes/s) or node size."""
        changes: dict = {}
        if intra_node_gbps is not None:
            changes["intra_node_bandwidth"] = float(intra_node_gbps) * 1e9
        if inter_node_gbps is not None:
            changes["inter_node_bandwidth"] = float(inter_node_gbps) * 1e9
        if gpus_per_node is not None:
            changes["gpus_per_node"] = int(gpus_per_node)
        for key, value in changes.items():
            if value <= 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        return replace(self, **changes)


H100 = Hardware(
    name="h100",
    # 80 GiB card; ~1.5 GiB go to the CUDA context, NCCL and cuBLAS workspaces.
    memory_bytes=int(78.5 * GIB),
    matmul_flops=785e12,  # REFERENCE.md: "bf16 matmul 785 TFLOP/s"
    attention_forward_flops=481e12,  # REFERENCE.md: "SDPA flash causal forward 481 TFLOP/s at 131K tokens"
    attention_backward_flops=429e12,  # REFERENCE.md: "... and backward 429 TFLOP/s"
    memory_bandwidth=3.0e12,  # REFERENCE.md: "device copy 3.0 TB/s"
    vision_frames_per_second=469.0,  # REFERENCE.md: "SigLIP-so400m at 384 px, bf16, batch 64: 469 frames/s"
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
