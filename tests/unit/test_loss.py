"""The chunked (fused LM head + cross entropy) loss: exact against the textbook loss, and lean."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longvila.model.loss import chunked_cross_entropy_sum, shift_labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
def test_value_and_gradients_equal_the_naive_loss_in_float64(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(30, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(30, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    t = torch.randint(0, 30, (50,), generator=g)
    t[::3] = -100
    t[10:20] = -100  # a whole chunk without targets
    ours = chunked_cross_entropy_sum(h, w, t, b, chunk_size=chunk)
    grads = torch.autograd.grad(ours * 0.5, [x for x in (h, w, b) if x is not None])
    logits = h @ w.T + (b if b is not None else 0)
    ref = torch.nn.functional.cross_entropy(logits, t, reduction="sum", ignore_index=-100)
    ref_grads = torch.autograd.grad(ref * 0.5, [x for x in (h, w, b) if x is not None])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_no_supervised_token_gives_zero_loss_and_zero_gradient():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = chunked_cross_entropy_sum(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_shift_labels_keeps_the_target_of_every_position_but_the_last():
    labels = torch.tensor([[-100, 5, 6, -100, 7]])
    assert shift_labels(labels).tolist() == [[5, 6, -100, 7, -100]]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long))


def test_peak_memory_at_8k_tokens_and_qwen2_vocabulary_is_5x_below_naive():
    """8,192 tokens x 151,936 vocabulary in float32: naive materialises ~5 GB logits (and their grads)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "loss_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--tokens", "8192", "--vocab", "151936", "--dtype", "float32"],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    result = json.loads(out.stdout)
    assert result["naive"]["loss"] == pytest.approx(result["chunked"]["loss"], rel=1e-5)
    assert result["memory_ratio"] >= 5, result


def test_under_bf16_autocast_the_loss_runs_and_tracks_float32():
    """Autocast used to crash here (index_copy_ of a bf16 product into a float32 gradient)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(30, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (40,), generator=g)
    t[::4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy_sum(h, w, t, chunk_size=7)
    assert ours.dtype == torch.float32
    grads = torch.autograd.grad(ours, [h, w])
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum", ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [h, w])
    assert abs(ours.item() - ref.item()) <= 2e-2 * abs(ref.item())  # bf16 logits: 8 significant bits
    for a, r in zip(grads, ref_grads):
        assert a.dtype == r.dtype == torch.float32
        assert (a - r).norm() <= 3e-2 * r.norm()
