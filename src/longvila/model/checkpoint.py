"""Checkpoints: our own directory format and the official LongVILA/VILA layout.

Own format (`save_pretrained`): `config.json` (LongVILAConfig), `model.safetensors` or shards with
`model.safetensors.index.json`, plus the processor's tokenizer and `processor_config.json`. Keys are
`llm.<HF causal LM key>`, `vision_tower.vision_model.<HF SigLIP key>`, `mm_projector.layers.{1,2,4}.*`.
Tied LM-head weights are stored once. The directory is written under a temporary name, then renamed.

Official layout (read only): `llm/` (HF causal LM + tokenizer), `vision_tower/` (HF SigLIP + image
processor), `mm_projector/` (`config.json` with `mm_projector_type`, weights `layers.1.*` LayerNorm,
`layers.2.*` and `layers.4.*` Linear), and a top `config.json` with `llm_cfg`, `vision_tower_cfg`,
`mm_projector_cfg`, `mm_vision_select_layer`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from longvila.config import IMAGE_TOKEN, LongVILAConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
VISION_PREFIX = "vision_model."


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: wrong layout, missing or mis-shaped tensors."""


# ---- key canonicalisation -----------------------------------------------------------------------
def _vision_keys_to_canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SigLIP keys as Hugging Face has long written them (`vision_model.` prefix), whatever the
    installed transformers version names them in memory."""
    return {k if k.startswith(VISION_PREFIX) else VISION_PREFIX + k: v for k, v in state.items()}


def _vision_keys_to_module(state: dict[str, torch.Tensor], module_keys: set[str]) -> dict[str, torch.Tensor]:
    if any(k.startswith(VISION_PREFIX) for k in module_keys):
        return _vision_keys_to_canonical(state)
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
    for key, value in _vision_keys_to_canonical(model.vision_tower.model.state_dict()).items():
        state["vision_tower." + key] = value
    for key, value in model.mm_projector.state_dict().items():
        state["mm_projector." + key] = value
    return {k: v.detach().contiguous() for k, v in state.items()}


# ---- writing --------------------------------------------------------------------------------------
def _atomic_dir(path: Path):
    """A temporary sibling directory that replaces `path` only once fully written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def save_pretrained(model, path: str | Path, *, processor=None, max_shard_size: str | int = "5GB") -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    path = Path(path)
    tmp = _atomic_dir(path)
    try:
        config = model.config
        config.llm = {**model.llm.config.to_dict(), "model_type": model.llm.config.model_type}
        config.llm.pop("_attn_implementation_autoset", None)
        if processor is not None:  # the processor owns the stop ids; `generate` defaults to them
            config.extra = {**config.extra, "eos_token_id": processor.stop_token_ids}
        config.save(tmp / CONFIG_NAME)
        state = model_state_for_saving(model)
        split = split_torch_state_dict_into_shards(
            state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if processor is not None:
            processor.save_pretrained(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def load_own(path: Path, dtype: torch.dtype | None = None):
    from longvila.model.vlm import LongVILA

    config = LongVILAConfig.load(path / CONFIG_NAME)
    model = LongVILA(config)
    state = _read_weights(path)
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


# ---- the official layout --------------------------------------------------------------------------
def _is_official(path: Path) -> bool:
    return all((path / part).is_dir() for part in ("llm", "vision_tower", "mm_projector"))


def official_processor_settings(path: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(str(path / "vision_tower"))
    vision = getattr(vision, "vision_config", vision)
    grid = vision.image_size // vision.patch_size
    settings: dict[str, Any] = {"tokens_per_frame": ((grid + 1) // 2) ** 2, "image_size": vision.image_size}
    preprocessor = path / "vision_tower" / "preprocessor_config.json"
    if preprocessor.exists():
        data = json.loads(preprocessor.read_text())
        settings["image_mean"] = data.get("image_mean", [0.5, 0.5, 0.5])
        settings["image_std"] = data.get("image_std", [0.5, 0.5, 0.5])
    return settings


def _load_projector_official(path: Path, vision_width: int, llm_width: int):
    from longvila.model.projector import MLPDownsampleProjector

    config_file = path / "config.json"
    if config_file.exists():
        kind = json.loads(config_file.read_text()).get("mm_projector_type", "mlp_downsample")
        if kind != "mlp_downsample":
            raise CheckpointError(
                f"{path}: mm_projector_type {kind!r} is not supported (only mlp_downsample)"
            )
    projector = MLPDownsampleProjector(vision_width, llm_width)
    load_into(projector, _read_weights(path), str(path))
    return projector


def _tokenizer_image_id(tokenizer_path: Path) -> int:
    from longvila.text.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path).convert_tokens_to_ids(IMAGE_TOKEN)


def _assemble(llm, vision_model, projector, *, select_layer: int, image_token_id: int, settings: dict):
    from longvila.model.vision import VisionTower
    from longvila.model.vlm import LongVILA

    vision_config = {**vision_model.config.to_dict(), "model_type": "siglip_vision_model"}
    llm_config = {**llm.config.to_dict(), "model_type": llm.config.model_type}
    config = LongVILAConfig(
        llm=llm_config,
        vision=vision_config,
        vision_select_layer=select_layer,
        image_token_id=image_token_id,
        image_mean=tuple(settings.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(settings.get("image_std", (0.5, 0.5, 0.5))),
    )
    tower = VisionTower(vision_model, select_layer, config.vision_micro_batch)
    return LongVILA(config, llm=llm, vision_tower=tower, mm_projector=projector)


def _load_hf_parts(llm_path: Path, vision_path: Path, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    from longvila.model.attention import register_attention

    register_attention()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    llm = AutoModelForCausalLM.from_pretrained(str(llm_path), attn_implementation="longvila", **kwargs)
    vision = SiglipVisionModel.from_pretrained(str(vision_path), **kwargs)
    return llm, vision


def load_official(path: Path, dtype: torch.dtype | None = None):
    top = json.loads((path / CONFIG_NAME).read_text()) if (path / CONFIG_NAME).exists() else {}
    select_layer = int(top.get("mm_vision_select_layer", -2))
    llm, vision = _load_hf_parts(path / "llm", path / "vision_tower", dtype)
    projector = _load_projector_official(
        path / "mm_projector", vision.config.hidden_size, llm.config.hidden_size
    )
    if dtype is not None:
        projector.to(dtype)
    return _assemble(
        llm,
        vision,
        projector,
        select_layer=select_layer,
        image_token_id=_tokenizer_image_id(path / "llm"),
        settings=official_processor_settings(path),
    )


def compose_from_parts(llm_path, vision_tower_path, *, select_layer: int = -2, dtype=None):
    from longvila.model.projector import MLPDownsampleProjector

    llm_path, vision_tower_path = Path(llm_path), Path(vision_tower_path)
    for part in (llm_path, vision_tower_path):
        if not (part / CONFIG_NAME).exists():
            raise CheckpointError(
                f"{part}: no config.json (a local Hugging Face checkpoint directory is needed)"
            )
    llm, vision = _load_hf_parts(llm_path, vision_tower_path, dtype)
    projector = MLPDownsampleProjector(vision.config.hidden_size, llm.config.hidden_size)
    if dtype is not None:
        projector.to(dtype)
    settings = {}
    preprocessor = vision_tower_path / "preprocessor_config.json"
    if preprocessor.exists():
        settings = json.loads(preprocessor.read_text())
    return _assemble(
        llm,
        vision,
        projector,
        select_layer=select_layer,
        image_token_id=_tokenizer_image_id(llm_path),
        settings=settings,
    )


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory, this is a file")
    config_file = path / CONFIG_NAME
    if config_file.exists():
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from exc
        if model_type == "longvila":
            return load_own(path, dtype)
    if _is_official(path):
        return load_official(path, dtype)
    found = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(
        f"{path}: not a known checkpoint layout: expected config.json with model_type 'longvila' "
        f"(longvila format) or llm/, vision_tower/ and mm_projector/ (official LongVILA layout); found {found}"
    )
