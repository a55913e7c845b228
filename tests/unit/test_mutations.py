"""Mutation checks: break the code under test on purpose and require the guarding test to fail.

Each case monkeypatches one piece of generation (the left-padding key mask, the KV cache) and runs the
test that guards it: the test must raise AssertionError under the mutation and pass without it. The
ring attention's LSE merge is mutated in tests/distributed/test_mutations_sp.py (it runs on gloo ranks).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _models import lively_tiny_model
from transformers import DynamicCache

import longvila.model.generation as generation
from longvila.model.attention import AttentionContext


def _load(name: str):
    """A test module of this folder, imported by path (tests/unit is not a package)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_mutation_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_model = _load("test_model")


def _without_key_padding(**fields) -> AttentionContext:
    fields.pop("key_padding", None)  # left-padded keys become visible
    return AttentionContext(**fields)


class _ForgetfulCache(DynamicCache):
    """A KV cache that stores nothing: each decoding step attends only to its own key."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


MUTATIONS = {
    "drop the padding mask": (
        "AttentionContext",
        _without_key_padding,
        "test_batched_prompts_of_different_lengths_equal_one_by_one",
    ),
    "drop the KV cache": (
        "DynamicCache",
        _ForgetfulCache,
        "test_greedy_generate_with_cache_equals_full_recompute",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutation_makes_its_guarding_test_fail(mutation, tiny_processor, monkeypatch):
    attribute, replacement, guard = MUTATIONS[mutation]
    run_guard = getattr(test_model, guard)
    run_guard(lively_tiny_model(), tiny_processor)  # passes on the real code
    monkeypatch.setattr(generation, attribute, replacement)
    with pytest.raises(AssertionError):
        run_guard(lively_tiny_model(), tiny_processor)


def test_guards_fail_on_a_model_that_emits_one_constant_token(tiny_processor):
    """At the default init the tiny model's greedy tokens are all the same: every greedy generation
    test refuses such a model instead of passing vacuously. (The sampling test is not listed: at
    temperature 1.5 even this model's sampled tokens vary, which is what that test asserts.)"""
    torch.manual_seed(0)
    from longvila import LongVILA, LongVILAConfig

    constant = LongVILA(LongVILAConfig.tiny()).eval()
    prompt = tiny_processor.collate([tiny_processor([{"role": "user", "content": "Hi."}])])
    assert len(set(constant.generate(**prompt, max_new_tokens=6, eos_token_id=[])[0].tolist())) == 1
    for guard in (
        "test_greedy_generate_with_cache_equals_full_recompute",
        "test_batched_prompts_of_different_lengths_equal_one_by_one",
        "test_chunked_prefill_gives_the_same_tokens",
    ):
        torch.manual_seed(0)
        with pytest.raises(AssertionError):
            getattr(test_model, guard)(LongVILA(LongVILAConfig.tiny()).eval(), tiny_processor)
