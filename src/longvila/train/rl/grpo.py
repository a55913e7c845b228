"""GRPO (and its DAPO options): advantages, packing of rollouts, token log-probabilities and the loss.

For a question q with G sampled replies o_1..o_G and rewards r_1..r_G (docs/rl.md has the equations):

    A_i = (r_i - mean(r)) / (std(r) + eps)                      (group-normalised; std optional)
    rho_{i,t} = exp(log pi(o_it | q, o_i<t) - log pi_old(o_it | ...))
    l_{i,t} = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_{i,t}
    KL_{i,t} = exp(ref - logp) - (ref - logp) - 1              (the k3 estimator of KL(pi || pi_ref))

aggregated either per sequence then over sequences (`sequence_mean`, GRPO) or over all tokens of the
batch (`token_mean`, DAPO). Both are a weighted sum over tokens with weights fixed by the rollout
lengths, which is what makes the loss exact under sequence parallelism: each rank sums its own tokens'
terms and the ranks' sums add up to the single-process loss (the same convention as the SFT loss).

Rollouts are packed into one row per micro-batch: prompt + reply of every rollout, positions restarting
per rollout, `cu_seqlens` marking them; the frames' embeddings come from the embedding cache, so the
vision tower does not run here.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from longvila.model.attention import AttentionContext
from longvila.model.loss import IGNORE_INDEX

LOSS_AGGREGATIONS = ("sequence_mean", "token_mean")


@dataclass(frozen=True)
class GRPOSettings:
    """The loss's knobs (the recipe's `rl` section carries them)."""

    clip_low: float = 0.2
    """eps_low: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """eps_high: clipped above at 1 + clip_high (DAPO's clip-higher: larger than clip_low, e.g. 0.28)."""
    kl_coef: float = 0.0
    """beta: weight of the KL term to the frozen reference model (0: no reference model, DAPO)."""
    loss_agg: str = "sequence_mean"
    """`sequence_mean` (GRPO: mean over each reply's tokens, then over replies) or `token_mean` (DAPO:
    mean over every reply token of the batch, so long replies weigh in proportion to their length)."""
    advantage_std: bool = True
    """Divide advantages by the group's standard deviation (GRPO); false keeps only the mean removed."""
    eps: float = 1e-6
    """Added to the standard deviation (a group with equal rewards gets zero advantages)."""
    temperature: float = 1.0
    """Log-probabilities are those of the sampling distribution, softmax(logits / temperature)."""

    def check(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"rl.clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            raise ValueError(f"rl.clip_high must be >= 0, got {self.clip_high}")
        if self.kl_coef < 0:
            raise ValueError(f"rl.kl_coef must be >= 0, got {self.kl_coef}")
        if self.temperature <= 0:
            raise ValueError(f"rl.temperature must be > 0, got {self.temperature}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"rl.loss_agg: {self.loss_agg!r} is not one of {list(LOSS_AGGREGATIONS)}")


def group_advantages(rewards: torch.Tensor, settings: GRPOSettings) -> torch.Tensor:
    """(Q, G) rewards -> (Q, G) advantages, normalised within each question's group of G replies.

    The standard deviation is the unbiased one (G - 1 in the denominator); a group of one has zero
    advantage.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (questions, group), got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not settings.advantage_std or rewards.shape[1] < 2:
        return centred if rewards.shape[1] > 1 else torch.zeros_like(rewards)
    return centred / (rewards.std(dim=1, keepdim=True) + settings.eps)


def sequence_weights(lengths: list[int], agg: str) -> list[float]:
    """Per-token weight of each reply so that the loss is sum_i sum_t w_i l_it.

    `sequence_mean`: w_i = 1 / (N |o_i|); `token_mean`: w_i = 1 / sum_j |o_j|. `lengths` are the reply
    lengths of the whole rollout batch (every micro-batch of one update), so micro-batch losses add up.
    """
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg {agg!r} is not one of {list(LOSS_AGGREGATIONS)}")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"every reply needs at least one token, got lengths {lengths}")
    if agg == "sequence_mean":
        return [1.0 / (len(lengths) * n) for n in lengths]
    total = float(sum(lengths))
    return [1.0 / total for _ in lengths]


def grpo_token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    settings: GRPOSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise (n,) loss terms l_t, whether each was clipped, and the KL estimate (zeros without ref)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - settings.clip_low, 1.0 + settings.clip_high)
    terms = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).detach()
    if ref_logp is not None and settings.kl_coef > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
        terms = terms + settings.kl_coef * kl
    else:
        kl = torch.zeros_like(logp)
    return terms, was_clipped, kl.detach()


# ---- packing -------------------------------------------------------------------------------------
@dataclass
class PackedRollouts:
    """One micro-batch of rollouts packed into a row. T tokens, n rollouts, F frames in row order.

    input_ids, position_ids, targets (the next token where it is a reply token, else -100), advantages
    and weights (per predicting position), is_frame (the prompts' `<image>` positions; a sampled reply
    may hold the `<image>` id too, embedded as text as it was in generation): (1, T); cu_seqlens
    (n + 1,) int32; frame_embeds (F, P, D)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    is_frame: torch.Tensor
    frame_embeds: torch.Tensor
    num_rollouts: int

    @property
    def num_reply_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def pack_rollouts(
    prompts: list[torch.Tensor],
    replies: list[list[int]],
    frame_embeds: list[torch.Tensor],
    advantages: list[float],
    weights: list[float],
    *,
    image_token_id: int,
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
) -> PackedRollouts:
    """Pack rollouts (prompt ids (L_i,), reply ids, the prompt's frame embeddings (F_i, P, D), the
    rollout's advantage and per-token weight) into one row, padded to `pad_to_multiple_of`."""
    if not (len(prompts) == len(replies) == len(frame_embeds) == len(advantages) == len(weights)):
        raise ValueError(
            "pack_rollouts: prompts, replies, frame_embeds, advantages, weights differ in length"
        )
    ids, targets, adv, wts, frames, positions, bounds = [], [], [], [], [], [], [0]
    for prompt, reply, a, w in zip(prompts, replies, advantages, weights):
        if not reply:
            raise ValueError("pack_rollouts: an empty reply (every reply holds at least its end token)")
        reply_t = torch.as_tensor(reply, dtype=torch.long)
        seq = torch.cat([prompt.long(), reply_t])
        n, p = seq.shape[0], prompt.shape[0]
        target = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
        target[p - 1 : n - 1] = reply_t  # position t predicts token t + 1
        is_reply = target != IGNORE_INDEX
        ids.append(seq)
        frames.append(torch.cat([prompt == image_token_id, torch.zeros(len(reply), dtype=torch.bool)]))
        targets.append(target)
        adv.append(is_reply.double() * float(a))  # float64 throughout: exact advantages and weights
        wts.append(is_reply.double() * float(w))
        positions.append(torch.arange(n))
        bounds.append(bounds[-1] + n)
    pad = (-bounds[-1]) % pad_to_multiple_of
    if pad:
        ids.append(torch.full((pad,), pad_token_id, dtype=torch.long))
        targets.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
        adv.append(torch.zeros(pad, dtype=torch.float64))
        wts.append(torch.zeros(pad, dtype=torch.float64))
        frames.append(torch.zeros(pad, dtype=torch.bool))
        positions.append(torch.arange(pad))
        bounds.append(bounds[-1] + pad)
    return PackedRollouts(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(positions)[None],
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        targets=torch.cat(targets)[None],
        advantages=torch.cat(adv)[None],
        weights=torch.cat(wts)[None],
        is_frame=torch.cat(frames)[None],
        frame_embeds=torch.cat(frame_embeds) if frame_embeds else torch.zeros(0),
        num_rollouts=len(prompts),
    )


# ---- the model side ------------------------------------------------------------------------------
def embed_packed(model, packed: PackedRollouts) -> torch.Tensor:
    """Text embeddings with the cached frame embeddings spliced in at the `<image>` positions: (1, T, D)."""
    device = model.device
    ids = packed.input_ids.to(device)
    embeds = model.llm.get_input_embeddings()(ids)
    is_image = packed.is_frame.to(device)
    expected = int(is_image.sum())
    flat = packed.frame_embeds.reshape(-1, embeds.shape[-1]) if expected else None
    if expected == 0:
        return embeds
    if flat.shape[0] != expected:
        raise ValueError(
            f"the row holds {expected} <image> tokens but {flat.shape[0]} frame-embedding tokens"
        )
    return embeds.masked_scatter(is_image[..., None], flat.to(device=device, dtype=embeds.dtype))


RL_FORWARD = "rl_token_logprobs"
"""The method `register_rl_forward` gives an FSDP2-sharded model; `token_logprobs` goes through it."""


def token_logprobs(
    model, packed: PackedRollouts, sp=None, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) at this rank's reply positions: ((n,) log-probs, (n,) global positions), pi the
    softmax of logits / temperature (the distribution the rollouts were sampled from).

    One process: every reply position of the row. Under `sp` (degree > 1): the row is sharded in the
    zigzag layout as in training, and each rank returns the positions it holds (in its local order).
    A model sharded with FSDP2 runs it inside FSDP's forward hooks (`register_rl_forward`).
    """
    forward = getattr(model, RL_FORWARD, None)
    if forward is not None:
        return forward(packed, sp, temperature)
    return _token_logprobs(model, packed, sp, temperature)


def register_rl_forward(model) -> None:
    """Let `token_logprobs` run on `model` after `fully_shard` (FSDP2).

    The RL forward calls the embedding table, the decoder and the head directly (the frames come from
    the embedding cache, not the vision tower) instead of `model.forward`, so FSDP2 would neither
    all-gather the parameters its root unit holds (embeddings, final norm, the tied head) nor
    reduce-scatter their gradients. Registered as an FSDP forward method, the computation runs between
    the root's pre- and post-forward hooks, as `forward` does (the decoder layers have their own units).
    A model that is not an FSDP module is left as it is.
    """
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(model, FSDPModule):
        return
    setattr(model, RL_FORWARD, types.MethodType(_fsdp_token_logprobs, model))
    register_fsdp_forward_method(model, RL_FORWARD)


def _fsdp_token_logprobs(model, packed: PackedRollouts, sp=None, temperature: float = 1.0):
    # A copy, not a view: FSDP2 hooks the output for backward, and an in-place op on a view would
    # drop that hook (FSDP warns about views).
    logp, positions = _token_logprobs(model, packed, sp, temperature)
    return logp.clone(), positions


def _token_logprobs(
    model, packed: PackedRollouts, sp=None, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` on the model's own parameters (unsharded, or gathered by FSDP's hooks)."""
    embeds = embed_packed(model, packed)
    device = embeds.device
    total = embeds.shape[1]
    position_ids = packed.position_ids.to(device)
    cu = packed.cu_seqlens.to(device=device, dtype=torch.int32)
    if sp is not None and sp.sp_degree > 1:
        model.check_sp(sp)
        sp.check_sequence(total)
        index = sp.local_positions(total, device=device)
        ctx = AttentionContext(sp=sp, cu_seqlens=cu)
        hidden = model._decoder(sp.shard(embeds, dim=1), position_ids.index_select(1, index), ctx)
        hidden = hidden.last_hidden_state[0]
    else:
        index = torch.arange(total, device=device)
        hidden = _padded_decoder(model, embeds, position_ids, cu)
    targets = packed.targets[0].to(device).index_select(0, index)
    keep = targets != IGNORE_INDEX
    logits = model._head()(hidden[keep])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[keep][:, None])[:, 0]
    return logp, index[keep]


def _padded_decoder(
    model, embeds: torch.Tensor, position_ids: torch.Tensor, cu: torch.Tensor
) -> torch.Tensor:
    """One process: the packed row's sequences as a right-padded batch (plain causal attention, no
    (T, T) mask: a packed row of G rollouts would cost G^2 times the attention) -> (T, D) in row order.

    Right padding never changes a real token's output under causal attention (pads come after it)."""
    bounds = cu.tolist()
    spans = list(zip(bounds[:-1], bounds[1:]))
    longest = max(end - start for start, end in spans)
    batch = embeds.new_zeros(len(spans), longest, embeds.shape[-1])
    positions = torch.zeros(len(spans), longest, dtype=position_ids.dtype, device=embeds.device)
    for row, (start, end) in enumerate(spans):
        batch[row, : end - start] = embeds[0, start:end]
        positions[row, : end - start] = position_ids[0, start:end]
    hidden = model._decoder(batch, positions, AttentionContext()).last_hidden_state
    return torch.cat([hidden[row, : end - start] for row, (start, end) in enumerate(spans)])


@dataclass
class LossStats:
    """Sums over this micro-batch's reply tokens (all ranks of the SP group): for logging."""

    tokens: float = 0.0
    clipped: float = 0.0
    kl: float = 0.0


def grpo_loss(
    model,
    packed: PackedRollouts,
    settings: GRPOSettings,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    sp=None,
) -> tuple[torch.Tensor, LossStats]:
    """The GRPO loss of one micro-batch: sum over reply tokens of weight x l_t. Returns (loss, stats).

    `old_logp` / `ref_logp` are `token_logprobs` of the rollout policy / reference on the same row (in the
    same rank layout); without `old_logp` the current policy (detached) is the old one (ratio 1, one
    update per rollout batch). Under `sp` the value is the SP group's total on every rank and its gradient
    is this rank's part: the ranks' gradients sum to the single-process gradient.
    """
    logp, positions = token_logprobs(model, packed, sp, settings.temperature)
    old = logp.detach() if old_logp is None else old_logp.to(logp)
    ref = None if ref_logp is None else ref_logp.to(logp)
    adv = packed.advantages[0].to(device=logp.device, dtype=logp.dtype).index_select(0, positions)
    weight = packed.weights[0].to(device=logp.device, dtype=logp.dtype).index_select(0, positions)
    terms, clipped, kl = grpo_token_terms(logp, old, ref, adv, settings)
    local = (weight * terms).sum()
    counts = torch.stack(
        [torch.tensor(float(logp.numel())), clipped.sum().cpu().double(), kl.sum().cpu().double()]
    )
    if sp is not None and sp.sp_degree > 1:
        total = sp.all_reduce_sum(local.detach().reshape(1)).reshape(())
        local = local + (total - local).detach()
        counts = sp.all_reduce_sum(counts.to(logp.device)).cpu()
    return local, LossStats(float(counts[0]), float(counts[1]), float(counts[2]))


def sft_loss(model, packed: PackedRollouts, sp=None) -> torch.Tensor:
    """Mean negative log-likelihood of the reply tokens (the cold-start SFT on labelled replies), over
    the same packed rows and cached frame embeddings as GRPO; exact under `sp` like `grpo_loss`."""
    logp, positions = token_logprobs(model, packed, sp)
    weight = packed.weights[0].to(device=logp.device, dtype=logp.dtype).index_select(0, positions)
    local = -(weight * logp).sum()
    if sp is not None and sp.sp_degree > 1:
        total = sp.all_reduce_sum(local.detach().reshape(1)).reshape(())
        local = local + (total - local).detach()
    return local


class PolicyLoss(torch.nn.Module):
    """Stage 6's losses as a module whose forward runs the policy, so that a data-parallel wrapper sees them.

    DistributedDataParallel arms its bucketed gradient reduction in its own forward; the RL losses call
    the policy's embedding table, decoder and head rather than `model.forward`, so the trainer wraps
    this module (`longvila.train.distributed.wrap_data_parallel`) and takes the loss from `ddp(...)`.
    Under FSDP2 it runs unwrapped: the policy's RL forward is then an FSDP forward method
    (`register_rl_forward`) and FSDP reduces the gradients itself.
    """

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(
        self,
        packed: PackedRollouts,
        sp=None,
        settings: GRPOSettings | None = None,
        old_logp: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LossStats | None]:
        """`grpo_loss` of the micro-batch with `settings`; without them the cold start's `sft_loss`
        (stats None). The loss is a scalar tensor (the SP group's total, as those functions give)."""
        if settings is None:
            return sft_loss(self.policy, packed, sp), None
        return grpo_loss(self.policy, packed, settings, old_logp=old_logp, ref_logp=ref_logp, sp=sp)
