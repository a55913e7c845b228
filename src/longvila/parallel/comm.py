"""Collectives used by sequence parallelism, with byte accounting.

Every collective here reports the bytes this rank *receives from other ranks* (payload only, no
protocol overhead) to the active `CommCounter`s. All the patterns used here are symmetric, so this
equals the bytes it sends. Self-copies (the rank's own share in an all-to-all or all-gather) are
not counted.

Shapes: B batch, S this rank's share of the sequence, N heads, H head dim.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

_ACTIVE_COUNTERS: list[CommCounter] = []


class CommCounter:
    """Count bytes and calls per collective kind while active.

    ```python
    with CommCounter() as counter:
        out = sp_attention(q, k, v, sp)
    counter.bytes["all_to_all"], counter.bytes["ring_p2p"], counter.calls["all_to_all"]
    ```
    Kinds: "all_to_all", "ring_p2p", "all_gather", "reduce_scatter". Counters nest; each active
    counter sees every collective issued on this rank.
    """

    def __init__(self) -> None:
        self.bytes: defaultdict[str, int] = defaultdict(int)
        self.calls: defaultdict[str, int] = defaultdict(int)

    def record(self, kind: str, num_bytes: int) -> None:
        self.bytes[kind] += int(num_bytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __enter__(self) -> CommCounter:
        _ACTIVE_COUNTERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE_COUNTERS.remove(self)


def record_comm(kind: str, num_bytes: int) -> None:
    """Report `num_bytes` received by this rank in a collective of `kind` to the active counters."""
    for counter in _ACTIVE_COUNTERS:
        counter.record(kind, num_bytes)


def tensor_bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# ----------------------------------------------------------------------------------------------
# Differentiable all-to-all (Ulysses) and all-gather (sequence gather)
# ----------------------------------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split `x` along `scatter_dim` into `world` pieces, send piece j to rank j, concatenate the
    received pieces along `gather_dim` in rank order."""
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(
            f"dimension {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by {world}"
        )
    # Move the scattered pieces to a leading dim so that all_to_all_single can split dim 0.
    pieces = torch.stack(x.chunk(world, dim=scatter_dim), dim=0).contiguous()
    received = torch.empty_like(pieces)
    dist.all_to_all_single(received, pieces, group=group)
    record_comm("all_to_all", tensor_bytes(pieces) * (world - 1) // world)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims = (scatter_dim, gather_dim)
        ctx.group = group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Differentiable all-to-all; the backward is the inverse all-to-all. Identity for one rank."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def all_gather_pieces(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate the same-shaped `x` of every rank of `group` along `dim`, in rank order (no grad)."""
    world = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, moved, group=group)
    record_comm("all_gather", tensor_bytes(moved) * (world - 1))
    return out.movedim(0, dim)


def reduce_scatter_pieces(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum `x` over the ranks of `group` and keep this rank's `dim`-slice (no grad)."""
    world = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // world, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, moved, group=group)
    record_comm("reduce_scatter", tensor_bytes(out) * (world - 1))
    return out.movedim(0, dim)


# ----------------------------------------------------------------------------------------------
# Ring point-to-point
# ----------------------------------------------------------------------------------------------


class RingComm:
    """Send to the next rank of a ring and receive from the previous one, asynchronously.

    `exchange` posts a send/recv pair with `dist.batch_isend_irecv` and returns the receive buffer;
    `wait` completes every posted pair. Ranks post in the same order, so pairs match FIFO; a tag
    keeps different streams (K/V forward, dK/dV backward) apart on backends that honour tags.
    """

    def __init__(self, group) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next_global = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev_global = dist.get_global_rank(group, (self.rank - 1) % self.world)
        self._works: list = []

    def exchange(self, tensor: torch.Tensor, tag: int = 0) -> torch.Tensor:
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.next_global, self.group, tag),
            dist.P2POp(dist.irecv, received, self.prev_global, self.group, tag),
        ]
        self._works.extend(dist.batch_isend_irecv(ops))
        record_comm("ring_p2p", tensor_bytes(received))
        return received

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []
