"""Token-by-token decoding with a KV cache for LongVILA (greedy and sampling).

Prompts of different lengths are left-padded into one batch; the attention context masks the padding
keys and position ids start at 0 at each prompt's first real token, so every prompt is decoded exactly as
it would be alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from longvila.model.attention import AttentionContext


def _split_prompts(model, input_ids, pixel_values, cu_seqlens, sp):
    """Embed the packed row once, then cut it into per-prompt (T_i, D) embeddings."""
    input_ids = input_ids.to(model.device)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    embeds = model.embed(input_ids, pixel_values)
    prompts = []
    if cu_seqlens is not None:
        if input_ids.shape[0] != 1:
            raise ValueError("cu_seqlens describes one packed row; got several rows")
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                prompts.append(embeds[0, start:end])
    else:
        prompts = list(embeds)
    return prompts


def check_prompt_positions(position_ids: torch.Tensor, shape: torch.Size, cu_seqlens=None) -> None:
    """Generation numbers each prompt's tokens 0..n-1: prompts are the rows of a (B, T) batch, or the
    samples of a packed row split at `cu_seqlens` (the last one running to T). `position_ids` (B, T) that
    say otherwise raise ValueError rather than being silently replaced."""
    length = shape[-1]
    bounds = [0, length] if cu_seqlens is None else [int(b) for b in cu_seqlens]
    if bounds[-1] < length:
        bounds.append(length)
    expected = torch.cat([torch.arange(end - start) for start, end in zip(bounds, bounds[1:])])
    if tuple(position_ids.shape) != tuple(shape) or not torch.equal(
        position_ids.detach().cpu().long(), expected.expand(shape[0], -1)
    ):
        raise ValueError(
            "position_ids: generate numbers every prompt from 0 (restarting at each cu_seqlens boundary, as "
            "processor.collate does); other positions are not supported, leave position_ids out"
        )


def _prefill(model, embeds, position_ids, ctx, cache, chunk_size):
    """Run the prompt through the LLM filling the KV cache; returns the last position's hidden state.

    With `chunk_size`, the prompt goes through in chunks (each attending to the cache and causally to
    itself), so the MLP and attention activations of only one chunk exist at a time: a 400K-token
    prompt needs activations for `chunk_size` tokens, not 400K (the KV cache itself is unavoidable).
    """
    length = embeds.shape[1]
    if not chunk_size or chunk_size >= length:
        return model._decoder(embeds, position_ids, ctx, cache=cache).last_hidden_state[:, -1]
    padding = ctx.key_padding
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        if padding is not None:
            ctx.key_padding = padding[:, :end]
        hidden = model._decoder(embeds[:, start:end], position_ids[:, start:end], ctx, cache=cache)
        hidden = hidden.last_hidden_state[:, -1]
    ctx.key_padding = padding
    return hidden


@dataclass(frozen=True)
class _Decoding:
    """How new tokens are chosen and when decoding stops: one value for every decoding path."""

    max_new_tokens: int
    end_ids: list[int]
    pad_token_id: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    streamer: Any = None

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        return _pick(logits, self.do_sample, self.temperature, self.top_k, self.top_p, self.generator)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator):
    """(B, V) logits -> (B,) tokens: argmax, or a sample under temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the probability mass before it already reaches top_p (keeps at least one).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        # A seeded CPU generator (ChatSession, the server) drawing for a GPU model: sample on its device.
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _end_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.config.extra.get("eos_token_id")
    if eos_token_id is None:
        eos_token_id = getattr(model.llm.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(x) for x in eos_token_id]


def generate_tokens(
    model,
    input_ids,
    *,
    pixel_values=None,
    cu_seqlens=None,
    max_new_tokens=32,
    do_sample=False,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    eos_token_id=None,
    pad_token_id=None,
    generator=None,
    streamer=None,
    sp=None,
    prefill_chunk_size=None,
    inputs_embeds=None,
) -> torch.Tensor:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    end_ids = _end_ids(model, eos_token_id)
    decoding = _Decoding(
        max_new_tokens=max_new_tokens,
        end_ids=end_ids,
        pad_token_id=pad_token_id if pad_token_id is not None else (end_ids[0] if end_ids else 0),
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        streamer=streamer,
    )
    if sp is not None and sp.sp_degree > 1:
        return _generate_sp(model, input_ids, pixel_values, cu_seqlens, sp, decoding, inputs_embeds)
    if inputs_embeds is not None:  # prompts already embedded (e.g. V-NIAH's spliced needle), one per row
        prompts = list(inputs_embeds[None] if inputs_embeds.ndim == 2 else inputs_embeds)
    else:
        prompts = _split_prompts(model, input_ids, pixel_values, cu_seqlens, None)
    device = model.device
    batch = len(prompts)
    longest = max(p.shape[0] for p in prompts)
    width = prompts[0].shape[-1]
    embeds = prompts[0].new_zeros(batch, longest, width)
    key_padding = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    lengths = torch.tensor([p.shape[0] for p in prompts], device=device)
    for row, prompt in enumerate(prompts):
        embeds[row, longest - prompt.shape[0] :] = prompt
        key_padding[row, longest - prompt.shape[0] :] = True
    position_ids = (torch.arange(longest, device=device)[None] - (longest - lengths)[:, None]).clamp(min=0)
    ctx = AttentionContext(key_padding=None if bool(key_padding.all()) else key_padding)
    cache = DynamicCache()
    hidden = _prefill(model, embeds, position_ids, ctx, cache, prefill_chunk_size)
    new_keys = None if ctx.key_padding is None else torch.ones(batch, 1, dtype=torch.bool, device=device)
    return _decode_loop(model, hidden, ctx, cache, lengths.clone(), new_keys, decoding)


def _decode_loop(model, hidden, ctx, cache, next_pos, new_keys, decoding: _Decoding):
    """Pick a token from each row's last hidden state, feed it back, repeat; (B, new tokens).

    `new_keys` (B, 1) is appended to the context's valid-key mask at every step (None: no mask).
    """
    head = model._head()
    embedding = model.llm.get_input_embeddings()
    streamer = decoding.streamer
    end = torch.tensor(decoding.end_ids, device=next_pos.device)
    finished = torch.zeros(hidden.shape[0], dtype=torch.bool, device=next_pos.device)
    new_tokens = []
    for _ in range(decoding.max_new_tokens):
        token = decoding.pick(head(hidden))
        token = torch.where(finished, torch.full_like(token, decoding.pad_token_id), token)
        new_tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        finished |= torch.isin(token, end)
        if bool(finished.all()):
            break
        if new_keys is not None:
            ctx.key_padding = torch.cat([ctx.key_padding, new_keys], 1)
        out = model._decoder(embedding(token[:, None]), next_pos[:, None], ctx, cache=cache)
        hidden = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    return torch.stack(new_tokens, dim=1)


def _generate_sp(model, input_ids, pixel_values, cu_seqlens, sp, decoding: _Decoding, inputs_embeds=None):
    """One prompt, prefilled with MM-SP; every rank decodes the same tokens.

    The prompt is padded to the layout's multiple (the padding is masked out as keys), each rank
    caches the K/V of its own zigzag shard, and new tokens' K/V are kept as valid keys on SP rank 0
    only, so the cross-rank merge counts every key exactly once. `inputs_embeds` (the same (1, T, D)
    or (T, D) on every rank, e.g. V-NIAH's spliced needle) replaces ids and pixels.
    """
    model.check_sp(sp)
    device = model.device
    if inputs_embeds is not None:
        embeds = _one_prompt(inputs_embeds, NotImplementedError).to(device)
        length = embeds.shape[1]
        embeds = _pad_for_layout(embeds, sp)
    else:
        input_ids = input_ids.to(device)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.shape[0] != 1 or (cu_seqlens is not None and len(cu_seqlens) > 2):
            raise NotImplementedError("sequence-parallel generation takes one prompt at a time")
        length = input_ids.shape[1]
        total = length + (-length) % sp.sequence_multiple
        if total > length:
            pad = torch.full((1, total - length), decoding.pad_token_id, dtype=input_ids.dtype, device=device)
            input_ids = torch.cat([input_ids, pad], dim=1)
        embeds = model.embed(input_ids, pixel_values, sp=sp)
    cache = DynamicCache()
    hidden, index, ctx = _sp_prefill(model, embeds, length, sp, cache)
    # The last prompt token lives on one rank; the sum over ranks hands its hidden state to every rank.
    last = _gather_positions(hidden, index, torch.tensor([length - 1], device=device), sp)
    ctx.key_padding = (index < length)[None]
    owns_new = torch.full((1, 1), sp.sp_rank == 0, dtype=torch.bool, device=device)
    next_pos = torch.full((1,), length, device=device)
    return _decode_loop(model, last, ctx, cache, next_pos, owns_new, decoding)


def _one_prompt(inputs_embeds, error: type[Exception]) -> torch.Tensor:
    """(T, D) or (1, T, D) embeddings of one prompt as (1, T, D); `error` for any other shape."""
    embeds = inputs_embeds[None] if inputs_embeds.ndim == 2 else inputs_embeds
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise error(
            f"one prompt at a time: inputs_embeds must be (1, T, D) or (T, D), got {tuple(inputs_embeds.shape)}"
        )
    return embeds


def _pad_for_layout(embeds, sp) -> torch.Tensor:
    """(1, T, D) zero-padded at the end to the SP layout's multiple (the padding is its own segment)."""
    length = embeds.shape[1]
    extra = (-length) % sp.sequence_multiple
    if not extra:
        return embeds
    return torch.cat([embeds, embeds.new_zeros(1, extra, embeds.shape[-1])], dim=1)


def _sp_prefill(model, embeds, length: int, sp, cache=None):
    """Decoder over this rank's zigzag shard of a (1, total, D) row whose first `length` positions
    are the prompt (the rest padding, kept out of attention as a separate segment).

    Returns (local hidden states (1, S, D), their global positions (S,), the attention context).
    """
    device = embeds.device
    total = embeds.shape[1]
    index = sp.local_positions(total, device=device)
    positions = torch.arange(total, device=device)[None]
    # Host bounds: the padding tail is its own segment; one unpadded prompt takes the plain causal path.
    ctx = AttentionContext(sp=sp, cu_seqlens=(0, length, total) if total > length else None)
    out = model._decoder(embeds.index_select(1, index), positions.index_select(1, index), ctx, cache=cache)
    return out.last_hidden_state, index, ctx


def _gather_positions(hidden, index, wanted, sp) -> torch.Tensor:
    """Hidden states (W, D) at global positions `wanted`, on every rank: each rank fills the rows
    it holds, zeros elsewhere, and the SP group sums (every position lives on exactly one rank)."""
    out = hidden.new_zeros(len(wanted), hidden.shape[-1])
    rows, cols = (wanted[:, None] == index[None, :]).nonzero(as_tuple=True)
    out[rows] = hidden[0, cols]
    return sp.all_reduce_sum(out)


@torch.no_grad()
def last_position_logits(model, inputs_embeds: torch.Tensor, last: int, sp=None) -> torch.Tensor:
    """Logits (last, V) at the final `last` positions of one prompt given as embeddings (1, T, D).

    Single process: one forward of the LLM keeping only those logits. Under `sp` (degree > 1) the
    prompt is prefilled with MM-SP, as in generation, and every rank returns the same logits; the
    same embeddings must be given on every rank. Used by V-NIAH's teacher-forced score.
    """
    embeds = _one_prompt(inputs_embeds, ValueError)
    length = embeds.shape[1]
    if not 1 <= last <= length:
        raise ValueError(f"last must be in [1, {length}] for a {length}-token prompt, got {last}")
    embeds = embeds.to(model.device)
    if sp is None or sp.sp_degree == 1:
        return model.llm(inputs_embeds=embeds, use_cache=False, logits_to_keep=last).logits[0]
    model.check_sp(sp)
    hidden, index, _ = _sp_prefill(model, _pad_for_layout(embeds, sp), length, sp)
    wanted = torch.arange(length - last, length, device=embeds.device)
    return model._head()(_gather_positions(hidden, index, wanted, sp))
