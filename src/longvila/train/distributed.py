"""Data parallelism for the trainers: torch DDP with a dp-aware gradient reduction (process-group setup
lives in `longvila.parallel.launch`). The SFT stages wrap the model, stage 6 its loss module
(`longvila.train.rl.grpo.PolicyLoss`); under FSDP2 neither is wrapped (FSDP reduces the gradients)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def wrap_data_parallel(model: torch.nn.Module, dp_degree: int, *, find_unused_parameters: bool = True):
    """`model` under torch's DistributedDataParallel over the whole world, its bucketed all-reduce (overlapped
    with the backward) summing the gradients of all ranks and dividing by the data-parallel degree.

    Under MM-SP the gradients of the ranks of one SP group add up to the group's gradient
    (docs/architecture.md), so the world sum over dp x sp ranks divided by dp is the mean over data-parallel
    replicas; DDP's own hook would divide by the world size. Only the wrapper's forward arms the reduction:
    the loss must come from `ddp(...)` (hence stage 6's loss module), and every rank must run the same
    number of backward passes.
    Unused-parameter detection is on by default: the vision tower's layers after `vision_select_layer` (and
    a text-only batch's whole tower without SP) take no part in the loss, yet train in some stages. A loss
    that uses every trainable parameter in every backward (stage 6's) turns it off and saves DDP a walk
    of the autograd graph per backward.
    """
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        forward_sync_buffers=False,  # the buffers (RoPE tables) are equal on every rank and never trained
        find_unused_parameters=find_unused_parameters,
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
