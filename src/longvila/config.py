"""Typed configuration of a LongVILA model.

The LLM and the vision tower keep their Hugging Face configs as plain dicts (`llm`, `vision`), so any
checkpoint that Hugging Face can describe round-trips through `config.json` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The placeholder lives with the tokenizer (the lower module); re-exported here for existing imports.
from longvila.plan.shapes import TINY
from longvila.text.tokenizer import IMAGE_TOKEN

PROJECTOR_TYPES = ("mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")
"""Projector types that load (docs/checkpoints.md): the 2x2 merge of LongVILA and the NVILA-era variants."""

TOKEN_ORDERS = ("column", "row")

# the block side of each projector type's merge, and the token order the `_fix` types always have
PROJECTOR_BLOCK = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
FIXED_TOKEN_ORDER = {"mlp_downsample_2x2_fix": "row", "mlp_downsample_3x3_fix": "row"}


@dataclass(kw_only=True)
class LongVILAConfig:
    """A vision tower, a projector and a causal LLM."""

    llm: dict[str, Any]
    """Hugging Face config of the causal LLM (`Qwen2Config.to_dict()` or any AutoConfig dict)."""

    vision: dict[str, Any]
    """Hugging Face `SiglipVisionConfig` as a dict."""

    projector_type: str = "mlp_downsample"
    """Projector between vision features and LLM embeddings: `mlp_downsample` (2x2 merge, LongVILA),
    `mlp_downsample_2x2_fix` (2x2, NVILA era) or `mlp_downsample_3x3_fix` (3x3, NVILA)."""

    projector_token_order: str | None = None
    """Order of the merged tokens of a frame: `column` (the LongVILA 2024-08 release's `mlp_downsample`)
    or `row` (every VILA/NVILA release since 2024-12-12, and always for the `_fix` types). None takes the
    type's own order (column for `mlp_downsample`, which is what configs written before this field meant)."""

    vision_select_layer: int = -2
    """Hidden state of the vision tower used as features: -2 is the second-to-last layer, as LongVILA."""

    vision_micro_batch: int = 64
    """Frames encoded per vision-tower forward; bounds activation memory on long videos."""

    image_token_id: int | None = None
    """Token id of `<image>` in the tokenizer; set by the processor or the checkpoint."""

    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling pixels to [0, 1] (SigLIP: 0.5)."""

    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel standard deviation (SigLIP: 0.5)."""

    attn_implementation: str = "longvila"
    """Attention used by the LLM: `longvila` (packed-sample aware, sequence-parallel capable) or any HF name."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata kept in config.json (provenance, training stage, ...)."""

    def __post_init__(self) -> None:
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type {self.projector_type!r} is not one of {PROJECTOR_TYPES}")
        fixed = FIXED_TOKEN_ORDER.get(self.projector_type)
        if self.projector_token_order is None:
            self.projector_token_order = fixed or "column"
        if self.projector_token_order not in TOKEN_ORDERS:
            raise ValueError(
                f"projector_token_order {self.projector_token_order!r} is not one of {TOKEN_ORDERS}"
            )
        if fixed is not None and self.projector_token_order != fixed:
            raise ValueError(
                f"projector_type {self.projector_type!r} always orders tokens {fixed}-major; "
                f"projector_token_order {self.projector_token_order!r} contradicts it"
            )
        if self.vision_micro_batch < 1:
            raise ValueError(f"vision_micro_batch must be >= 1, got {self.vision_micro_batch}")
        num_layers = int(self.vision.get("num_hidden_layers", 0))
        # hidden state k is the output of layer k (0: the embeddings), so -(layers + 1) .. layers
        if not -num_layers - 1 <= self.vision_select_layer <= num_layers:
            raise ValueError(
                f"vision_select_layer {self.vision_select_layer} is outside the vision tower's "
                f"{num_layers} layers"
            )
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def patch_grid(self) -> int:
        """Patches per side: 384 // 14 = 27 for SigLIP-so400m."""
        return self.image_size // int(self.vision["patch_size"])

    @property
    def projector_block(self) -> int:
        """Side of the projector's merge: 2 (2x2) or 3 (3x3)."""
        return PROJECTOR_BLOCK[self.projector_type]

    @property
    def tokens_per_frame(self) -> int:
        """LLM tokens per frame after the k x k merge: ceil(27 / 2) ** 2 = 196 (SigLIP 384 px, 2x2),
        ceil(32 / 2) ** 2 = 256 (448 px, 2x2), ceil(32 / 3) ** 2 = 121 (448 px, 3x3)."""
        return math.ceil(self.patch_grid / self.projector_block) ** 2

    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision["hidden_size"])

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def tiny(cls, *, vocab_size: int | None = None, **overrides: Any) -> LongVILAConfig:
        """The embedded default: a tiny SigLIP (64 px, patch 8 -> 8x8 grid -> 16 tokens per frame)
        and a tiny Qwen2 (2 layers, 64 wide, 4 query / 2 KV heads), random init; runs anywhere."""
        from longvila.text.tokenizer import tiny_tokenizer_token_id, tiny_tokenizer_vocab_size

        # Sizes from the one shape registry; RoPE base and context as the tiny default has always had.
        llm = TINY.llm.hf_config(
            vocab_size=vocab_size or tiny_tokenizer_vocab_size(),
            rope_theta=10000.0,
            max_position_embeddings=32768,
        )
        vision = TINY.vision.hf_config()
        overrides.setdefault("image_token_id", tiny_tokenizer_token_id(IMAGE_TOKEN))
        return cls(llm=llm, vision=vision, **overrides)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return {"model_type": "longvila", **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongVILAConfig:
        data = dict(data)
        model_type = data.pop("model_type", "longvila")
        if model_type != "longvila":
            raise ValueError(f"config has model_type {model_type!r}, expected 'longvila'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LongVILAConfig keys: {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LongVILAConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)
