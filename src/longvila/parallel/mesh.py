"""The sequence-parallel layout: a (dp, ring, ulysses) device mesh and the 2D zigzag sharding.

Ranks: global = dp_rank * (R * U) + ring_rank * U + ulysses_rank, so Ulysses groups are contiguous
ranks (one node, NVLink) and ring groups are strided (across nodes). sp_rank = ring_rank * U +
ulysses_rank. See docs/parallelism.md for a drawing of the layout.

Shapes: T full sequence, S = T / (R * U) this rank's share.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longvila.parallel import mmsp
from longvila.parallel.comm import all_gather_pieces, reduce_scatter_pieces
from longvila.parallel.zigzag import (  # noqa: F401  (re-exported: the layout's public names)
    check_sequence_length,
    ring_pair_indices,
    zigzag_indices,
)


class SequenceParallel:
    """Where this rank sits in the (dp, ring, ulysses) layout, with its process groups.

    Build it with `init_sp(ulysses, ring)` after `torch.distributed` is initialised, or
    `SequenceParallel.single()` for the one-process path (all degrees 1, groups None).
    """

    def __init__(
        self,
        *,
        ulysses_degree: int = 1,
        ring_degree: int = 1,
        dp_degree: int = 1,
        ulysses_rank: int = 0,
        ring_rank: int = 0,
        dp_rank: int = 0,
        mesh=None,
        ulysses_group=None,
        ring_group=None,
        sp_group=None,
        dp_group=None,
    ) -> None:
        self.ulysses_degree = ulysses_degree
        self.ring_degree = ring_degree
        self.dp_degree = dp_degree
        self.ulysses_rank = ulysses_rank
        self.ring_rank = ring_rank
        self.dp_rank = dp_rank
        self.mesh = mesh
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.sp_group = sp_group
        self.dp_group = dp_group

    @classmethod
    def single(cls) -> SequenceParallel:
        """Degree-1 layout: no communication; shard and gather are identities."""
        return cls()

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses_degree + self.ulysses_rank

    def __repr__(self) -> str:
        return (
            f"SequenceParallel(dp={self.dp_degree}, ring={self.ring_degree}, ulysses={self.ulysses_degree}; "
            f"dp_rank={self.dp_rank}, ring_rank={self.ring_rank}, ulysses_rank={self.ulysses_rank})"
        )

    # -- what the model calls: the MM-SP functions of `mmsp.py` on this layout -----------------------
    @property
    def sequence_multiple(self) -> int:
        return mmsp.sequence_multiple(self)

    def check_model(self, num_q_heads: int, num_kv_heads: int) -> None:
        mmsp.check_model(self, num_q_heads, num_kv_heads)

    def check_sequence(self, total_len: int) -> None:
        mmsp.check_sequence(self, total_len)

    def split_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return mmsp.split_frames(self, pixel_values)

    def gather_frames(self, local_FPD: torch.Tensor, total: int) -> torch.Tensor:
        return mmsp.gather_frames(self, local_FPD, total)

    def attention(self, q, k, v, causal=True, cu_seqlens=None, scale=None) -> torch.Tensor:
        return mmsp.attention(self, q, k, v, causal=causal, cu_seqlens=cu_seqlens, scale=scale)

    def decode_attention(self, q_BNqH, k_BNkSH, v_BNkSH, key_valid_BS, scale=None) -> torch.Tensor:
        return mmsp.decode_attention(self, q_BNqH, k_BNkSH, v_BNkSH, key_valid_BS, scale=scale)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return mmsp.all_reduce_sum(self, x)

    def reduce_loss(self, local_sum: torch.Tensor, local_count: int) -> tuple[torch.Tensor, int]:
        return mmsp.reduce_loss(self, local_sum, local_count)

    # -- layout ------------------------------------------------------------------------------

    def local_positions(self, total_len: int, device=None) -> torch.Tensor:
        """Global indices of the tokens this rank holds, in local order. Shape (S,), int64.

        Use it to take position ids and labels in the same layout as `shard`.
        """
        idx = zigzag_indices(
            total_len, self.ring_degree, self.ulysses_degree, self.ring_rank, self.ulysses_rank
        )
        return idx.to(device) if device is not None else idx

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's zigzag share of the full sequence `x` along `dim` (differentiable).

        `x` is the same on every SP rank; the backward scatters the local gradient into a zero
        full-size tensor (no communication), so summing over the SP group gives the full gradient.
        """
        if self.sp_degree == 1:
            return x
        idx = self.local_positions(x.shape[dim], device=x.device)
        return x.index_select(dim, idx)

    def gather(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full sequence from every rank's share `x_local` along `dim`; inverse of `shard`.

        Differentiable: every rank returns the same full tensor, and under the convention that the
        ranks' losses add up to the total loss, the gradient of this rank's share is the sum over the
        SP group of the incoming full gradients, restricted to its share (a reduce-scatter).
        """
        if self.sp_degree == 1:
            return x_local
        return _GatherSequence.apply(x_local, dim, self)

    def rank_order_indices(self, total_len: int, device=None) -> torch.Tensor:
        """Global indices of the SP ranks' shares concatenated in sp-rank order. Shape (T,)."""
        order = torch.cat(
            [
                zigzag_indices(total_len, self.ring_degree, self.ulysses_degree, r, u)
                for r in range(self.ring_degree)
                for u in range(self.ulysses_degree)
            ]
        )
        return order.to(device) if device is not None else order


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, dim, sp):
        ctx.dim, ctx.sp = dim, sp
        stacked = all_gather_pieces(x_local, dim, sp.sp_group)
        total_len = stacked.shape[dim]
        ctx.total_len = total_len
        # stacked[i] holds global token order[i]; argsort(order) puts it back into global order.
        order = sp.rank_order_indices(total_len, x_local.device)
        return stacked.index_select(dim, torch.argsort(order))

    @staticmethod
    def backward(ctx, grad_full):
        sp, dim = ctx.sp, ctx.dim
        # Put the gradient into rank order (share of sp rank 0, then 1, ...) and reduce-scatter it.
        order = sp.rank_order_indices(ctx.total_len, grad_full.device)
        return reduce_scatter_pieces(grad_full.index_select(dim, order), dim, sp.sp_group), None, None


def init_sp(ulysses: int = 1, ring: int = 1) -> SequenceParallel:
    """Build the (dp, ring, ulysses) mesh over the whole world; dp = world / (ring * ulysses).

    Without an initialised process group only `init_sp(1, 1)` is allowed and gives
    `SequenceParallel.single()`.
    """
    if ulysses < 1 or ring < 1:
        raise ValueError(f"degrees must be >= 1, got ulysses={ulysses}, ring={ring}")
    if not (dist.is_available() and dist.is_initialized()):
        if ulysses * ring != 1:
            raise ValueError(
                f"ulysses={ulysses} x ring={ring} needs torch.distributed to be initialised (torchrun)"
            )
        return SequenceParallel.single()
    world = dist.get_world_size()
    if world % (ulysses * ring):
        raise ValueError(
            f"ulysses={ulysses} x ring={ring} = {ulysses * ring} does not divide the world size {world}"
        )
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // (ulysses * ring)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dp, ring, ulysses), mesh_dim_names=("dp", "ring", "ulysses"))
    dp_rank, ring_rank, ulysses_rank = mesh.get_coordinate()
    # The SP group (ring x ulysses) of each dp slice; every rank must create every group.
    sp_ranks = torch.arange(world).reshape(dp, ring * ulysses).tolist()
    sp_group, _ = dist.new_subgroups_by_enumeration(sp_ranks)
    return SequenceParallel(
        ulysses_degree=ulysses,
        ring_degree=ring,
        dp_degree=dp,
        ulysses_rank=ulysses_rank,
        ring_rank=ring_rank,
        dp_rank=dp_rank,
        mesh=mesh,
        ulysses_group=mesh.get_group("ulysses"),
        ring_group=mesh.get_group("ring"),
        sp_group=sp_group,
        dp_group=mesh.get_group("dp"),
    )
