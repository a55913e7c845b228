"""GRPO loss, advantages and gradients against a hand-written float64 reference (one rollout at a time
through the HF LLM, the formulas written out per token)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from longvila import LongVILA, LongVILAConfig
from longvila.train.rl.grpo import (
    GRPOSettings,
    group_advantages,
    grpo_loss,
    pack_rollouts,
    sequence_weights,
    sft_loss,
    token_logprobs,
)

IMAGE = LongVILAConfig.tiny().image_token_id


def _model(seed=0):
    torch.manual_seed(seed)
    model = LongVILA(LongVILAConfig.tiny()).double()
    with torch.no_grad():  # wider weights: log-probs far from uniform, ratios far from 1
        for p in model.llm.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)
    return model


def _toy(model, frames=(2, 1), group=3, seed=1):
    """Prompts with frames (text ids around `<image>` runs), random frame embeddings, replies of
    different lengths (one holding the `<image>` id, as a sampled reply may)."""
    g = torch.Generator().manual_seed(seed)
    per = model.config.tokens_per_frame
    width = model.config.llm_hidden_size
    prompts, embeds = [], []
    for count in frames:
        ids = [5, 17] + ([IMAGE] * per + [202]) * count + [40, 41, 42]
        prompts.append(torch.tensor(ids))
        embeds.append(torch.randn(count, per, width, generator=g, dtype=torch.float64))
    replies = []
    for q in range(len(frames)):
        for i in range(group):
            n = 2 + (3 * q + 2 * i) % 5
            reply = torch.randint(10, 900, (n,), generator=g).tolist()
            if q == 0 and i == 1:
                reply[0] = IMAGE
            replies.append(reply)
    rewards = torch.tensor([[1.0, 0.0, 0.1], [0.0, 0.0, 1.0]], dtype=torch.float64)[:, :group]
    return prompts, embeds, replies, rewards


def _reference_logprobs(model, prompt, frame_embeds, reply):
    """(n,) log pi(reply_t | prompt, reply_<t) through the HF LLM on one sequence, spliced by hand."""
    ids = torch.cat([prompt, torch.tensor(reply)])
    text = model.llm.get_input_embeddings()(ids)
    rows = []
    k = 0
    flat = frame_embeds.reshape(-1, frame_embeds.shape[-1])
    for pos in range(ids.shape[0]):
        if pos < prompt.shape[0] and int(ids[pos]) == IMAGE:
            rows.append(flat[k])
            k += 1
        else:
            rows.append(text[pos])
    logits = model.llm(inputs_embeds=torch.stack(rows)[None], use_cache=False).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    p = prompt.shape[0]
    return torch.stack([logp[p - 1 + t, reply[t]] for t in range(len(reply))])


def _reference_loss(model, prompts, embeds, replies, rewards, old, ref, s: GRPOSettings):
    group = rewards.shape[1]
    adv = []
    for row in rewards.tolist():
        mean = sum(row) / len(row)
        std = statistics.stdev(row)
        adv += [(r - mean) / (std + s.eps) if s.advantage_std else r - mean for r in row]
    per_seq = []
    for i, reply in enumerate(replies):
        logp = _reference_logprobs(model, prompts[i // group], embeds[i // group], reply)
        terms = []
        for t in range(len(reply)):
            ratio = torch.exp(logp[t] - old[i][t])
            clipped = min(max(float(ratio.detach()), 1 - s.clip_low), 1 + s.clip_high)
            a = adv[i]
            # clip(ratio) as a function: its gradient is the ratio's inside the range, zero outside
            inside = 1 - s.clip_low < float(ratio.detach()) < 1 + s.clip_high
            ratio_c = ratio if inside else torch.tensor(clipped, dtype=torch.float64)
            term = torch.maximum(-a * ratio, -a * ratio_c)
            if s.kl_coef > 0:
                d = ref[i][t] - logp[t]
                term = term + s.kl_coef * (torch.exp(d) - d - 1)
            terms.append(term)
        per_seq.append(torch.stack(terms))
    if s.loss_agg == "sequence_mean":
        return sum(t.mean() for t in per_seq) / len(per_seq)
    return torch.cat(per_seq).sum() / sum(len(r) for r in replies)


def test_group_advantages_are_group_normalised():
    rewards = torch.tensor(
        [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.2, 0.9, 0.1]], dtype=torch.float64
    )
    got = group_advantages(rewards, GRPOSettings())
    for row, out in zip(rewards.tolist(), got.tolist()):
        mean, std = statistics.mean(row), statistics.stdev(row)
        assert out == pytest.approx([(r - mean) / (std + 1e-6) for r in row], abs=1e-12)
    assert got[1].abs().max() == 0  # equal rewards: no signal
    centred = group_advantages(rewards, GRPOSettings(advantage_std=False))
    assert centred[2].tolist() == pytest.approx([r - 0.3 for r in rewards[2].tolist()], abs=1e-12)


def test_sequence_weights():
    assert sequence_weights([2, 4], "sequence_mean") == [1 / 4, 1 / 8]
    assert sequence_weights([2, 4], "token_mean") == [1 / 6, 1 / 6]
    with pytest.raises(ValueError, match="at least one token"):
        sequence_weights([0, 3], "token_mean")


@pytest.mark.parametrize(
    "settings",
    [
        GRPOSettings(kl_coef=0.05),  # GRPO: KL to the reference, sequence mean, symmetric clip
        GRPOSettings(clip_low=0.2, clip_high=0.28, kl_coef=0.0, loss_agg="token_mean"),  # DAPO
        GRPOSettings(clip_low=0.1, clip_high=0.1, kl_coef=0.1, advantage_std=False, loss_agg="token_mean"),
    ],
    ids=["grpo", "dapo", "centred"],
)
def test_grpo_loss_and_gradients_match_the_hand_written_reference(settings):
    model = _model()
    prompts, embeds, replies, rewards = _toy(model)
    group = rewards.shape[1]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # old and reference log-probs near the current ones: some ratios clip, some not
        current = [
            _reference_logprobs(model, prompts[i // group], embeds[i // group], r)
            for i, r in enumerate(replies)
        ]
    old = [c + 0.3 * torch.randn(c.shape, generator=g, dtype=torch.float64) for c in current]
    ref = [c + 0.5 * torch.randn(c.shape, generator=g, dtype=torch.float64) for c in current]

    expected = _reference_loss(model, prompts, embeds, replies, rewards, old, ref, settings)
    params = [p for p in model.llm.parameters()]
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)

    adv = group_advantages(rewards, settings).reshape(-1).tolist()
    weights = sequence_weights([len(r) for r in replies], settings.loss_agg)
    flat_prompts = [prompts[i // group] for i in range(len(replies))]
    flat_embeds = [embeds[i // group] for i in range(len(replies))]
    packed = pack_rollouts(flat_prompts, replies, flat_embeds, adv, weights, image_token_id=IMAGE, pad_token_id=0,
                           pad_to_multiple_of=8)  # fmt: skip
    loss, stats = grpo_loss(model, packed, settings, old_logp=torch.cat(old), ref_logp=torch.cat(ref))
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    loss_value, expected_value = float(loss.detach()), float(expected.detach())
    assert abs(loss_value - expected_value) <= 1e-12 * max(1.0, abs(expected_value))
    assert stats.tokens == sum(len(r) for r in replies)
    assert 0 < stats.clipped < stats.tokens  # the case exercises both sides of the clip
    worst = 0.0
    for got, want in zip(grads, expected_grads):
        want = torch.zeros_like(got) if want is None else want
        worst = max(worst, float((got - want).abs().max()))
    scale = max(float(w.abs().max()) for w in expected_grads if w is not None)
    assert scale > 1e-6 and worst <= 1e-10 * scale


def test_micro_batches_add_up_to_the_whole_batch():
    model = _model()
    prompts, embeds, replies, rewards = _toy(model)
    s = GRPOSettings(loss_agg="sequence_mean", kl_coef=0.0)
    adv = group_advantages(rewards, s).reshape(-1).tolist()
    weights = sequence_weights([len(r) for r in replies], s.loss_agg)
    idx = list(range(len(replies)))

    def packed(sel):
        return pack_rollouts([prompts[i // 3] for i in sel], [replies[i] for i in sel], [embeds[i // 3] for i in sel],
                             [adv[i] for i in sel], [weights[i] for i in sel], image_token_id=IMAGE, pad_token_id=0)  # fmt: skip

    whole = grpo_loss(model, packed(idx), s)[0].detach()
    parts = (grpo_loss(model, packed(idx[:2]), s)[0] + grpo_loss(model, packed(idx[2:]), s)[0]).detach()
    assert abs(float(whole) - float(parts)) <= 1e-13
    # ratio 1 (no old log-probs): the value is -sum w A, the gradient the policy gradient
    expected = -sum(w * a * len(r) for w, a, r in zip(weights, adv, replies))
    assert float(whole) == pytest.approx(expected, abs=1e-12)


def test_token_logprobs_and_sft_loss_match_the_reference():
    model = _model()
    prompts, embeds, replies, _ = _toy(model)
    flat_prompts = [prompts[i // 3] for i in range(len(replies))]
    flat_embeds = [embeds[i // 3] for i in range(len(replies))]
    weights = sequence_weights([len(r) for r in replies], "token_mean")
    packed = pack_rollouts(flat_prompts, replies, flat_embeds, [0.0] * len(replies), weights, image_token_id=IMAGE,
                           pad_token_id=0, pad_to_multiple_of=16)  # fmt: skip
    with torch.no_grad():
        logp, positions = token_logprobs(model, packed)
        want = torch.cat(
            [_reference_logprobs(model, flat_prompts[i], flat_embeds[i], r) for i, r in enumerate(replies)]
        )
        assert torch.allclose(logp, want, atol=1e-12, rtol=0)
        assert positions.tolist() == sorted(positions.tolist())
        nll = sft_loss(model, packed)
    assert float(nll) == pytest.approx(-float(want.mean()), abs=1e-12)
    assert math.isfinite(float(nll))


def test_pack_rollouts_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        pack_rollouts(
            [torch.tensor([1, 2])],
            [[3], [4]],
            [torch.zeros(0)],
            [0.0],
            [1.0],
            image_token_id=IMAGE,
            pad_token_id=0,
        )
    with pytest.raises(ValueError, match="empty reply"):
        pack_rollouts(
            [torch.tensor([1, 2])],
            [[]],
            [torch.zeros(0, 16, 64)],
            [0.0],
            [1.0],
            image_token_id=IMAGE,
            pad_token_id=0,
        )
    with pytest.raises(ValueError, match="rl.loss_agg"):
        GRPOSettings(loss_agg="sum").check()
