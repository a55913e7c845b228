"""Data order under dp x sp: every rank of an SP group reads the same batch, dp groups different ones."""

from __future__ import annotations

from torch.utils.data import DistributedSampler


def sp_aware_sampler(dataset, sp, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """A DistributedSampler over the dp dimension only: SP ranks share `dp_rank`, hence their samples."""
    return DistributedSampler(
        dataset, num_replicas=sp.dp_degree, rank=sp.dp_rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
