"""Reading the configs of released LongVILA / VILA / NVILA checkpoints: which projector, which 2x2 token
order, and which settings longvila does not implement (refused with the key and the file).

The rule for the token order of `mlp_downsample` (docs/checkpoints.md, "Which token order"):
  1. the user's override (`projector_order=` / `--projector-order`) when given;
  2. a `projector_token_order` key in the checkpoint's top config (longvila writes it on export);
  3. the remote-code layout (`model_type` "vila", an `auto_map` or a `version` key: the conversion script
     of NVILA-era VILA writes these) -> row;
  4. keys that only NVILA-era VILA (since 2024-12-12) writes into the top config (`dynamic_s2`,
     `image_encoder`, `video_encoder`, `num_time_tokens`, ...) -> row;
  5. a VILA top config (`llm_cfg` / `mm_projector_cfg`) without any of those -> column (2024-08 release);
  6. nothing to go by (no top config, or one without VILA keys) -> column, with a warning: a guess.
`mlp_downsample_2x2_fix` and `mlp_downsample_3x3_fix` are always row-major.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longvila.config import FIXED_TOKEN_ORDER, PROJECTOR_TYPES, TOKEN_ORDERS

TOP_CONFIG_FILES = ("config.json", "config_vila_style.json")
"""Top configs of the split layout; the remote-code (`vila`) release keeps a VILA-style copy beside
config.json."""

NVILA_ERA_KEYS = (
    "dynamic_s2",
    "s2_resize_output_to_scale_idx",
    "min_tiles",
    "max_tiles",
    "num_time_tokens",
    "time_token_format",
    "image_encoder",
    "video_encoder",
    "vision_tower_lr",
)
"""Top-config keys that VILA's LlavaConfig gained with the NVILA release (2024-12-12), the same commit
that added the second permute to `mlp_downsample`."""

VILA_KEYS = ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: wrong layout, missing or mis-shaped tensors, or a
    setting that longvila does not implement."""


@dataclass
class TokenOrder:
    """The 2x2 token order chosen for a checkpoint and why."""

    order: str
    reason: str
    guessed: bool = False


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_top_configs(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(file, contents) of each top config that exists, config.json first."""
    return [(path / name, read_json(path / name)) for name in TOP_CONFIG_FILES if (path / name).exists()]


def _first(tops: list[tuple[Path, dict[str, Any]]], key: str) -> tuple[Path | None, Any]:
    for file, data in tops:
        if key in data and data[key] is not None:
            return file, data[key]
    return None, None


# ---- settings longvila does not implement ----------------------------------------------------------
def _encoder_is_basic(value: Any, kind: str) -> bool:
    """An `image_encoder` / `video_encoder` entry that is VILA's basic encoder: each frame's tokens then
    one "\\n" (what the processor lays out). TSPVideoEncoder (temporal pooling) and start/end-token
    variants are not."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    if not isinstance(value, dict):
        return False
    target = str(value.get("_target_", ""))
    if not target.endswith(f"Basic{kind}Encoder"):
        return False
    return value.get("start_tokens") is None and value.get("end_tokens", "\n") == "\n"


def _unsupported_reason(key: str, value: Any) -> str | None:
    """Why `key: value` in a top config cannot be honoured, or None when it can (or does not matter)."""
    if key in ("dynamic_s2", "s2") and value:
        return "multi-scale (S2) vision features are not implemented; longvila runs one scale"
    if key == "image_aspect_ratio" and value in ("dynamic_s2", "pad"):
        return "only 'resize' (and 'dynamic' for single-tile frames) preprocessing is implemented"
    if key == "video_max_tiles" and isinstance(value, int) and value > 1:
        return "tiling video frames is not implemented (frames are one tile each)"
    if key == "image_encoder" and value is not None and not _encoder_is_basic(value, "Image"):
        return "only the basic image encoder (frame tokens then a newline) is implemented"
    if key == "video_encoder" and value is not None and not _encoder_is_basic(value, "Video"):
        return "temporal pooling / non-basic video encoders (e.g. TSPVideoEncoder) are not implemented"
    if key == "num_time_tokens" and value:
        return "time tokens between frames are not implemented"
    if key == "mm_use_im_start_end" and value:
        return "image start/end tokens are not implemented"
    if key == "mm_vision_select_feature" and value not in (None, "cls_patch"):
        return "SigLIP has no CLS token: only 'cls_patch' (all patch tokens) reads the whole grid"
    if key == "ps3" and value:
        return "PS3 vision towers are not implemented"
    if key == "mm_projector_type" and value not in PROJECTOR_TYPES:
        return f"projector types {PROJECTOR_TYPES} are implemented"
    return None


def check_supported(tops: list[tuple[Path, dict[str, Any]]], vision_image_size: int) -> None:
    """Raise CheckpointError naming the first key (and its file) whose setting longvila cannot honour."""
    for file, data in tops:
        for key, value in data.items():
            reason = _unsupported_reason(key, value)
            if reason is not None:
                raise CheckpointError(f"{file}: {key} = {value!r} is not supported: {reason}")
        resolution = data.get("vision_resolution")
        if resolution not in (None, -1) and int(resolution) != vision_image_size:
            raise CheckpointError(
                f"{file}: vision_resolution = {resolution!r} is not supported: the vision tower is "
                f"{vision_image_size} px and resizing its position embeddings at load time is not implemented"
            )
    _, aspect = _first(tops, "image_aspect_ratio")
    if aspect == "dynamic":
        warnings.warn(
            f"{tops[0][0]}: image_aspect_ratio 'dynamic' tiles single images in VILA; longvila feeds every "
            "image and frame as one square tile (videos are the same as VILA's)",
            stacklevel=3,
        )


# ---- the projector and its token order -------------------------------------------------------------
def projector_type_of(path: Path, tops: list[tuple[Path, dict[str, Any]]]) -> tuple[str, Path | None]:
    """The projector type: `mm_projector/config.json`, else the top config's `mm_projector_cfg`,
    else `mlp_downsample` (the LongVILA release); with the file it came from."""
    candidates: list[tuple[Path, Any]] = []
    projector_config = path / "mm_projector" / "config.json"
    if projector_config.exists():
        candidates.append((projector_config, read_json(projector_config).get("mm_projector_type")))
    for file, data in tops:
        cfg = data.get("mm_projector_cfg")
        if isinstance(cfg, dict):
            candidates.append((file, cfg.get("mm_projector_type")))
        if "mm_projector_type" in data:
            candidates.append((file, data["mm_projector_type"]))
    for file, kind in candidates:
        if kind is None:
            continue
        if kind not in PROJECTOR_TYPES:
            raise CheckpointError(
                f"{file}: mm_projector_type = {kind!r} is not supported (implemented: {', '.join(PROJECTOR_TYPES)})"
            )
        return kind, file
    return "mlp_downsample", None


def decide_token_order(
    projector_type: str, tops: list[tuple[Path, dict[str, Any]]], override: str | None, where: Path
) -> TokenOrder:
    """Apply the rule of the module docstring. A contradicting override of a `_fix` type is an error."""
    if override is not None and override not in TOKEN_ORDERS:
        raise ValueError(f"projector order {override!r} is not one of {TOKEN_ORDERS}")
    fixed = FIXED_TOKEN_ORDER.get(projector_type)
    if fixed is not None:
        if override is not None and override != fixed:
            raise CheckpointError(
                f"{where}: {projector_type} is always {fixed}-major; --projector-order {override} contradicts it"
            )
        return TokenOrder(fixed, f"{projector_type} is always {fixed}-major")
    if override is not None:
        return TokenOrder(override, "set by the user")
    file, explicit = _first(tops, "projector_token_order")
    if explicit is not None:
        if explicit not in TOKEN_ORDERS:
            raise CheckpointError(
                f"{file}: projector_token_order = {explicit!r} is not one of {TOKEN_ORDERS}"
            )
        return TokenOrder(explicit, f"projector_token_order in {file}")
    for file, data in tops:
        if data.get("model_type") == "vila" or "auto_map" in data or "version" in data:
            return TokenOrder("row", f"{file} is the remote-code (vila) layout of NVILA-era VILA")
    for file, data in tops:
        markers = [k for k in NVILA_ERA_KEYS if k in data]
        if markers:
            return TokenOrder("row", f"{file} has NVILA-era keys {markers}")
    if any(k in data for _, data in tops for k in VILA_KEYS):
        return TokenOrder("column", "a VILA config without NVILA-era keys (the LongVILA 2024-08 release)")
    decision = TokenOrder("column", "no config says which VILA release wrote it", guessed=True)
    warnings.warn(
        f"{where}: cannot tell which VILA release wrote this mlp_downsample checkpoint; assuming the "
        "LongVILA 2024-08 column-major token order. If its answers look wrong, load it with "
        "--projector-order row (NVILA-era releases).",
        stacklevel=3,
    )
    return decision
