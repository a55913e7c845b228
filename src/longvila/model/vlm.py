"""LongVILA: vision tower -> mlp_downsample projector -> causal LLM, over packed token rows.

The processor expands every frame into `tokens_per_frame` copies of the `<image>` id followed by the id
of "\\n", so `input_ids` already has the final sequence length: the model only replaces the embeddings at
the `<image>` positions with the frames' projected features, in order.

Sequence parallelism enters as a strategy object `sp` (see `longvila.parallel`); this module never imports
torch.distributed. Shapes: B rows, T tokens, F frames, P tokens per frame, D LLM width.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from longvila.config import LongVILAConfig
from longvila.model.attention import AttentionContext, register_attention
from longvila.model.loss import IGNORE_INDEX, chunked_cross_entropy_sum, shift_labels
from longvila.model.projector import build_projector
from longvila.model.vision import VisionTower

# Prompts longer than this are prefilled in chunks of this many tokens by default: one MLP
# intermediate tensor of a 7B model (18,944 wide, bf16) is 0.6 GB for 16K tokens, 15 GB for a
# 400K-token prompt in one pass. What chunking costs in time on a GPU is still to be measured (benchmarks/prefill.py --chunk).
DEFAULT_PREFILL_CHUNK = 16384


@dataclass
class LongVILAOutput:
    loss: torch.Tensor | None = None
    """Mean cross entropy over supervised tokens (the global mean under sequence parallelism)."""
    logits: torch.Tensor | None = None
    """(B, T, V) logits; only computed when no labels are given or `return_logits=True`."""
    num_supervised: int = 0
    """Supervised tokens behind `loss`."""


def build_llm(llm_config: dict[str, Any], attn_implementation: str) -> nn.Module:
    data = dict(llm_config)
    model_type = data.pop("model_type")
    config = AutoConfig.for_model(model_type, **data)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def _packed_bounds(cu_seqlens, batch: int, length: int) -> tuple[int, ...] | None:
    """Host tuple (0, ..., T) of a packed row's sample bounds, read once per batch (every layer's
    attention reuses it without a device sync); None for one sample per row."""
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError("cu_seqlens describes one packed row; got a batch of several rows")
    bounds = tuple(int(x) for x in torch.as_tensor(cu_seqlens).reshape(-1).tolist())
    if (
        len(bounds) < 2
        or bounds[0] != 0
        or bounds[-1] != length
        or any(b < a for a, b in zip(bounds, bounds[1:]))
    ):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at {length}, got {list(bounds)}"
        )
    return bounds if len(bounds) > 2 else None


class LongVILA(nn.Module):
    def __init__(
        self,
        config: LongVILAConfig,
        *,
        llm: nn.Module | None = None,
        vision_tower: VisionTower | None = None,
        mm_projector: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if config.image_token_id is None:
            raise ValueError(
                "config.image_token_id is not set (build the config with the processor's tokenizer)"
            )
        if config.attn_implementation == "longvila":
            register_attention()
        self.config = config
        self.vision_tower = vision_tower or VisionTower.from_config(
            config.vision, config.vision_select_layer, config.vision_micro_batch
        )
        self.mm_projector = mm_projector or build_projector(config)
        self.llm = llm if llm is not None else build_llm(config.llm, config.attn_implementation)
        if llm is not None and config.attn_implementation == "longvila":
            self.llm.set_attn_implementation("longvila")
        decoder_params = inspect.signature(self.llm.get_decoder().forward).parameters
        self._cache_kwarg = "cache" if "cache" in decoder_params else "past_key_values"

    # ---- construction helpers (checkpoint.py does the file work) -------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, projector_order: str | None = None
    ) -> LongVILA:
        """Load our own checkpoint directory, the official LongVILA/VILA layout (2024-08 or NVILA era,
        remote-code `vila` included) or the NVILA `-hf` layout. `projector_order` ("column"/"row")
        overrides the 2x2 token order the loader would choose (docs/checkpoints.md)."""
        from longvila.model.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, projector_order=projector_order)

    @classmethod
    def from_parts(cls, llm_path: str | Path, vision_tower_path: str | Path, **config_overrides) -> LongVILA:
        """Compose a model from local Hugging Face checkpoints of an LLM and a SigLIP tower; fresh projector."""
        from longvila.model.checkpoint import compose_from_parts

        return compose_from_parts(cls, llm_path, vision_tower_path, **config_overrides)

    def save_pretrained(self, path: str | Path, *, processor=None, max_shard_size: str | int = "5GB") -> None:
        from longvila.model.checkpoint import save_pretrained

        save_pretrained(self, path, processor=processor, max_shard_size=max_shard_size)

    # ---- the pieces ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) normalised frames -> (F, P, D) LLM embeddings (vision tower + projector)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (frames, 3, H, W), got {tuple(pixel_values.shape)}")
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"pixel_values must be {size}x{size} (the processor resizes), got {tuple(pixel_values.shape)}"
            )
        features = self.vision_tower(pixel_values.to(self.device))
        return self.mm_projector(features.to(self.mm_projector.layers[2].weight.dtype))

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, sp=None
    ) -> torch.Tensor:
        """Text embeddings with each frame's tokens spliced in at the `<image>` positions: (B, T, D).

        Under `sp`, each rank encodes only its share of the frames (stage 1 of MM-SP) and the strategy
        gathers them differentiably.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        num_image_tokens = int(is_image.sum())
        frames = 0 if pixel_values is None else pixel_values.shape[0]
        expected = frames * self.config.tokens_per_frame
        if num_image_tokens != expected:
            raise ValueError(
                f"input_ids hold {num_image_tokens} <image> tokens but pixel_values has {frames} frames "
                f"x {self.config.tokens_per_frame} tokens = {expected}"
            )
        # Under a parallel strategy every rank must give every trainable parameter a gradient, or the
        # ranks' gradient reductions (FSDP2 reduce-scatters) stop matching; a rank with no frame to encode
        # runs the tower on one blank frame at zero weight instead.
        keep_vision_in_graph = sp is not None and self.training and torch.is_grad_enabled()
        if frames == 0:
            return self._touch_vision(embeds) if keep_vision_in_graph else embeds
        if sp is not None and sp.sp_degree > 1:
            local = sp.split_frames(pixel_values)
            local_embeds = self.encode_frames(local)
            if local.shape[0] == 0 and keep_vision_in_graph:
                local_embeds = self._touch_vision(local_embeds)
            frame_embeds = sp.gather_frames(local_embeds, total=frames)
        else:
            frame_embeds = self.encode_frames(pixel_values)
        flat = frame_embeds.reshape(-1, frame_embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(is_image[..., None], flat)

    def _touch_vision(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` plus zero times the vision path on one blank frame: same values, and the vision tower
        and projector take part in backward (with zero gradients)."""
        size = self.config.image_size
        blank = torch.zeros(
            1, 3, size, size, device=self.device, dtype=self.mm_projector.layers[2].weight.dtype
        )
        return tensor + 0.0 * self.encode_frames(blank).sum().to(tensor.dtype)

    def _decoder(self, embeds: torch.Tensor, position_ids: torch.Tensor, ctx: AttentionContext, cache=None):
        kwargs = {"inputs_embeds": embeds, "position_ids": position_ids, "longvila_ctx": ctx}
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        return self.llm.get_decoder()(**kwargs)

    def _head(self) -> nn.Linear:
        return self.llm.get_output_embeddings()

    # ---- training forward ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        sp=None,
        return_logits: bool = False,
        loss_chunk_size: int = 4096,
        attention_mask: torch.Tensor | None = None,
    ) -> LongVILAOutput:
        """Packed rows -> mean loss over supervised tokens (and logits on request).

        input_ids, labels, position_ids: (B, T); cu_seqlens: (n + 1,) int32 boundaries of the packed
        samples (B = 1) or None; pixel_values: (F, 3, S, S). `attention_mask` (B, T), as Hugging Face
        tokenizers return it, is accepted only without padding (all ones): padding and packing are told by
        `cu_seqlens` (`processor.collate` builds it), never by a mask.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got {tuple(input_ids.shape)}")
        _check_no_padding_mask(attention_mask)
        if sp is not None:
            self.check_sp(sp)
        batch, length = input_ids.shape
        device = self.device
        input_ids = input_ids.to(device)
        if position_ids is None:
            position_ids = torch.arange(length, device=device).expand(batch, -1)
        position_ids = position_ids.to(device)
        bounds = _packed_bounds(cu_seqlens, batch, length)
        embeds = self.embed(input_ids, pixel_values, sp=sp)
        if labels is not None:
            targets = shift_labels(labels.to(device))
            if bounds is not None:
                # Never predict the first token of the next sample from the last token of this one.
                last_tokens = [end - 1 for end in bounds[1:-1] if 0 < end < length]
                targets[:, last_tokens] = IGNORE_INDEX
        if sp is not None and sp.sp_degree > 1:
            return self._forward_sp(
                embeds,
                position_ids,
                bounds,
                targets if labels is not None else None,
                sp,
                return_logits,
                loss_chunk_size,
            )
        ctx = AttentionContext(cu_seqlens=bounds)
        hidden = self._decoder(embeds, position_ids, ctx).last_hidden_state
        return self._outputs(hidden, targets if labels is not None else None, return_logits, loss_chunk_size)

    def _outputs(self, hidden, targets, return_logits, loss_chunk_size, sp=None) -> LongVILAOutput:
        out = LongVILAOutput()
        head = self._head()
        if targets is None or return_logits:
            out.logits = head(hidden)
            if sp is not None:
                out.logits = sp.gather(out.logits, dim=1)
        if targets is not None:
            flat_targets = targets.reshape(-1)
            count = int((flat_targets != IGNORE_INDEX).sum())
            total = chunked_cross_entropy_sum(
                hidden.reshape(-1, hidden.shape[-1]), head.weight, flat_targets, head.bias, loss_chunk_size
            )
            if sp is not None:
                out.loss, out.num_supervised = sp.reduce_loss(total, count)
            else:
                out.loss, out.num_supervised = total / max(count, 1), count
        return out

    def check_sp(self, sp) -> None:
        """Fail before any work when the LLM's heads do not fit the sequence-parallel layout."""
        config = self.llm.config
        heads = config.num_attention_heads
        sp.check_model(heads, getattr(config, "num_key_value_heads", None) or heads)

    def _forward_sp(self, embeds, position_ids, bounds, targets, sp, return_logits, loss_chunk_size):
        """Stage 2 of MM-SP: shard the full sequence by tokens (2D zigzag) and run the LLM on the shard.

        The targets were shifted on the full sequence, so a shard's last token keeps its target even
        though that token lives on another rank.
        """
        total = embeds.shape[1]
        sp.check_sequence(total)
        index = sp.local_positions(total, device=embeds.device)
        local_embeds = sp.shard(embeds, dim=1)
        local_positions = position_ids.index_select(1, index)
        # One sample (bounds None) takes the plain causal fused path: no boundaries, no pieces.
        ctx = AttentionContext(sp=sp, cu_seqlens=bounds)
        hidden = self._decoder(local_embeds, local_positions, ctx).last_hidden_state
        local_targets = targets.index_select(1, index) if targets is not None else None
        return self._outputs(hidden, local_targets, return_logits, loss_chunk_size, sp=sp)

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
        sp=None,
        prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Continue every prompt of the (packed) batch; returns (num prompts, new tokens) LongTensor.

        Prompts are the samples of a packed row (split at `cu_seqlens`) or the rows of `input_ids`.
        Greedy by default; `do_sample=True` samples with temperature / top-k / top-p. Decoding stops at
        `eos_token_id` (the model config's end ids by default); finished prompts are padded with
        `pad_token_id`. `streamer` (HF-style, with `put(ids)` and `end()`) receives each new token.
        `prefill_chunk_size` prefills long prompts chunk by chunk (same tokens, a fraction of the
        activation memory: how a 2,048-frame, 400K-token prompt fits one GPU); the default,
        DEFAULT_PREFILL_CHUNK (16,384 tokens), touches only longer prompts; None prefills in one
        pass. `inputs_embeds` (B, T, D) replaces `input_ids`/`pixel_values` with prompts already
        embedded (one per row, no padding).

        A collated batch passes as `**batch`: its `labels` play no part in generation, and its
        `position_ids` must be the ones generation uses, each prompt at 0..n-1 (restarting at every
        `cu_seqlens` boundary, as `processor.collate` numbers them); other positions raise ValueError.
        `attention_mask` is accepted only without padding, as in `forward`.
        """
        from longvila.model.generation import check_prompt_positions, generate_tokens

        _check_no_padding_mask(attention_mask)
        if position_ids is not None:
            tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]
            check_prompt_positions(position_ids, tokens.shape, cu_seqlens)

        return generate_tokens(
            self,
            input_ids,
            pixel_values=pixel_values,
            cu_seqlens=cu_seqlens,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            generator=generator,
            streamer=streamer,
            sp=sp,
            prefill_chunk_size=prefill_chunk_size,
            inputs_embeds=inputs_embeds,
        )


def _check_no_padding_mask(attention_mask: torch.Tensor | None) -> None:
    """A Hugging Face style mask is welcome only when it masks nothing (see `LongVILA.forward`)."""
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise ValueError(
            "attention_mask masks some tokens: longvila takes padding and packed samples as cu_seqlens "
            "(processor.collate builds it), not as an attention mask"
        )
