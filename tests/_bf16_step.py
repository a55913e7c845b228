"""One training step of the tiny LongVILA under bf16 autocast against the same step in float32.

Shared by tests/unit/test_bf16_training.py (one process) and tests/distributed/test_bf16_sp.py (SP world 2
on gloo, spawned ranks import this module). Results are plain floats.
"""

from __future__ import annotations

import numpy as np
import torch

LAYOUTS = {"ring2": (1, 2), "ulysses2": (2, 1)}


def _fresh_model():
    """The lively tiny model (weights wide enough that the loss depends on the input, not ~ln V)."""
    from _models import lively_tiny_model

    from longvila import LongVILAProcessor

    return lively_tiny_model(std=0.1).train(), LongVILAProcessor.tiny()


def packed_batch(proc, seed: int, multiple: int) -> dict:
    """A packed row of three samples (two videos, one text-only), padded to `multiple`."""
    rng = np.random.default_rng(seed)
    samples = []
    for i, count in enumerate((5, 3)):
        video = rng.integers(0, 255, (count, 32, 32, 3), dtype=np.uint8)
        user = {"role": "user", "content": f"<video>\nWhat happens in clip {i}?"}
        samples.append(proc([user, {"role": "assistant", "content": f"Answer {i} is red"}], videos=[video]))
    samples.append(
        proc([{"role": "user", "content": "Say a word."}, {"role": "assistant", "content": "blue"}])
    )
    return proc.collate(samples, pad_to_multiple_of=multiple)


def _step(model, batch, sp, bf16: bool):
    """Forward + backward; (loss, flat gradient of every parameter)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch, sp=sp)
    out.loss.backward()
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in model.parameters()
    ])  # fmt: skip
    return float(out.loss.detach()), flat


def compare(sp=None, multiple: int = 1) -> dict:
    """bf16-autocast step (under `sp` when given) vs the float32 step in one process.

    Under `sp` the gradients are summed over the SP group before the comparison (the convention that
    makes them the single-process gradient). Returns the loss's relative error, the gradients' relative
    L2 error and whether bf16 actually reached the attention kernels.
    """
    import longvila.kernels.attention as kernels

    model, proc = _fresh_model()
    batch = packed_batch(proc, seed=3, multiple=multiple)
    batch["pixel_values"] = batch["pixel_values"].float()
    ref_loss, ref_grad = _step(model, batch, None, bf16=False)
    dtypes = []
    original = kernels.block_attention_forward

    def spy(q, k, v, **kw):
        dtypes.append(str(q.dtype))
        return original(q, k, v, **kw)

    kernels.block_attention_forward = spy
    try:
        loss, grad = _step(model, batch, sp, bf16=True)
    finally:
        kernels.block_attention_forward = original
    if sp is not None and sp.sp_degree > 1:
        import torch.distributed as dist

        dist.all_reduce(grad, group=sp.sp_group)
    return {
        "loss": loss,
        "ref_loss": ref_loss,
        "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
        "grad_rel": float((grad - ref_grad).norm() / ref_grad.norm()),
        "kernel_dtypes": sorted(set(dtypes)),
        "finite": bool(torch.isfinite(grad).all()),
    }


def run_world2(rank: int, world_size: int) -> dict:
    from longvila.parallel import init_sp

    results = {}
    for name, (ulysses, ring) in LAYOUTS.items():
        sp = init_sp(ulysses=ulysses, ring=ring)
        results[name] = compare(sp, multiple=sp.sequence_multiple)
    return results
