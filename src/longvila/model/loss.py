"""Memory-lean cross entropy: the LM head and the loss fused, chunk by chunk over tokens.

Materialising logits over a 151,936-token vocabulary is what runs long-context training out of memory
(docs/reference.md: 0.5B at 32K tokens). Here each chunk of N_c tokens makes its (N_c, V) logits in float32,
takes the loss and, right away, the gradients with respect to the hidden states and the head weight;
the logits are freed before the next chunk. Backward only scales the stored gradients.

Shapes: N tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _chunked_loss_and_grads(hidden_ND, weight_VD, bias_V, targets_N, chunk_size, compute, needs):
    """Loss sum and (grad_hidden, grad_weight, grad_bias), chunk by chunk; matmuls in `compute`."""
    needs_hidden, needs_weight, needs_bias = needs
    # Accumulate in float32, or float64 when the inputs are float64 (exactness tests).
    acc = torch.promote_types(torch.promote_types(hidden_ND.dtype, compute), torch.float32)
    weight_c = weight_VD.to(compute)  # one cast for all chunks (a no-op without autocast)
    total = hidden_ND.new_zeros((), dtype=acc)
    grad_hidden = torch.zeros_like(hidden_ND) if needs_hidden else None
    grad_weight = torch.zeros_like(weight_VD, dtype=acc) if needs_weight else None
    grad_bias = torch.zeros_like(bias_V, dtype=acc) if needs_bias else None
    for start in range(0, hidden_ND.shape[0], chunk_size):
        t = targets_N[start : start + chunk_size]
        valid = t != IGNORE_INDEX
        if not bool(valid.any()):
            continue
        # Only supervised rows make logits: prompts and video tokens (most of a long sample) cost nothing.
        h = hidden_ND[start : start + chunk_size][valid].to(compute)
        t = t[valid]
        logits = (h @ weight_c.T).to(acc)
        if bias_V is not None:
            logits += bias_V.to(acc)
        # In place over the one (rows, V) buffer: logits -> exp(logits - max) -> softmax.
        target_logit = logits.gather(1, t[:, None]).squeeze(1)
        row_max = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(row_max).exp_()
        sum_exp = exp.sum(dim=-1, keepdim=True)
        total += ((row_max + sum_exp.log()).squeeze(1) - target_logit).sum()
        if needs_hidden or needs_weight or needs_bias:
            # d(loss)/d(logits) = softmax - onehot.
            grad_logits = exp.div_(sum_exp)
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits_c = grad_logits.to(compute)
            if needs_hidden:
                rows = torch.nonzero(valid).squeeze(1) + start
                grad_hidden.index_copy_(0, rows, (grad_logits_c @ weight_c).to(grad_hidden.dtype))
            if needs_weight:
                if compute == acc:
                    grad_weight.addmm_(grad_logits_c.T, h)
                else:  # a bf16 product (no float32 copy of it), summed over chunks in float32
                    grad_weight.add_(grad_logits_c.T @ h)
            if needs_bias:
                grad_bias += grad_logits.sum(0)
        del exp, logits
    return (grad_hidden, grad_weight, grad_bias), total


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, targets_N, chunk_size):
        # Under autocast the matmuls run in the autocast dtype (bf16) and everything is accumulated in
        # float32; without it they run in the inputs' dtype (float64 tests stay exact). Autocast is
        # switched off inside so that the in-place accumulations see the dtypes chosen here.
        device_type = hidden_ND.device.type
        compute = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else torch.promote_types(hidden_ND.dtype, weight_VD.dtype)
        )
        with torch.autocast(device_type, enabled=False):
            grads, total = _chunked_loss_and_grads(
                hidden_ND, weight_VD, bias_V, targets_N, chunk_size, compute, ctx.needs_input_grad[:3]
            )
        ctx.save_for_backward(*grads)
        ctx.weight_dtype = weight_VD.dtype
        ctx.bias_dtype = bias_V.dtype if bias_V is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def chunked_cross_entropy_sum(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Sum over supervised tokens (targets != -100) of -log softmax(hidden @ weight.T + bias)[target].

    Returns a float32 scalar (float64 for float64 inputs). Gradients are exact; the peak extra memory is one (chunk_size, V) float32
    block plus a float32 copy of the weight's gradient.
    """
    if hidden_ND.ndim != 2 or targets_N.ndim != 1 or hidden_ND.shape[0] != targets_N.shape[0]:
        raise ValueError(
            f"expected hidden (N, D) and targets (N,), got {tuple(hidden_ND.shape)} and {tuple(targets_N.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLinearCrossEntropy.apply(hidden_ND, weight_VD, bias_V, targets_N, chunk_size)


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t + 1]; the last position none.

    Shifting the full (global) sequence before any sharding keeps the target of a shard's last token,
    which lives on the next rank.
    """
    shifted = labels_BT.new_full(labels_BT.shape, IGNORE_INDEX)
    shifted[:, :-1] = labels_BT[:, 1:]
    return shifted
