"""Activation memory: full or selective activation checkpointing for the LLM and the vision tower.

- "full": every decoder layer keeps only its input and recomputes everything in backward.
- "selective": every decoder layer recomputes the cheap element-wise parts (norms, activations, RoPE,
  residual adds) and the matmuls, but keeps the attention kernel's outputs: attention is the one op
  whose cost grows with the square of the sequence, so recomputing it is what makes full checkpointing
  slow at long context.
- "none": Hugging Face's default.
Checkpointing changes no number: gradients are the same (tested).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")


def _attention_ops() -> set:
    names = [
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_efficient_attention_forward",
        "_flash_attention_forward",
    ]
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


_SAVED = None


def keep_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save attention kernels' outputs; recompute everything else."""
    global _SAVED
    if _SAVED is None:
        _SAVED = _attention_ops()
    return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def set_activation_checkpointing(
    model, mode: str = "full", *, vision: bool = True, offload: bool = False
) -> None:
    """Turn activation checkpointing of `model.llm`'s decoder layers (and the vision tower) on or off.

    `offload` also moves each checkpointed layer's saved input to CPU memory (transformers >= 5.2x),
    which pays once the layer inputs themselves (layers x tokens x hidden) crowd the GPU.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {MODES}")
    llm = model.llm
    if mode == "none":
        name = (
            "is_activation_checkpointing"
            if hasattr(type(llm), "is_activation_checkpointing")
            else ("is_gradient_checkpointing")
        )
        if getattr(llm, name, False):
            (getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable)()
        model.vision_tower.gradient_checkpointing = False
        return
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, keep_attention_policy)
    # transformers >= 5.2x renamed gradient_* to activation_checkpointing_*; 5.17 has the old names.
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    else:
        if offload:
            raise ValueError(
                "activation offload needs transformers with activation_checkpointing_enable(offload=)"
            )
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.vision_tower.gradient_checkpointing = vision
