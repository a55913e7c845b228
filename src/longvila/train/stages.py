"""What each of LongVILA's five training stages trains (docs/reference.md, "The five training stages").

| stage | trainable |
|---|---|
| 1 alignment | projector |
| 2 pre-training | projector + LLM |
| 3 short SFT | everything |
| 4 context extension | LLM through LoRA (q/k/v/o) + embeddings + norms; RoPE base raised; text only |
| 5 long SFT | everything |
| 6 RL (GRPO) | the LLM (vision tower and projector frozen: a video's embeddings are computed once) |

Stage 4 follows LongLoRA's recipe as LongVILA releases it: LoRA r=8, alpha=16 on the attention
projections, and the embeddings and RMSNorm weights trained in full; the adapters are merged into the
weights (peft `merge_and_unload`) before export, so later stages and inference see a plain model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

STAGE_NAMES = {
    1: "alignment",
    2: "pre-training",
    3: "short SFT",
    4: "context extension",
    5: "long SFT",
    6: "RL (GRPO)",
}
STAGE4_FULL_PARAMS = ("embed_tokens", "lm_head", "norm")
"""Name fragments of LLM parameters trained in full during stage 4 (embeddings, LM head, RMSNorms)."""


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (shared tensors once)."""
    seen: dict[int, bool] = {}
    for param in model.parameters():
        seen[id(param)] = param.requires_grad
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    trainable = sum(params[i].numel() for i, flag in seen.items() if flag)
    return trainable, total


# ---- RoPE ----------------------------------------------------------------------------------------
def set_rope_theta(model, theta: float, max_length: int | None = None) -> int:
    """Raise the LLM's RoPE base to `theta` and recompute the rotary inverse frequencies.

    transformers >= 5 keeps the base in `config.rope_parameters["rope_theta"]` (older versions in
    `config.rope_theta`); both are set, in the live HF config and in `model.config.llm` so that the
    exported checkpoint carries it. Returns the number of rotary modules updated.
    """
    llm_config = model.llm.config
    params = dict(getattr(llm_config, "rope_parameters", None) or {})
    params["rope_theta"] = float(theta)
    params.setdefault("rope_type", "default")
    llm_config.rope_parameters = params
    if hasattr(llm_config, "rope_theta"):
        llm_config.rope_theta = float(theta)
    model.config.llm["rope_theta"] = float(theta)
    if isinstance(model.config.llm.get("rope_parameters"), dict):
        model.config.llm["rope_parameters"] = dict(params)
    if max_length is not None and max_length > int(getattr(llm_config, "max_position_embeddings", 0)):
        llm_config.max_position_embeddings = int(max_length)
        model.config.llm["max_position_embeddings"] = int(max_length)
    updated = 0
    for module in model.llm.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq"):
            fresh = type(module)(llm_config)
            device = module.inv_freq.device
            module.inv_freq = fresh.inv_freq.to(device)
            module.original_inv_freq = fresh.original_inv_freq.to(device)
            module.attention_scaling = fresh.attention_scaling
            module.max_seq_len_cached = fresh.max_seq_len_cached
            module.original_max_seq_len = fresh.original_max_seq_len
            module.config = llm_config
            updated += 1
    if updated == 0:
        raise ValueError(f"{type(model.llm).__name__}: no rotary embedding module with inv_freq found")
    return updated


def rope_theta(model) -> float:
    params = getattr(model.llm.config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(model.llm.config, "rope_theta", 0.0)))


# ---- LoRA ----------------------------------------------------------------------------------------
def attach_lora(model, *, rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> None:
    """Wrap `model.llm` with peft LoRA adapters on `targets`; only adapters, embeddings, LM head and
    norms stay trainable in the LLM."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
    )
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`; the warning is not ours.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model.llm = get_peft_model(model.llm, config)
    except ValueError as exc:
        raise ValueError(f"stage.lora_targets {targets}: {exc}") from exc
    for name, param in model.llm.named_parameters():
        if "lora_" in name or any(part in name for part in STAGE4_FULL_PARAMS):
            param.requires_grad_(True)


def has_lora(model) -> bool:
    return hasattr(model.llm, "merge_and_unload")


def merge_lora(model) -> None:
    """Fold the adapters into the base weights (peft merge_and_unload) and drop the peft wrapper."""
    if has_lora(model):
        model.llm = model.llm.merge_and_unload()


# ---- stages --------------------------------------------------------------------------------------
def apply_stage(model, stage: Any) -> None:
    """Set what trains for `stage` (a StageSection or anything with the same fields) in place."""
    number = int(stage.number)
    if number not in STAGE_NAMES:
        raise ValueError(f"stage {number} is not one of {sorted(STAGE_NAMES)}")
    set_trainable(model, False)
    if stage.rope_theta is not None or stage.max_length is not None:
        theta = stage.rope_theta if stage.rope_theta is not None else rope_theta(model)
        set_rope_theta(model, theta, stage.max_length)
    if number == 1:
        set_trainable(model.mm_projector, True)
    elif number == 2:
        set_trainable(model.mm_projector, True)
        set_trainable(model.llm, True)
    elif number in (3, 5):
        set_trainable(model, True)
    elif number == 6:
        # Frozen vision: the embedding cache stays valid across rollouts, steps and epochs.
        set_trainable(model.llm, True)
    else:
        attach_lora(
            model,
            rank=stage.lora_rank,
            alpha=stage.lora_alpha,
            targets=list(stage.lora_targets),
            dropout=stage.lora_dropout,
        )
    model.config.extra["stage"] = number


def finish_stage(model, stage: Any) -> None:
    """End-of-stage work before export: merge stage 4's adapters."""
    if has_lora(model) and getattr(stage, "merge_lora", True):
        merge_lora(model)
    set_trainable(model, True)


@torch.no_grad()
def trainable_summary(model) -> dict[str, int]:
    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "total_params": total}
