"""Stage 6: the GRPO loop on the same trainer, checkpoints, metrics and MM-SP stack as the SFT stages.

Each optimiser step of the stage is one of:

- a cold-start SFT step (the first `rl.sft_steps`; every step with `rl.sft_only`, the control):
  labelled `<think>..</think><answer>..</answer>` replies of `rl.sft_questions` training questions
  stratified by answer, cross entropy on the reply tokens;
- an RL step: `data.batch_size` questions per data-parallel rank, G = `rl.group_size` sampled replies
  each from the rollout engine, rewards by rule, group-normalised advantages, `rl.updates_per_batch`
  AdamW updates on the clipped policy-gradient loss (+ beta x KL to the frozen reference).

Every video goes through the vision tower once: the embedding cache serves the prompt embeddings of all
G rollouts, the reference and policy forward passes, later epochs and a resumed run. Held-out accuracy
(greedy) is measured when RL starts and when the stage ends (`rl_eval.json`). The sampling seed of a
question is a function of (run.seed, step, data-parallel rank, question), so a run killed and resumed
from its DCP checkpoint replays the same rollouts and the same reward curve. With replicated weights on
several ranks the losses come out of torch DDP wrapped around `PolicyLoss` (the SFT stages' dp-aware
reduction, `train/distributed.py`); under FSDP2 the RL forward runs inside FSDP's hooks
(`register_rl_forward`) and rollouts on an unsharded copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from longvila.data.rl_tasks import RLQuestion, RLTaskSet
from longvila.train import checkpointing as ckpt
from longvila.train.metrics import memory_gib
from longvila.train.rl.cache import EmbeddingCache, vision_fingerprint
from longvila.train.rl.grpo import (
    LossStats,
    PackedRollouts,
    PolicyLoss,
    group_advantages,
    pack_rollouts,
    register_rl_forward,
    sequence_weights,
    token_logprobs,
)
from longvila.train.rl.rewards import extract_answer, score
from longvila.train.rl.rollout import RolloutRequest, SamplingSpec, build_engine, cut_reply
from longvila.train.trainer import Trainer, build_model

EVAL_FILE = "rl_eval.json"
REFERENCE_FILE = "rl_reference.pt"


@dataclass
class Prompt:
    """One question ready for rollouts: prompt ids (L,), its frames' embeddings (F, P, D) from the cache."""

    question: RLQuestion
    input_ids: torch.Tensor
    frame_embeds: torch.Tensor


def _digest(replies: list[list[int]]) -> str:
    """A short hash of a step's sampled tokens (in the metrics: a resumed run must sample the same)."""
    return hashlib.sha256(json.dumps(replies).encode()).hexdigest()[:16]


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1
    )


class RLTrainer(Trainer):
    """GRPO on `Trainer`'s setup, resume, metrics, checkpoints and export."""

    # ---- setup ---------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        recipe, rl = self.recipe, self.recipe.rl
        shape = {
            "seed": recipe.run.seed,
            "num_frames": recipe.data.num_frames,
            "size": recipe.data.frame_size,
        }
        self.train_set = RLTaskSet(rl.task, "train", rl.train_questions, **shape)
        self.heldout_set = RLTaskSet(rl.task, "heldout", rl.heldout_questions, **shape)
        self.sampler = self._batch_sampler(len(self.train_set))
        self.accum = 1
        rl_steps = recipe.train.max_steps or max(
            1, math.ceil(recipe.train.epochs * self.sampler.batches_per_epoch)
        )
        self.max_steps = rl.sft_steps + rl_steps
        # The SFT-only control trains on the labelled replies for every step of the stage.
        self.sft_steps = self.max_steps if rl.sft_only else rl.sft_steps

    def setup(self) -> None:
        if getattr(self, "_ready", False):
            return
        super().setup()
        recipe, rl = self.recipe, self.recipe.rl
        self.settings = rl.grpo_settings()
        # FSDP2 sums gradients over every rank (divide factor 1, parallel/fsdp.py); DDP's hook divides the
        # world sum by dp (train/distributed.py). Scaling each rank's loss by 1/dp makes both the mean.
        self.loss_scale = 1.0 / self.dp_degree if self.fsdp else 1.0
        # The losses as a module: DDP wraps it (`_data_parallel_module`), so its forward arms the reduction.
        self.policy_loss = PolicyLoss(self.model)
        rollout_model = self.model
        if self.fsdp:
            register_rl_forward(self.model)
            # Rollouts, held-out decoding and the frame encoder run on an unsharded copy that
            # `sync_weights` refreshes from the shards before every rollout batch and evaluation.
            rollout_model, _ = build_model(recipe)
            rollout_model.requires_grad_(False)
            rollout_model.to(self.dist.device).eval()
        self.engine = build_engine(
            rl.engine, rollout_model, sp=self.sp, sp_min_tokens=rl.sp_min_tokens, copy_from_sharded=self.fsdp
        )
        self.reference = None
        if self.settings.kl_coef > 0:
            self.reference, _ = build_model(recipe)
            self.reference.requires_grad_(False)
            self.reference.to(self.dist.device).eval()
        cache_dir = rl.cache_dir if rl.cache_dir is not None else str(self.run_dir / "embed_cache")
        self.cache = EmbeddingCache(
            rollout_model,
            fingerprint=vision_fingerprint(rollout_model),
            directory=None if cache_dir.lower() in ("none", "off", "") else cache_dir,
            memory_items=rl.cache_memory_videos,
            sp=self.sp,
        )
        self.sampling = SamplingSpec(
            max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_k=rl.top_k,
            top_p=rl.top_p,
            pad_token_id=self.processor.pad_token_id,
        )
        self.end_ids = [self.processor.im_end_id]

    def _resume(self) -> ckpt.TrainProgress:
        progress = super()._resume()
        self._step_index = progress.step
        self._position = progress.data
        if self.reference is not None and self.sft_steps < progress.step:
            self._load_reference()
        return progress

    # ---- helpers -------------------------------------------------------------------------------
    def _prompt(self, question: RLQuestion) -> Prompt:
        sample = self.processor(question.messages(), num_frames=question.frames.shape[0])
        ids = sample["input_ids"]
        if self.recipe.rl.reply_prefix:
            prefix = torch.tensor(self.processor._encode(self.recipe.rl.reply_prefix), dtype=ids.dtype)
            ids = torch.cat([ids, prefix])
        return Prompt(question, ids, self.cache.get(sample["pixel_values"]))

    @torch.no_grad()
    def _prompt_embeds(self, model, prompt: Prompt) -> torch.Tensor:
        packed = pack_rollouts(
            [prompt.input_ids], [[0]], [prompt.frame_embeds], [0.0], [0.0], **self._pack_ids()
        )  # a one-token dummy reply: only the prompt's embeddings are kept
        from longvila.train.rl.grpo import embed_packed

        return embed_packed(model, packed)[0, : prompt.input_ids.shape[0]]

    def _pack_ids(self) -> dict[str, int]:
        return {
            "image_token_id": self.model.config.image_token_id,
            "pad_token_id": self.processor.pad_token_id,
        }

    # Stage 6 trains the LLM only (train/stages.py), and every RL or cold-start loss runs all of it
    # (embeddings, every layer, the head): DDP need not search for unused parameters.
    ddp_find_unused_parameters = False

    def _data_parallel_module(self) -> torch.nn.Module:
        return self.policy_loss

    def _backward(
        self, packed: PackedRollouts, *, sync: bool = True, **loss_args
    ) -> tuple[torch.Tensor, LossStats | None]:
        """One micro-batch's loss (`PolicyLoss`'s arguments; through DDP with several replicated ranks)
        and its backward; `sync=False` for all but an update's last micro-batch (no reduction yet)."""
        module = self.ddp if self.ddp is not None else self.policy_loss
        with self._sync(sync):
            loss, stats = module(packed, self.sp, **loss_args)
            (loss * self.loss_scale).backward()
        return loss.detach(), stats

    def _micro_groups(self, n: int) -> list[range]:
        size = self.recipe.rl.micro_batch_rollouts or n
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    def _sync_engine(self) -> None:
        self.engine.sync_weights(self.model)

    # ---- the loop ------------------------------------------------------------------------------
    def _micro_batches(self, position: ckpt.DataPosition):
        """Yield (question indices of this rank, position after them) forever, epoch after epoch."""
        while True:
            self.sampler.set_position(position.epoch, position.batch_in_epoch)
            for indices in self.sampler:
                position = ckpt.DataPosition(
                    position.epoch, position.batch_in_epoch + 1, position.sampler_seed
                )
                yield indices, position
            position = ckpt.DataPosition(position.epoch + 1, 0, position.sampler_seed)

    def _step(self, stream) -> tuple[dict[str, Any], ckpt.DataPosition]:
        start = time.perf_counter()
        self._wrap_data_parallel()
        step = self._step_index
        self._step_index += 1
        if step < self.sft_steps:
            record = self._sft_step(step)
        else:
            if step == self.sft_steps:
                self._start_rl()
            indices, self._position = next(stream)
            record = self._rl_step(step, indices)
        record.update(
            step_s=time.perf_counter() - start,
            memory_gib=memory_gib(self.dist.device),
            epoch=self._position.epoch,
            vision_encodes=self.cache.encodes,
        )
        if self._step_index == self.max_steps:
            self._finish_rl()
        return record, self._position

    def _sft_step(self, step: int) -> dict[str, Any]:
        rl = self.recipe.rl
        rng = np.random.default_rng([self.recipe.run.seed, 61, step, self.dp_rank])
        pool = self._sft_pool()
        picks = rng.integers(len(pool), size=self.recipe.data.batch_size)
        prompts = [self._prompt(self.train_set[pool[int(i)]]) for i in picks]
        replies = [self.processor._encode(self._labelled_reply(p.question)) + self.end_ids for p in prompts]
        weights = sequence_weights([len(r) for r in replies], "token_mean")
        packed = pack_rollouts(
            [p.input_ids for p in prompts],
            replies,
            [p.frame_embeds for p in prompts],
            [0.0] * len(prompts),
            weights,
            **self._pack_ids(),
            pad_to_multiple_of=self.sequence_multiple,
        )
        loss, _ = self._backward(packed)
        lr = rl.sft_lr or self.scheduler.get_last_lr()[0]
        for group in self.optimizer.param_groups:  # the schedule sets it back at its next step
            group["lr"] = lr
        grad_norm = self._apply_gradients()
        self.scheduler.step()
        return {"phase": "sft", "loss": float(loss), "lr": lr, "grad_norm": grad_norm,
                "tokens": packed.input_ids.numel(), "frames": sum(p.frame_embeds.shape[0] for p in prompts)}  # fmt: skip

    def _sft_pool(self) -> list[int]:
        """The labelled questions of the cold start: `rl.sft_questions` training questions stratified by
        answer (round-robin over the answers in order of first appearance, each answer's questions in
        split order), so every answer is labelled at least once when there are enough questions.

        Why: with the first questions of the split, an answer they happen to miss is never written in
        the cold start, so GRPO rarely samples it and cannot learn it (zero reward variance)."""
        if getattr(self, "_pool", None) is None:
            by_answer: dict[str, list[int]] = {}
            for index in range(len(self.train_set)):
                by_answer.setdefault(self.train_set[index].answer, []).append(index)
            queues = [list(reversed(v)) for v in by_answer.values()]
            pool: list[int] = []
            while len(pool) < self.recipe.rl.sft_questions and any(queues):  # fewer questions than asked: all
                for queue in queues:
                    if queue and len(pool) < self.recipe.rl.sft_questions:
                        pool.append(queue.pop())
            self._pool = sorted(pool)
        return self._pool

    def _rollouts(self, step: int, prompts: list[Prompt]) -> list[list[list[int]]]:
        self._sync_engine()
        group = self.recipe.rl.group_size
        requests = [RolloutRequest(self._prompt_embeds(self.engine.model, p), group) for p in prompts]
        return self.engine.generate(
            requests, self.sampling, _seed(self.recipe.run.seed, 62, step, self.dp_rank)
        )

    def _rl_step(self, step: int, indices: list[int]) -> dict[str, Any]:
        rl = self.recipe.rl
        prompts = [self._prompt(self.train_set[i]) for i in indices]
        replies = self._rollouts(step, prompts)
        scores = [
            [score(self._decode(r), p.question.answer, p.question.kind, rl.format_weight) for r in group]
            for p, group in zip(prompts, replies)
        ]
        rewards = torch.tensor([[s.total for s in group] for group in scores], dtype=torch.float64)
        advantages = group_advantages(rewards, self.settings)
        flat_prompts = [p for p in prompts for _ in range(rl.group_size)]
        flat_replies = [r for group in replies for r in group]
        flat_adv = advantages.reshape(-1).tolist()
        weights = sequence_weights([len(r) for r in flat_replies], self.settings.loss_agg)
        micro = [
            pack_rollouts(
                [flat_prompts[i].input_ids for i in group],
                [flat_replies[i] for i in group],
                [flat_prompts[i].frame_embeds for i in group],
                [flat_adv[i] for i in group],
                [weights[i] for i in group],
                **self._pack_ids(),
                pad_to_multiple_of=self.sequence_multiple,
            )
            for group in self._micro_groups(len(flat_replies))
        ]
        refs = (
            [self._no_grad_logprobs(self.reference, m) for m in micro] if self.reference is not None else None
        )
        olds = [self._no_grad_logprobs(self.model, m) for m in micro] if rl.updates_per_batch > 1 else None
        lr = self.scheduler.get_last_lr()[0]
        losses, grad_norms, tokens, clipped, kl = [], [], 0.0, 0.0, 0.0
        for _ in range(rl.updates_per_batch):
            total = 0.0
            for k, packed in enumerate(micro):
                loss, stats = self._backward(
                    packed,
                    sync=k == len(micro) - 1,
                    settings=self.settings,
                    old_logp=None if olds is None else olds[k],
                    ref_logp=None if refs is None else refs[k],
                )
                total += float(loss)
                tokens, clipped, kl = tokens + stats.tokens, clipped + stats.clipped, kl + stats.kl
            losses.append(total)
            grad_norms.append(self._apply_gradients())
        self.scheduler.step()
        accuracy = [s.accuracy for group in scores for s in group]
        fmt = [s.format for group in scores for s in group]
        return {
            "phase": "rl",
            "loss": sum(losses) / len(losses),
            "lr": lr,
            "grad_norm": grad_norms[-1],
            "reward": self._dp_mean(rewards.mean().item()),
            "accuracy": self._dp_mean(float(np.mean(accuracy))),
            "format": self._dp_mean(float(np.mean(fmt))),
            "reply_tokens": self._dp_mean(float(np.mean([len(r) for r in flat_replies]))),
            "clip_fraction": clipped / max(tokens, 1.0),
            "kl": kl / max(tokens, 1.0),
            "tokens": sum(m.input_ids.numel() for m in micro),
            "frames": sum(p.frame_embeds.shape[0] for p in prompts),
            "rollout_digest": _digest(flat_replies),
        }

    @torch.no_grad()
    def _no_grad_logprobs(self, model, packed: PackedRollouts) -> torch.Tensor:
        return token_logprobs(model, packed, self.sp, self.settings.temperature)[0]

    def _labelled_reply(self, question: RLQuestion) -> str:
        """The labelled reply without the prefix the prompt already holds."""
        text, prefix = question.labelled_example(), self.recipe.rl.reply_prefix
        return text[len(prefix) :] if prefix and text.startswith(prefix) else text

    def _decode(self, reply: list[int]) -> str:
        """The reply as the rewards see it: the prompt's reply prefix, then the sampled text."""
        body = reply[:-1] if reply and reply[-1] in self.end_ids else reply
        return self.recipe.rl.reply_prefix + self.processor.decode(body)

    def _dp_mean(self, value: float) -> float:
        """Mean over data-parallel groups (every rank of a group holds the same value)."""
        if self.dp_degree == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.dist.world_size

    # ---- evaluation and the reference model ------------------------------------------------------
    def _start_rl(self) -> None:
        """RL begins: freeze the reference at the current (post-SFT) policy and score the held-out split."""
        if self.reference is not None:
            self._save_reference()
        evaluation = self._read_eval()
        if "before" not in evaluation:
            evaluation["before"] = self.evaluate()
            self._write_eval(evaluation)

    def _finish_rl(self) -> None:
        evaluation = self._read_eval()
        evaluation["after"] = self.evaluate()
        evaluation["cache"] = {**self.cache.state(), "videos": len(self.cache.seen)}
        rl = self.recipe.rl
        steps = self.max_steps - self.sft_steps
        evaluation["rollouts"] = steps * self.recipe.data.batch_size * rl.group_size * self.dp_degree
        evaluation["rl_steps"] = steps
        evaluation["sft_steps"] = self.sft_steps
        evaluation["sft_only"] = rl.sft_only
        self._write_eval(evaluation)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Greedy accuracy (and format rate) on the held-out split, with the current policy; prompts of
        equal length decode together."""
        self._sync_engine()
        model = self.engine.model
        was_training = model.training
        model.eval()
        prompts = [self._prompt(self.heldout_set[i]) for i in range(len(self.heldout_set))]
        by_length: dict[int, list[Prompt]] = {}
        for prompt in prompts:
            by_length.setdefault(prompt.input_ids.shape[0], []).append(prompt)
        correct, formatted = 0.0, 0.0
        by_answer: dict[str, list[float]] = {}  # reference answer -> [correct, questions]
        predicted: dict[str, int] = {}  # the text inside <answer> (or "none") -> replies
        try:
            for group in by_length.values():
                embeds = torch.stack([self._prompt_embeds(model, p) for p in group])
                rows = model.generate(
                    inputs_embeds=embeds,
                    max_new_tokens=self.recipe.rl.max_new_tokens,
                    eos_token_id=self.end_ids,
                    pad_token_id=self.processor.pad_token_id,
                )
                for prompt, row in zip(group, rows):
                    reply = self._decode(cut_reply(row.tolist(), self.end_ids))
                    question = prompt.question
                    result = score(reply, question.answer, question.kind, self.recipe.rl.format_weight)
                    correct += result.accuracy
                    formatted += result.format
                    tally = by_answer.setdefault(question.answer, [0.0, 0.0])
                    tally[0], tally[1] = tally[0] + result.accuracy, tally[1] + 1
                    answer = extract_answer(reply)
                    key = "none" if answer is None else answer.strip()
                    predicted[key] = predicted.get(key, 0) + 1
        finally:
            model.train(was_training)
        n = len(prompts)
        return {
            "accuracy": correct / n,
            "format": formatted / n,
            "questions": n,
            "accuracy_by_answer": {a: c / m for a, (c, m) in sorted(by_answer.items())},
            "predicted_answers": dict(sorted(predicted.items())),
        }

    def _read_eval(self) -> dict[str, Any]:
        path = self.run_dir / EVAL_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_eval(self, evaluation: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / EVAL_FILE
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(json.dumps(evaluation, indent=1) + "\n")
        os.replace(temp, path)

    def _policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's full weights on every rank (gathered from the shards under FSDP2)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _save_reference(self) -> None:
        state = self._policy_state()
        self.reference.load_state_dict(state)
        if self.recipe.rl.sft_steps and self.dist.is_main:
            path = self.run_dir / REFERENCE_FILE
            temp = path.with_name(f".{path.name}.tmp")
            torch.save({k: v.cpu() for k, v in state.items()}, temp)
            os.replace(temp, path)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _load_reference(self) -> None:
        if not self.recipe.rl.sft_steps:
            return  # the reference is the stage's initial model, which build_model already gave
        path = self.run_dir / REFERENCE_FILE
        if not path.is_file():
            raise ValueError(f"{path}: the reference model of this resumed RL run is missing")
        self.reference.load_state_dict(torch.load(path, map_location=self.dist.device, weights_only=True))
