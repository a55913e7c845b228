"""Stage 6 under MM-SP on gloo ranks in float64, against one process (run by test_rl_sp.py).

Every rank builds the same float64 model and the same rollout batch, computes the single-process
loss, gradients and log-probabilities itself, then the same under sequence parallelism; the SP
gradients are summed over the SP group (the SFT stages' convention) before the comparison.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = {"u2r2": (2, 2), "u4r1": (4, 1), "u1r4": (1, 4)}


def _model(seed=0):
    from longvila import LongVILA, LongVILAConfig

    torch.manual_seed(seed)
    model = LongVILA(LongVILAConfig.tiny()).double()
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)
    return model


def _rollouts(model, multiple: int, agg: str):
    """Two questions (3 and 1 frames), G = 3 replies each of different lengths, in one packed row."""
    from longvila.train.rl.grpo import GRPOSettings, group_advantages, pack_rollouts, sequence_weights

    g = torch.Generator().manual_seed(3)
    image = model.config.image_token_id
    per, width = model.config.tokens_per_frame, model.config.llm_hidden_size
    prompts, embeds = [], []
    for count in (3, 1):
        prompts.append(torch.tensor([5, 17] + ([image] * per + [202]) * count + [40, 41]))
        embeds.append(torch.randn(count, per, width, generator=g, dtype=torch.float64))
    replies = [torch.randint(10, 900, (2 + (5 * i) % 7,), generator=g).tolist() for i in range(6)]
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64)
    settings = GRPOSettings(clip_low=0.2, clip_high=0.28, kl_coef=0.05, loss_agg=agg)
    adv = group_advantages(rewards, settings).reshape(-1).tolist()
    weights = sequence_weights([len(r) for r in replies], agg)
    packed = pack_rollouts([prompts[i // 3] for i in range(6)], replies, [embeds[i // 3] for i in range(6)],
                           adv, weights, image_token_id=image, pad_token_id=0, pad_to_multiple_of=multiple)  # fmt: skip
    return packed, settings


def _full(values: torch.Tensor, positions: torch.Tensor, total: int, sp) -> torch.Tensor:
    """Scatter this rank's per-position values into a full-length row and sum over the SP group."""
    out = torch.zeros(total, dtype=values.dtype)
    out[positions] = values.detach()
    return sp.all_reduce_sum(out)


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def loss_and_grads(rank: int, world: int):
    from longvila.parallel import init_sp
    from longvila.train.rl.grpo import grpo_loss, sft_loss, token_logprobs

    out = {}
    for name, (ulysses, ring) in LAYOUTS.items():
        sp = init_sp(ulysses=ulysses, ring=ring)
        for agg in ("sequence_mean", "token_mean"):
            model = _model()
            packed, settings = _rollouts(model, sp.sequence_multiple, agg)
            total = packed.input_ids.shape[1]
            # old / reference log-probs: the current ones perturbed (so ratios clip and the KL is non-zero)
            with torch.no_grad():
                single_logp, single_pos = token_logprobs(model, packed)
                local_logp, local_pos = token_logprobs(model, packed, sp)
            g = torch.Generator().manual_seed(11)
            old_full = torch.zeros(total, dtype=torch.float64)
            ref_full = torch.zeros(total, dtype=torch.float64)
            old_full[single_pos] = single_logp + 0.3 * torch.randn(
                single_logp.shape, generator=g, dtype=torch.float64
            )
            ref_full[single_pos] = single_logp + 0.5 * torch.randn(
                single_logp.shape, generator=g, dtype=torch.float64
            )

            ref_loss, ref_stats = grpo_loss(
                model, packed, settings, old_logp=old_full[single_pos], ref_logp=ref_full[single_pos]
            )
            ref_loss.backward()
            ref_grads = _grads(model)
            model.zero_grad(set_to_none=True)
            loss, stats = grpo_loss(
                model, packed, settings, old_logp=old_full[local_pos], ref_logp=ref_full[local_pos], sp=sp
            )
            loss.backward()
            ours = _grads(model)
            for tensor in ours.values():
                dist.all_reduce(tensor, group=sp.sp_group)
            model.zero_grad(set_to_none=True)
            nll_single = sft_loss(model, packed)
            nll_sp = sft_loss(model, packed, sp)
            scale = max(float(t.abs().max()) for t in ref_grads.values())
            out[f"{name}/{agg}"] = {
                "loss": (float(loss.detach()), float(ref_loss.detach())),
                "grad_err": max(float((ours[k] - ref_grads[k]).abs().max()) for k in ref_grads) / scale,
                "grad_scale": scale,
                "logp_err": float(
                    (_full(local_logp, local_pos, total, sp)[single_pos] - single_logp).abs().max()
                ),
                "local_tokens": int(local_pos.numel()),
                "tokens": (stats.tokens, ref_stats.tokens),
                "clipped": (stats.clipped, ref_stats.clipped),
                "kl": (stats.kl, ref_stats.kl),
                "sft": (float(nll_sp.detach()), float(nll_single.detach())),
            }
    return out


def cache_under_sp(rank: int, world: int):
    """The embedding cache splits a video's frames over the SP ranks, encodes each once, and gives every
    rank the single-process embeddings; a second request is a hit on every rank."""
    from longvila.parallel import init_sp
    from longvila.train.rl.cache import EmbeddingCache, vision_fingerprint

    sp = init_sp(ulysses=2, ring=2)
    model = _model()
    calls = []
    forward = model.vision_tower.forward
    model.vision_tower.forward = lambda x: (calls.append(int(x.shape[0])), forward(x))[1]
    pixels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        want = model.encode_frames(pixels)
    calls.clear()
    cache = EmbeddingCache(model, fingerprint=vision_fingerprint(model), sp=sp)
    first = cache.get(pixels)
    second = cache.get(pixels.clone())
    return {
        "err": float((first - want).abs().max()),
        "same": bool(torch.equal(first, second)),
        "frames_here": calls,
        "state": cache.state(),
    }


def run_world4(rank: int, world: int):
    return {"loss_grads": loss_and_grads(rank, world), "cache": cache_under_sp(rank, world)}
