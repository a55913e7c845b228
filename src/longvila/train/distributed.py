"""Data parallelism for the trainers: DDP with a dp-aware gradient reduction (process-group setup lives
in `longvila.parallel.launch`)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def wrap_data_parallel(model: torch.nn.Module, dp_degree: int):
    """`model` under torch's DistributedDataParallel over the whole world, its bucketed all-reduce (overlapped
    with the backward) summing the gradients of all ranks and dividing by the data-parallel degree.

    Under MM-SP the gradients of the ranks of one SP group add up to the group's gradient
    (docs/architecture.md), so the world sum over dp x sp ranks divided by dp is the mean over data-parallel
    replicas; DDP's own hook would divide by the world size. Only the wrapper's forward arms the reduction:
    the loss must come from `ddp(...)`, and every rank must run the same number of backward passes.
    Unused-parameter detection is on: the vision tower's layers after `vision_select_layer` (and a text-only
    batch's whole tower without SP) take no part in the loss, yet train in some stages.
    """
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        forward_sync_buffers=False,  # the buffers (RoPE tables) are equal on every rank and never trained
        find_unused_parameters=True,
    )
    ddp.register_comm_hook(dp_degree, _sum_then_divide_by_dp)
    return ddp


def _sum_then_divide_by_dp(dp_degree: int, bucket):  # DDP rejects a string return annotation
    """DDP comm hook: one SUM all-reduce of the bucket over the world, pre-divided by the dp degree."""
    tensor = bucket.buffer()
    if dp_degree > 1:
        tensor.div_(dp_degree)
    future = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def average_gradients(params: list[torch.nn.Parameter], dp_degree: int) -> None:
    """Sum gradients over all ranks and divide by the data-parallel degree, one all-reduce per parameter.

    The fallback for trainers whose loss does not come from the model's forward (stage 6 computes it from
    the decoder directly), so that `wrap_data_parallel`'s DDP cannot see it; the SFT stages use DDP.
    Under MM-SP the gradients of the ranks of one SP group add up to the group's gradient (docs/architecture.md),
    so the world sum over dp x sp ranks divided by dp is the mean over data-parallel replicas.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        if dp_degree > 1:
            param.grad.div_(dp_degree)
