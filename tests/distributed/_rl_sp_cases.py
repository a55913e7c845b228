"""Stage 6 under MM-SP and FSDP2 on gloo ranks in float64, against one process (run by test_rl_sp.py).

Every rank builds the same float64 model and the same rollout batch, computes the single-process
loss, gradients and log-probabilities itself, then the same under sequence parallelism; the SP
gradients are summed over the SP group (the SFT stages' convention) before the comparison. The FSDP2
cases shard the model over all 4 ranks (data parallel 4, or 2 x Ulysses 2), give each data-parallel
group its own rollout batch, and compare the gathered gradients and the parameters after one AdamW step
with one process taking the mean of the groups' losses; the DDP cases do the same with replicated
weights and the losses taken through DDP (the trainer's path without FSDP).
"""

from __future__ import annotations

import contextlib

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


def _rollouts(model, multiple: int, agg: str, seed: int = 3):
    """Two questions (3 and 1 frames), G = 3 replies each of different lengths, in one packed row."""
    from longvila.train.rl.grpo import GRPOSettings, group_advantages, pack_rollouts, sequence_weights

    g = torch.Generator().manual_seed(seed)
    image = model.config.image_token_id
    per, width = model.config.tokens_per_frame, model.config.llm_hidden_size
    prompts, embeds = [], []
    for count in (3, 1):
        prompts.append(torch.tensor([5, 17] + ([image] * per + [202]) * count + [40, 41]))
        embeds.append(torch.randn(count, per, width, generator=g, dtype=torch.float64))
    replies = [torch.randint(10, 900, (2 + (5 * i) % 7,), generator=g).tolist() for i in range(6)]
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64) + seed % 2
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


def _full_tensors(named) -> dict[str, torch.Tensor]:
    """Parameters or gradients of a sharded model gathered into full tensors (a collective)."""
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for n, t in named}


def _worst(got: dict, want: dict) -> float:
    return max(float((got[k] - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-30) for k in want)


def _one_process_update(single, loss: torch.Tensor) -> tuple[dict, dict]:
    """Backward of `loss` and one AdamW step of the single-process model: (gradients, parameters after)."""
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in single.named_parameters() if p.grad is not None}
    torch.optim.AdamW(single.parameters(), lr=1e-2, weight_decay=0.1).step()
    return grads, {n: p.detach().clone() for n, p in single.named_parameters()}


def _stage6_model():
    model = _model()
    model.vision_tower.requires_grad_(False)  # stage 6: the vision side is frozen
    model.mm_projector.requires_grad_(False)
    return model


def _step_and_compare(model, gather, want_grads: dict, want_params: dict) -> dict:
    """One AdamW step of the parallel `model` (gradients already reduced), its gradients and parameters
    (through `gather`) against one process's, on the LLM's parameters; the frozen ones unchanged."""
    got_grads = gather((n, p.grad) for n, p in model.named_parameters() if p.grad is not None)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1).step()
    got_params = gather(model.named_parameters())
    llm = {k for k in want_grads if k.startswith("llm.")}
    initial = dict(_model().named_parameters())
    return {
        "grad_names": (sorted(got_grads), sorted(llm)),
        "grad_err": _worst({k: got_grads[k] for k in llm}, {k: want_grads[k] for k in llm}),
        "param_err": _worst({k: got_params[k] for k in llm}, {k: want_params[k] for k in llm}),
        "moved": max(float((want_params[k] - initial[k].detach()).abs().max()) for k in llm),
        "frozen_same": all(torch.equal(got_params[k], p) for k, p in initial.items() if k not in llm),
    }


def fsdp_step(ulysses: int):
    """One GRPO update under FSDP2 over all ranks (dp = world / ulysses, SP = Ulysses `ulysses`) against
    one process on every data-parallel group's batch: loss = mean over groups of the group's loss."""
    from longvila.parallel import init_sp
    from longvila.parallel.fsdp import fully_shard_model
    from longvila.train.rl.grpo import grpo_loss, register_rl_forward, token_logprobs

    sp = init_sp(ulysses=ulysses, ring=1)
    single = _model()
    batches = [
        _rollouts(single, sp.sequence_multiple, "token_mean", seed=20 + d) for d in range(sp.dp_degree)
    ]
    g = torch.Generator().manual_seed(5)
    olds, refs = [], []
    with torch.no_grad():  # old / reference log-probs: perturbed current ones (clipping and KL act)
        for packed, _ in batches:
            logp, pos = token_logprobs(single, packed)
            old = torch.zeros(packed.input_ids.shape[1], dtype=torch.float64)
            ref = torch.zeros_like(old)
            old[pos] = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
            ref[pos] = logp + 0.5 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
            olds.append(old)
            refs.append(ref)
    total = 0.0
    for (packed, settings), old, ref in zip(batches, olds, refs):
        _, pos = token_logprobs(single, packed)
        loss, _ = grpo_loss(single, packed, settings, old_logp=old[pos], ref_logp=ref[pos])
        total = total + loss / sp.dp_degree
    want_grads, want_params = _one_process_update(single, total)

    model = _stage6_model()
    fully_shard_model(model, model.llm.get_decoder().layers)
    register_rl_forward(model)
    packed, settings = batches[sp.dp_rank]
    with torch.no_grad():
        logp, pos = token_logprobs(model, packed, sp)  # the no-grad path too (the rollout policy's)
    loss, _ = grpo_loss(
        model, packed, settings, old_logp=olds[sp.dp_rank][pos], ref_logp=refs[sp.dp_rank][pos], sp=sp
    )
    (loss / sp.dp_degree).backward()  # the trainer's scale: FSDP2 sums gradients over every rank
    result = _step_and_compare(model, _full_tensors, want_grads, want_params)
    return {**result, "local_tokens": int(pos.numel())}


def ddp_step(ulysses: int):
    """One GRPO update with replicated weights, the losses through torch DDP around `PolicyLoss` (dp =
    world / ulysses, SP = Ulysses `ulysses`), two micro-batches per data-parallel group (the first under
    `no_sync`), against one process on every group's batches: loss = mean over groups of the sum of the
    group's micro-batch losses. Also counts the all-reduce calls of the backward passes (DDP's buckets)."""
    from longvila.parallel import init_sp
    from longvila.train.distributed import wrap_data_parallel
    from longvila.train.rl.grpo import PolicyLoss, grpo_loss, token_logprobs

    sp = init_sp(ulysses=ulysses, ring=1)
    single = _model()
    batches = [
        [_rollouts(single, sp.sequence_multiple, "sequence_mean", seed=40 + 2 * d + m) for m in range(2)]
        for d in range(sp.dp_degree)
    ]
    g = torch.Generator().manual_seed(9)
    olds = []  # old log-probs: perturbed current ones (so the ratios clip); no reference (kl_coef 0)
    with torch.no_grad():
        for group in batches:
            olds.append([])
            for packed, _ in group:
                logp, pos = token_logprobs(single, packed)
                old = torch.zeros(packed.input_ids.shape[1], dtype=torch.float64)
                old[pos] = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
                olds[-1].append(old)
    total = 0.0
    for group, group_olds in zip(batches, olds):
        for (packed, settings), old in zip(group, group_olds):
            _, pos = token_logprobs(single, packed)
            loss, _ = grpo_loss(single, packed, settings, old_logp=old[pos])
            total = total + loss / sp.dp_degree
    want_grads, want_params = _one_process_update(single, total)

    model = _stage6_model()
    ddp = wrap_data_parallel(PolicyLoss(model), sp.dp_degree, find_unused_parameters=False)  # as RLTrainer
    calls, all_reduce = [], dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    for m, ((packed, settings), old) in enumerate(zip(batches[sp.dp_rank], olds[sp.dp_rank])):
        with ddp.no_sync() if m == 0 else contextlib.nullcontext():
            with torch.no_grad():
                _, pos = token_logprobs(model, packed, sp)
            loss, _ = ddp(packed, sp, settings=settings, old_logp=old[pos])
            dist.all_reduce = counting
            try:
                loss.backward()
            finally:
                dist.all_reduce = all_reduce
    trainable = sum(p.requires_grad for p in model.parameters())
    result = _step_and_compare(model, _full_tensors, want_grads, want_params)
    return {**result, "all_reduce_calls": len(calls), "trainable": trainable}


def trainer_runs(rank: int, world: int, root: str):
    """The stage-6 trainer (cold start, GRPO steps with rollouts, held-out evaluation, a checkpoint,
    the export) on dp 2 x Ulysses 2, with FSDP2 and with replicated weights: their metrics and final
    weights."""
    from longvila.parallel.launch import DistInfo
    from longvila.train.metrics import read_metrics
    from longvila.train.recipe import load_recipe
    from longvila.train.rl.trainer import RLTrainer

    small = [
        "--data.num_frames", "2", "--data.batch_size", "2", "--rl.group_size", "4",
        "--rl.train_questions", "8", "--rl.heldout_questions", "4", "--rl.sft_questions", "4",
        "--rl.sft_steps", "1", "--rl.max_new_tokens", "6", "--rl.temperature", "2.0",
        "--rl.format_weight", "0.5", "--rl.kl_coef", "0.1", "--run.num_threads", "1",
        "--logging.progress_bar", "false", "--checkpoint.every_steps", "2", "--train.max_steps", "2",
        "--parallel.ulysses_degree", "2", "--parallel.ring_degree", "1", "--model.init", f"{root}/init",
        "--run.root", root,
    ]  # fmt: skip
    out = {}
    for fsdp in ("false", "true"):
        recipe = load_recipe("tiny/stage6", [*small, "--run.name", f"fsdp_{fsdp}", "--parallel.fsdp", fsdp])
        trainer = RLTrainer(recipe, dist_info=DistInfo(rank, world, rank, torch.device("cpu")))
        result = trainer.fit()
        state = trainer._policy_state()
        dist.barrier()
        out[fsdp] = {
            "metrics": read_metrics(recipe.run_dir / "metrics.jsonl"),
            "llm": {k: v.float() for k, v in state.items() if k.startswith("llm.")},
            "exported": result.final_dir is not None and (result.final_dir / "config.json").is_file(),
            "sharded": any(hasattr(p, "full_tensor") for p in trainer.model.parameters()),
        }
    # Compared here: tensors in the result would travel through shared memory the ending worker frees.
    sharded, replicated = out["true"].pop("llm"), out["false"].pop("llm")
    out["same_names"] = sorted(sharded) == sorted(replicated)
    out["weight_diff"] = max(float((sharded[k] - w).abs().max()) for k, w in replicated.items())
    return out


def run_world4(rank: int, world: int, root: str):
    return {
        "loss_grads": loss_and_grads(rank, world),
        "cache": cache_under_sp(rank, world),
        "fsdp": {f"dp{4 // u}u{u}": fsdp_step(u) for u in (1, 2)},
        "ddp": {f"dp{4 // u}u{u}": ddp_step(u) for u in (1, 2)},
        "trainer": trainer_runs(rank, world, root),
    }
