"""FSDP2 over dp x sp, with the gradient scaling MM-SP needs.

Every rank of an SP group computes the loss of its token shard over the group's supervised-token count,
so the group's gradient is the *sum* of its ranks' gradients; data-parallel groups see different batches,
so the global-mean gradient is the token-weighted sum over groups. `fully_shard_model` therefore makes the
reduce-scatter sum (divide factor 1) over the whole world, and `global_loss_weight` gives each group's
weight n_group / n_total for the backward pass: sum over all ranks of grad(weight x loss) is exactly the
gradient of the mean loss over every supervised token of the global batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def fully_shard_model(
    model: nn.Module, layers: Iterable[nn.Module], *, mp_policy=None, reshard_after_forward=True
):
    """Shard each of `layers` and then the root over all ranks (a 1-D mesh of dp x sp)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size()
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("fsdp",))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    kwargs["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM reduce-scatter: a divide factor otherwise becomes PREMUL_SUM, which gloo lacks.
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    return model


def global_loss_weight(num_supervised: int, sp, device=None) -> float:
    """n_group / n_total: the weight of this SP group's mean loss in the global token mean."""
    if sp.dp_degree == 1:
        return 1.0
    count = torch.tensor([float(num_supervised)], device=device)
    dist.all_reduce(count, group=sp.dp_group)
    return num_supervised / max(float(count.item()), 1.0)
