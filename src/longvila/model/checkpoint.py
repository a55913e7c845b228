"""Checkpoints: our own directory format, the official LongVILA/VILA split layout (2024-08 release,
NVILA era, and the remote-code `vila` release of LongVILA-R1) and the NVILA `-hf` layout; reading and
writing all three (docs/checkpoints.md).

Own format (`save_pretrained`): `config.json` (LongVILAConfig), `model.safetensors` or shards with
`model.safetensors.index.json`, plus the processor's tokenizer and `processor_config.json`. Keys are
`llm.<HF causal LM key>`, `vision_tower.vision_model.<HF SigLIP key>`, `mm_projector.layers.{1,2,4}.*`.
Tied LM-head weights are stored once. The directory is written under a temporary name, then renamed.

Official layout: `llm/` (HF causal LM + tokenizer), `vision_tower/` (HF SigLIP + image processor),
`mm_projector/` (`config.json` with `mm_projector_type`, weights `layers.<i>.*` at the release's module
indices), and a top `config.json` with `llm_cfg`, `vision_tower_cfg`, `mm_projector_cfg`,
`mm_vision_select_layer` (the remote-code release adds `model_type` "vila", `auto_map` and a
`config_vila_style.json`).

NVILA `-hf` layout (what SGLang serves): one `config.json` with `model_type` "nvila", `text_config`,
`vision_config`, `image_token_id`, `video_token_id`; weights `llm.*`, `vision_tower.vision_model.*`,
`mm_projector.layers.*` (the same keys as our format); the tokenizer at the top.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from longvila.config import IMAGE_TOKEN, LongVILAConfig
from longvila.files import write_dir_atomically
from longvila.model.layouts import (
    CheckpointError,
    check_supported,
    decide_token_order,
    projector_type_of,
    read_json,
    read_top_configs,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
VISION_PREFIX = "vision_model."


__all__ = ["CheckpointError", "detect_layout", "load_pretrained", "processor_settings", "save_pretrained"]

# LongVILAConfig fields that neither foreign layout has a key for; kept under "longvila" in their top
# config so that a round trip through them is lossless.
EXTRA_FIELDS = ("vision_micro_batch", "attn_implementation", "extra")


# ---- key canonicalisation -----------------------------------------------------------------------
def vision_keys_to_canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SigLIP keys as Hugging Face has long written them (`vision_model.` prefix), whatever the
    installed transformers version names them in memory."""
    return {k if k.startswith(VISION_PREFIX) else VISION_PREFIX + k: v for k, v in state.items()}


def _vision_keys_to_module(state: dict[str, torch.Tensor], module_keys: set[str]) -> dict[str, torch.Tensor]:
    if any(k.startswith(VISION_PREFIX) for k in module_keys):
        return vision_keys_to_canonical(state)
    return {k.removeprefix(VISION_PREFIX): v for k, v in state.items()}


def model_state_for_saving(model) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, value in model.llm.state_dict().items():
        pointer = value.data_ptr()
        if pointer in seen and value.numel() > 0:
            continue  # tied weights (lm_head = embed_tokens) are stored once
        seen[pointer] = key
        state["llm." + key] = value
    for key, value in vision_keys_to_canonical(model.vision_tower.model.state_dict()).items():
        state["vision_tower." + key] = value
    for key, value in model.mm_projector.state_dict().items():
        state["mm_projector." + key] = value
    return {k: v.detach().contiguous() for k, v in state.items()}


# ---- writing --------------------------------------------------------------------------------------
def check_processor_matches(model, processor) -> None:
    """A processor saved with a model must lay out as many tokens per frame, at the same size."""
    if processor is None:
        return
    config = model.config
    if (processor.tokens_per_frame, processor.image_size) != (config.tokens_per_frame, config.image_size):
        raise ValueError(
            f"the processor makes {processor.tokens_per_frame} tokens per {processor.image_size} px frame but the "
            f"model {config.tokens_per_frame} per {config.image_size} px frame ({config.projector_type})"
        )


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int) -> None:
    """`model.safetensors`, or shards and `model.safetensors.index.json` when over `max_shard_size`."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def sync_llm_config(model) -> dict[str, Any]:
    """The LLM's live Hugging Face config as a dict (with model_type), stored back into model.config."""
    llm = {**model.llm.config.to_dict(), "model_type": model.llm.config.model_type}
    llm.pop("_attn_implementation_autoset", None)
    model.config.llm = llm
    return llm


def save_pretrained(model, path: str | Path, *, processor=None, max_shard_size: str | int = "5GB") -> None:
    """Our format (module docstring), written under a temporary name and renamed into place."""
    check_processor_matches(model, processor)

    def write(tmp: Path) -> None:
        sync_llm_config(model)
        if processor is not None:  # the processor owns the stop ids; `generate` defaults to them
            model.config.extra = {**model.config.extra, "eos_token_id": processor.stop_token_ids}
        model.config.save(tmp / CONFIG_NAME)
        write_weights(model_state_for_saving(model), tmp, max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)

    write_dir_atomically(path, write)


# ---- reading --------------------------------------------------------------------------------------
def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / INDEX_NAME).exists():
        index = json.loads((path / INDEX_NAME).read_text())
        state: dict[str, torch.Tensor] = {}
        for filename in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(path / filename)))
        return state
    if (path / WEIGHTS_NAME).exists():
        return load_file(str(path / WEIGHTS_NAME))
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def load_into(
    module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, *, allow_missing=()
) -> None:
    """`load_state_dict` with errors that name the tensor, its expected and its found shape."""
    expected = module.state_dict()
    for key, value in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint but the model "
                f"expects {tuple(expected[key].shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if k not in allow_missing)
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    module.load_state_dict(state, strict=False)


def _tied_keys(llm) -> set[str]:
    if not getattr(llm.config, "tie_word_embeddings", False):
        return set()
    return {k for k in llm.state_dict() if k.startswith("lm_head.")}


def load_own(model_cls, path: Path, dtype: torch.dtype | None = None, projector_order: str | None = None):
    try:
        data = read_json(path / CONFIG_NAME)
        if projector_order is not None:
            data["projector_token_order"] = projector_order
        config = LongVILAConfig.from_dict(data)
    except ValueError as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: {exc}") from exc
    return _load_model_weights(model_cls, config, path, dtype)


def _load_model_weights(model_cls, config: LongVILAConfig, path: Path, dtype: torch.dtype | None):
    """A `model_cls` (LongVILA) built from `config` with the `llm.* / vision_tower.* / mm_projector.*`
    weights of `path`."""
    model = model_cls(config)
    state = _read_weights(path)
    _check_projector_width(state, "mm_projector.layers.1.weight", model.mm_projector, path)
    parts: dict[str, dict[str, torch.Tensor]] = {"llm": {}, "vision_tower": {}, "mm_projector": {}}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise CheckpointError(f"{path}: tensor {key!r} belongs to no part of the model")
        parts[prefix][rest] = value
    load_into(model.llm, parts["llm"], f"{path} (llm)", allow_missing=_tied_keys(model.llm))
    vision_keys = set(model.vision_tower.model.state_dict())
    load_into(
        model.vision_tower.model,
        _vision_keys_to_module(parts["vision_tower"], vision_keys),
        f"{path} (vision_tower)",
    )
    load_into(model.mm_projector, parts["mm_projector"], f"{path} (mm_projector)")
    model.llm.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model


# ---- the official split layout (read) --------------------------------------------------------------
def _is_official(path: Path) -> bool:
    return all((path / part).is_dir() for part in ("llm", "vision_tower", "mm_projector"))


def _vision_config(path: Path):
    """The SigLIP config of a vision folder; anything else fails naming the file."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    config = getattr(config, "vision_config", config)
    if config.model_type != "siglip_vision_model":
        raise CheckpointError(
            f"{path / CONFIG_NAME}: model_type = {config.model_type!r} is not supported (SigLIP vision towers only)"
        )
    return config


def _preprocessor_settings(file: Path) -> dict[str, Any]:
    """image_mean / image_std of a Hugging Face `preprocessor_config.json` (SigLIP's 0.5 when absent)."""
    settings: dict[str, Any] = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    if file.exists():
        data = read_json(file)
        for key in ("image_mean", "image_std"):
            if data.get(key) is not None:
                settings[key] = list(data[key])
        resample = data.get("resample", 3)
        if resample != 3:  # PIL's BICUBIC, the only resampling the processor implements
            raise CheckpointError(f"{file}: resample = {resample!r} is not supported (3, bicubic, only)")
    return settings


def _official_layout_settings(path: Path, projector_order: str | None) -> dict[str, Any]:
    """Everything about a split-layout checkpoint except its weights: checked configs, projector type
    and token order, selected layer, normalisation, frames."""
    tops = read_top_configs(path)
    vision = _vision_config(path / "vision_tower")
    check_supported(tops, vision.image_size)
    _check_mm_hidden_size(tops, vision.hidden_size)
    projector_type, _ = projector_type_of(path, tops)
    order = decide_token_order(projector_type, tops, projector_order, path)
    top = {k: v for _, data in reversed(tops) for k, v in data.items()}  # config.json wins
    return {
        "vision": vision,
        "projector_type": projector_type,
        "token_order": order.order,
        "select_layer": int(top["mm_vision_select_layer"])
        if top.get("mm_vision_select_layer") is not None
        else -2,
        "num_frames": top.get("num_video_frames"),
        "longvila": top.get("longvila") or {},
        **_preprocessor_settings(path / "vision_tower" / "preprocessor_config.json"),
    }


def _tokenizer_image_id(tokenizer_path: Path) -> int:
    from longvila.text.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path).convert_tokens_to_ids(IMAGE_TOKEN)


def _assemble(model_cls, llm, vision_model, projector, *, image_token_id: int, settings: dict):
    from longvila.model.vision import VisionTower

    vision_config = {**vision_model.config.to_dict(), "model_type": "siglip_vision_model"}
    llm_config = {**llm.config.to_dict(), "model_type": llm.config.model_type}
    extras = {k: v for k, v in settings.get("longvila", {}).items() if k in EXTRA_FIELDS}
    config = LongVILAConfig(
        llm=llm_config,
        vision=vision_config,
        projector_type=settings.get("projector_type", "mlp_downsample"),
        projector_token_order=settings.get("token_order"),
        vision_select_layer=settings.get("select_layer", -2),
        image_token_id=image_token_id,
        image_mean=tuple(settings.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(settings.get("image_std", (0.5, 0.5, 0.5))),
        **extras,
    )
    tower = VisionTower(vision_model, config.vision_select_layer, config.vision_micro_batch)
    if projector is None:
        from longvila.model.projector import build_projector

        projector = build_projector(config).to(next(llm.parameters()).dtype)
    return model_cls(config, llm=llm, vision_tower=tower, mm_projector=projector)


def _load_hf_parts(llm_path: Path, vision_path: Path, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    from longvila.model.attention import register_attention

    register_attention()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    llm = AutoModelForCausalLM.from_pretrained(str(llm_path), attn_implementation="longvila", **kwargs)
    vision = SiglipVisionModel.from_pretrained(str(vision_path), **kwargs)
    return llm, vision


def load_official(
    model_cls, path: Path, dtype: torch.dtype | None = None, projector_order: str | None = None
):
    """The split layout: llm/ and vision_tower/ through transformers (their own configs, RoPE scaling
    included), mm_projector/ by the rule of `longvila.model.layouts`."""
    from longvila.model.projector import DownsampleProjector

    settings = _official_layout_settings(path, projector_order)
    llm, vision = _load_hf_parts(path / "llm", path / "vision_tower", dtype)
    projector = DownsampleProjector(
        vision.config.hidden_size, llm.config.hidden_size, settings["projector_type"], settings["token_order"]
    )
    state = _read_weights(path / "mm_projector")
    _check_projector_width(state, "layers.1.weight", projector, path / "mm_projector")
    load_into(projector, state, str(path / "mm_projector"))
    projector.to(next(llm.parameters()).dtype)
    return _assemble(
        model_cls, llm, vision, projector, image_token_id=_tokenizer_image_id(path / "llm"), settings=settings
    )


def _check_mm_hidden_size(tops: list[tuple[Path, dict[str, Any]]], vision_width: int) -> None:
    """`mm_hidden_size` other than the tower's width means multi-scale (S2) features: 3 x 1152 in NVILA-8B."""
    for file, data in tops:
        mm_hidden = data.get("mm_hidden_size")
        if mm_hidden is not None and int(mm_hidden) != vision_width:
            raise CheckpointError(
                f"{file}: mm_hidden_size = {mm_hidden!r} is not supported: it is not the vision tower's width "
                f"{vision_width} (multi-scale S2 features)"
            )


def _check_projector_width(state, key: str, projector, where: Path) -> None:
    """A first LayerNorm wider than k*k x the tower's width is NVILA's multi-scale (S2) input: say so."""
    expected = projector.layers[1].weight.shape[0]
    found = state.get(key)
    if found is not None and found.shape[0] != expected and found.shape[0] % expected == 0:
        raise CheckpointError(
            f"{where}: tensor {key!r} has width {found.shape[0]} = {found.shape[0] // expected} x the "
            f"single-scale width {expected}: multi-scale (S2 / dynamic-S2) vision features are not supported"
        )


def compose_from_parts(
    model_cls, llm_path, vision_tower_path, *, select_layer: int = -2, dtype=None, **overrides
):
    """A model from a local HF causal LM and a SigLIP checkpoint, with a fresh projector (`overrides`:
    `projector_type`, `token_order`)."""
    llm_path, vision_tower_path = Path(llm_path), Path(vision_tower_path)
    for part in (llm_path, vision_tower_path):
        if not (part / CONFIG_NAME).exists():
            raise CheckpointError(
                f"{part}: no config.json (a local Hugging Face checkpoint directory is needed)"
            )
    llm, vision = _load_hf_parts(llm_path, vision_tower_path, dtype)
    settings = {"select_layer": select_layer, **overrides}
    settings.update(_preprocessor_settings(vision_tower_path / "preprocessor_config.json"))
    return _assemble(
        model_cls, llm, vision, None, image_token_id=_tokenizer_image_id(llm_path), settings=settings
    )


# ---- the NVILA -hf layout (read) -------------------------------------------------------------------
def _hf_config(path: Path, projector_order: str | None) -> LongVILAConfig:
    file = path / CONFIG_NAME
    data = read_json(file)
    for key in ("text_config", "vision_config"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"{file}: model_type 'nvila' needs a {key} object")
    vision = {**data["vision_config"], "model_type": "siglip_vision_model"}
    check_supported([(file, data)], int(vision.get("image_size", 224)))
    _check_mm_hidden_size([(file, data)], int(vision.get("hidden_size", 0)))
    projector_type = data.get("mm_projector_type", "mlp_downsample")
    tops = [(file, data)]
    if projector_order is None and "projector_token_order" not in data:
        # The layout's reference implementation (SGLang's nvila) merges row-major.
        tops = [(file, {**data, "projector_token_order": "row"})]
    order = decide_token_order(projector_type, tops, projector_order, path)
    text = dict(data["text_config"])
    text.setdefault("model_type", "qwen2")
    extras = {k: v for k, v in (data.get("longvila") or {}).items() if k in EXTRA_FIELDS}
    settings = _preprocessor_settings(path / "preprocessor_config.json")
    try:
        return LongVILAConfig(
            llm=text,
            vision=vision,
            projector_type=projector_type,
            projector_token_order=order.order,
            vision_select_layer=int(data.get("mm_vision_select_layer", -2)),
            image_token_id=data.get("image_token_id"),
            image_mean=tuple(settings["image_mean"]),
            image_std=tuple(settings["image_std"]),
            **extras,
        )
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def load_hf(model_cls, path: Path, dtype: torch.dtype | None = None, projector_order: str | None = None):
    config = _hf_config(path, projector_order)
    if config.image_token_id is None or config.image_token_id < 0:
        config.image_token_id = _tokenizer_image_id(path)
    return _load_model_weights(model_cls, config, path, dtype)


# ---- dispatch --------------------------------------------------------------------------------------
def detect_layout(path: Path) -> str:
    """`longvila`, `nvila_hf` or `official` (split layout, remote-code `vila` included)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory, this is a file")
    config_file = path / CONFIG_NAME
    model_type = read_json(config_file).get("model_type") if config_file.exists() else None
    if model_type == "longvila":
        return "longvila"
    if model_type == "nvila":
        return "nvila_hf"
    if _is_official(path):
        return "official"
    found = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(
        f"{path}: not a known checkpoint layout: expected config.json with model_type 'longvila' "
        f"(longvila format) or 'nvila' (NVILA -hf), or llm/, vision_tower/ and mm_projector/ "
        f"(official LongVILA/VILA layout); found {found}"
    )


def load_pretrained(
    model_cls, path: str | Path, *, dtype: torch.dtype | None = None, projector_order: str | None = None
):
    """A `model_cls` (LongVILA, passed in so that this module never imports the model it builds) from any
    layout `detect_layout` knows; `projector_order` overrides the 2x2 token order."""
    path = Path(path)
    layout = detect_layout(path)
    loader = {"longvila": load_own, "nvila_hf": load_hf, "official": load_official}[layout]
    return loader(model_cls, path, dtype, projector_order)


def processor_settings(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(tokenizer folder, LongVILAProcessor keyword arguments) of a foreign layout, weights unread."""
    from longvila.model.projector import projector_block

    path = Path(path)
    layout = detect_layout(path)
    if layout == "nvila_hf":
        config = _hf_config(path, None)
        size, tokens = config.image_size, config.tokens_per_frame
        mean, std, frames, tokenizer = config.image_mean, config.image_std, None, path
    elif layout == "official":
        with warnings.catch_warnings():  # the token order does not matter to the processor
            warnings.simplefilter("ignore")
            settings = _official_layout_settings(path, None)
        grid = settings["vision"].image_size // settings["vision"].patch_size
        size = settings["vision"].image_size
        tokens = math.ceil(grid / projector_block(settings["projector_type"])) ** 2
        mean, std, frames, tokenizer = (
            settings["image_mean"],
            settings["image_std"],
            settings["num_frames"],
            path / "llm",
        )
    else:
        raise CheckpointError(f"{path}: a longvila checkpoint keeps its processor in processor_config.json")
    result = {
        "tokens_per_frame": tokens,
        "image_size": size,
        "image_mean": list(mean),
        "image_std": list(std),
    }
    if frames:
        result["num_frames"] = int(frames)
    return tokenizer, result
