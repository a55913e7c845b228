"""Writing a LongVILA model in the official split layout and in the NVILA `-hf` layout.

Both are written under a temporary name and renamed into place when complete (as our own format is).
What neither layout has a key for (the 2x2 token order, micro-batch, attention, free-form `extra`) goes
into the top config under `projector_token_order` and `longvila`, so that reading the export back gives
the same model; other readers ignore those keys (docs/checkpoints.md says what they assume instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longvila.files import write_dir_atomically, write_json_atomic
from longvila.model.checkpoint import (
    CONFIG_NAME,
    EXTRA_FIELDS,
    check_processor_matches,
    model_state_for_saving,
    sync_llm_config,
    vision_keys_to_canonical,
    write_weights,
)

VIDEO_TOKEN = "<vila/video>"
"""NVILA's video placeholder; longvila lays out video frames with `<image>`, which serves when absent."""


def _preprocessor_config(config) -> dict[str, Any]:
    """A SigLIP `preprocessor_config.json`: square bicubic resize, 1/255, the model's mean and std."""
    size = config.image_size
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
        "do_convert_rgb": True,
    }


def _extras(config) -> dict[str, Any]:
    return {name: getattr(config, name) for name in EXTRA_FIELDS}


def _vision_config_dict(model) -> dict[str, Any]:
    vision = {**model.vision_tower.model.config.to_dict(), "model_type": "siglip_vision_model"}
    vision["architectures"] = ["SiglipVisionModel"]
    return vision


def _require_processor(model, processor, layout: str):
    if processor is None:
        raise ValueError(
            f"writing the {layout} layout needs the processor (its tokenizer goes with the model)"
        )
    check_processor_matches(model, processor)
    return processor


def save_official(model, path: str | Path, *, processor, max_shard_size: str | int = "5GB") -> None:
    """llm/ (HF causal LM + tokenizer), vision_tower/ (SigLIP + preprocessor config), mm_projector/
    (its type + `layers.*` weights) and a top VILA config."""
    processor = _require_processor(model, processor, "official")
    config = model.config

    def write(tmp: Path) -> None:
        llm = sync_llm_config(model)
        model.llm.save_pretrained(str(tmp / "llm"), max_shard_size=max_shard_size)
        processor.tokenizer.save_pretrained(str(tmp / "llm"))
        vision_dir = tmp / "vision_tower"
        vision_dir.mkdir()
        write_json_atomic(vision_dir / CONFIG_NAME, _vision_config_dict(model), sort_keys=True)
        vision_state = vision_keys_to_canonical(model.vision_tower.model.state_dict())
        write_weights(
            {k: v.detach().contiguous() for k, v in vision_state.items()}, vision_dir, max_shard_size
        )
        write_json_atomic(
            vision_dir / "preprocessor_config.json", _preprocessor_config(config), sort_keys=True
        )
        projector_dir = tmp / "mm_projector"
        projector_dir.mkdir()
        projector_cfg = {
            "model_type": "v2l_projector",
            "architectures": ["MultimodalProjector"],
            "mm_projector_type": config.projector_type,
        }
        write_json_atomic(projector_dir / CONFIG_NAME, projector_cfg, sort_keys=True)
        projector_state = {k: v.detach().contiguous() for k, v in model.mm_projector.state_dict().items()}
        write_weights(projector_state, projector_dir, max_shard_size)
        top = {
            "model_type": "llava_llama",
            "architectures": ["LlavaLlamaModel"],
            "llm_cfg": llm,
            "vision_tower_cfg": _vision_config_dict(model),
            "mm_projector_cfg": projector_cfg,
            "hidden_size": config.llm_hidden_size,
            "mm_hidden_size": config.vision_hidden_size,
            "mm_vision_select_layer": config.vision_select_layer,
            "mm_vision_select_feature": "cls_patch",
            "image_aspect_ratio": "resize",
            "num_video_frames": processor.num_frames,
            "projector_token_order": config.projector_token_order,
            "longvila": _extras(config),
        }
        write_json_atomic(tmp / CONFIG_NAME, top, sort_keys=True)

    write_dir_atomically(path, write)


def save_hf(model, path: str | Path, *, processor, max_shard_size: str | int = "5GB") -> None:
    """One config (`model_type` "nvila", `text_config`, `vision_config`, token ids), weights under
    `llm.` / `vision_tower.vision_model.` / `mm_projector.`, tokenizer and processor configs at the top."""
    processor = _require_processor(model, processor, "NVILA -hf")
    config = model.config
    vocab = processor.tokenizer.get_vocab()

    def write(tmp: Path) -> None:
        llm = sync_llm_config(model)
        top = {
            "model_type": "nvila",
            "architectures": ["NVILAForConditionalGeneration"],
            "text_config": llm,
            "vision_config": _vision_config_dict(model),
            "image_token_id": config.image_token_id,
            "video_token_id": vocab.get(VIDEO_TOKEN, config.image_token_id),
            "mm_projector_type": config.projector_type,
            "projector_token_order": config.projector_token_order,
            "mm_vision_select_layer": config.vision_select_layer,
            "longvila": _extras(config),
        }
        write_json_atomic(tmp / CONFIG_NAME, top, sort_keys=True)
        write_weights(model_state_for_saving(model), tmp, max_shard_size)
        processor.save_pretrained(tmp)
        write_json_atomic(tmp / "preprocessor_config.json", _preprocessor_config(config), sort_keys=True)

    write_dir_atomically(path, write)
