"""Activation checkpointing: identical gradients; selective mode keeps attention, recomputes the rest."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longvila import LongVILA, LongVILAConfig
from longvila.model.memory import set_activation_checkpointing


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def batch(proc):
    video = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    return proc.collate(
        [
            proc(
                [{"role": "user", "content": "<video>\nWhat?"}, {"role": "assistant", "content": "red"}],
                videos=[video],
            )
        ]
    )


def run(model, data, mode, vision=False):
    set_activation_checkpointing(model, mode, vision=vision)
    model.train()
    model.zero_grad(set_to_none=True)
    counter = OpCounter()
    out = model(**data)
    with counter:
        out.loss.backward()
    return (
        out.loss.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        counter.counts,
    )


def test_checkpointing_modes_give_identical_gradients_and_selective_keeps_attention(tiny_processor):
    torch.manual_seed(0)
    model = LongVILA(LongVILAConfig.tiny()).double()
    data = batch(tiny_processor)
    data["pixel_values"] = data["pixel_values"].double()
    results = {mode: run(model, data, mode) for mode in ("none", "full", "selective")}
    loss, grads, _ = results["none"]
    for mode in ("full", "selective"):
        assert torch.equal(results[mode][0], loss)
        for name, grad in grads.items():
            torch.testing.assert_close(results[mode][1][name], grad, rtol=1e-12, atol=1e-14, msg=name)
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    none_counts, full_counts, sel_counts = (results[m][2] for m in ("none", "full", "selective"))
    layers = model.config.llm["num_hidden_layers"]
    # Backward under "full" re-runs each LLM layer's attention forward; "selective" does not.
    assert full_counts.get(attention, 0) >= none_counts.get(attention, 0) + layers
    assert sel_counts.get(attention, 0) == none_counts.get(attention, 0)
    # ... but it does recompute the matmuls.
    assert sel_counts.get("mm", 0) > none_counts.get("mm", 0)
    # The vision tower's layers are checkpointed too when asked, with the same gradients.
    vision_loss, vision_grads, vision_counts = run(model, data, "selective", vision=True)
    assert vision_counts.get(attention, 0) > sel_counts.get(attention, 0)
    for name, grad in grads.items():
        torch.testing.assert_close(vision_grads[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="'half'"):
        set_activation_checkpointing(LongVILA(LongVILAConfig.tiny()), "half")
