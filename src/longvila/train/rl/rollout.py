"""Rollout engines: sample G replies per prompt, the prompt given as embeddings (text + cached frames).

Prompts go to the engine as embeddings so that the video is encoded once (the embedding cache) and not
again by the engine: the interface a vLLM backend with prompt embeddings fits (`LLM(...,
enable_prompt_embeds=True).generate([{"prompt_embeds": e}], SamplingParams(n=G, seed=s))`). A backend
registers a factory under a name (`register_engine`) and the recipe's `rl.engine` picks it.

The built-in `local` engine decodes with `LongVILA.generate` (KV cache; the G samples of every prompt of
one length in one batch, drawn from a generator seeded by the call's `seed`, so the rollouts depend only
on (weights, prompts, seed) and a resumed run samples the same replies). Prompts of at least
`sp_min_tokens` tokens are generated with MM-SP, one sample at a time, every rank of the SP group
decoding the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """How replies are sampled."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int | None = None


@dataclass
class RolloutRequest:
    """One prompt: embeddings (T, D); `num_samples` replies wanted."""

    prompt_embeds: torch.Tensor
    num_samples: int


class RolloutEngine(Protocol):
    """What the RL trainer needs from a generation backend."""

    name: str

    def sync_weights(self, model) -> None:
        """Take the policy's current weights (called once per rollout batch, on every rank)."""

    def generate(
        self, requests: list[RolloutRequest], sampling: SamplingSpec, seed: int
    ) -> list[list[list[int]]]:
        """Per request, `num_samples` replies as token ids, each cut after its end token (included);
        the same (weights, requests, sampling, seed) give the same replies."""


def cut_reply(tokens: list[int], end_ids: list[int]) -> list[int]:
    """Tokens up to and including the first end token (all of them if none)."""
    for i, token in enumerate(tokens):
        if token in end_ids:
            return tokens[: i + 1]
    return tokens


class LocalEngine:
    """Rollouts with our own `generate` on `model` (the policy itself, or an unsharded copy that
    `sync_weights` refreshes when the policy is sharded with FSDP2)."""

    name = "local"

    def __init__(self, model, *, sp=None, sp_min_tokens: int = 0, copy_from_sharded: bool = False):
        self.model = model
        self.sp = sp
        self.sp_min_tokens = sp_min_tokens
        self.copy_from_sharded = copy_from_sharded

    def sync_weights(self, model) -> None:
        if not self.copy_from_sharded:
            return  # the engine decodes with the policy's own parameters
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        )
        self.model.load_state_dict(full)

    def _end_ids(self, sampling: SamplingSpec) -> list[int]:
        from longvila.model.generation import _end_ids

        return _end_ids(self.model, sampling.eos_token_id)

    @torch.no_grad()
    def generate(
        self, requests: list[RolloutRequest], sampling: SamplingSpec, seed: int
    ) -> list[list[list[int]]]:
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator().manual_seed(seed)
        end_ids = self._end_ids(sampling)
        kwargs = {
            "max_new_tokens": sampling.max_new_tokens,
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "eos_token_id": end_ids or None,
            "pad_token_id": sampling.pad_token_id,
            "generator": generator,
        }
        replies: list[list[list[int]]] = [[] for _ in requests]
        try:
            for length, members in self._by_length(requests).items():
                if self.sp is not None and self.sp.sp_degree > 1 and length >= self.sp_min_tokens:
                    rows = [
                        self.model.generate(
                            inputs_embeds=requests[i].prompt_embeds[None], sp=self.sp, **kwargs
                        )[0]
                        for i in members
                        for _ in range(requests[i].num_samples)
                    ]
                else:
                    batch = torch.cat(
                        [
                            requests[i].prompt_embeds[None].expand(requests[i].num_samples, -1, -1)
                            for i in members
                        ]
                    )
                    rows = list(self.model.generate(inputs_embeds=batch.to(self.model.device), **kwargs))
                rows.reverse()
                for i in members:
                    replies[i] = [
                        cut_reply(rows.pop().tolist(), end_ids) for _ in range(requests[i].num_samples)
                    ]
        finally:
            self.model.train(was_training)
        return replies

    @staticmethod
    def _by_length(requests: list[RolloutRequest]) -> dict[int, list[int]]:
        """Request indices grouped by prompt length, in first-seen order (one batch per length)."""
        groups: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.prompt_embeds.shape[0], []).append(i)
        return groups


EngineFactory = Callable[..., RolloutEngine]
_ENGINES: dict[str, EngineFactory] = {"local": LocalEngine}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Make `rl.engine: name` build its engine with `factory(model, sp=..., sp_min_tokens=...,
    copy_from_sharded=...)`."""
    _ENGINES[name] = factory


def build_engine(name: str, model, **kwargs) -> RolloutEngine:
    if name not in _ENGINES:
        hint = (
            " (a vLLM backend is not built in: register one with "
            "longvila.train.rl.rollout.register_engine('vllm', factory), see docs/rl.md)"
            if name == "vllm"
            else ""
        )
        raise ValueError(f"rl.engine {name!r} is not one of {sorted(_ENGINES)}{hint}")
    return _ENGINES[name](model, **kwargs)
