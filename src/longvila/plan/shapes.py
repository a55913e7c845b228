"""The one registry of model shapes (Qwen2 / Llama LLMs, SigLIP towers): presets, or read from a LongVILA /
Hugging Face `config.json`.

The planner sizes them (no weights, no torch); `LongVILAConfig.tiny`, the benchmarks and the GPU tests build
their Hugging Face config dicts from them (`LLMShape.hf_config`, `VisionShape.hf_config`), so a released
model's sizes are written once. Parameter counts follow the Hugging Face modules the model runs (Qwen2
decoder layers with q/k/v biases, SigLIP encoder layers, the mlp_downsample projector).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class LLMShape:
    """A Qwen2/Llama-style decoder."""

    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = True

    @property
    def q_dim(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        attention = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h  # + two RMSNorm weights

    @property
    def layer_matmul_params(self) -> int:
        """Weights that multiply every token (2 FLOPs each per token forward)."""
        h = self.hidden
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * self.intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.layers * self.layer_params + self.embedding_params + head + self.hidden

    def hf_config(self, **overrides: Any) -> dict[str, Any]:
        """This shape as a Hugging Face causal-LM config dict: Qwen2 (q/k/v biases) or Llama (none), with
        the released models' RoPE base and norm epsilon; `overrides` replace or add keys."""
        qwen2 = self.qkv_bias
        config: dict[str, Any] = {
            "model_type": "qwen2" if qwen2 else "llama",
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.q_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": 32768,
            "rope_theta": 1e6 if qwen2 else 5e5,
            "rms_norm_eps": 1e-6 if qwen2 else 1e-5,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "initializer_range": 0.02,
        }
        if qwen2:
            config["use_sliding_window"] = False
        else:
            config["attention_bias"] = False
        return {**config, **overrides}


@dataclass(frozen=True, kw_only=True)
class VisionShape:
    """A SigLIP vision encoder read at layer `layers_run` (LongVILA: the second-to-last)."""

    hidden: int
    intermediate: int
    layers: int
    layers_run: int
    heads: int
    image_size: int
    patch_size: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layer_params(self) -> int:
        c = self.hidden
        return 4 * c * c + 4 * c + 2 * c * self.intermediate + c + self.intermediate + 4 * c

    @property
    def layer_matmul_params(self) -> int:
        return 4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        embeddings = 3 * self.patch_size**2 * self.hidden + self.hidden + self.patches * self.hidden
        return self.layers * self.layer_params + embeddings + 2 * self.hidden

    def hf_config(self, **overrides: Any) -> dict[str, Any]:
        """This shape as a Hugging Face `SiglipVisionConfig` dict (no pooling head: LongVILA reads a hidden
        state); `overrides` replace or add keys."""
        config: dict[str, Any] = {
            "model_type": "siglip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_channels": 3,
            "vision_use_head": False,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        }
        return {**config, **overrides}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Vision tower + mlp_downsample projector + LLM."""

    name: str
    llm: LLMShape
    vision: VisionShape

    @property
    def tokens_per_frame(self) -> int:
        """LLM tokens per frame after the 2x2 merge (196 for 27x27 patches)."""
        return math.ceil(math.isqrt(self.vision.patches) / 2) ** 2

    @property
    def projector_params(self) -> int:
        c4, d = 4 * self.vision.hidden, self.llm.hidden
        return 2 * c4 + c4 * d + d + d * d + d

    @property
    def params(self) -> int:
        return self.llm.params + self.vision.params + self.projector_params


SIGLIP_SO400M = VisionShape(
    hidden=1152, intermediate=4304, layers=27, layers_run=26, heads=16, image_size=384, patch_size=14
)
SIGLIP_TINY = VisionShape(
    hidden=48, intermediate=96, layers=3, layers_run=2, heads=4, image_size=64, patch_size=8
)
"""A CPU-sized SigLIP: 64 px, patch 8 -> an 8x8 grid -> 16 tokens per frame after the 2x2 merge."""


def _decoder(row: tuple[int, ...], *, tie: bool = False, qkv_bias: bool = True) -> LLMShape:
    """An LLMShape from a table row (hidden, intermediate, layers, q heads, kv heads, head dim, vocab)."""
    hidden, intermediate, layers, q_heads, kv_heads, head_dim, vocab = row
    return LLMShape(
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tie_embeddings=tie,
        qkv_bias=qkv_bias,
    )


# The released config.json sizes:  hidden  inter  layers  q  kv  head  vocab
QWEN2_7B = _decoder((3584, 18944, 28, 28, 4, 128, 152064))  # vocab 151,936 tokens + padding
QWEN2_1_5B = _decoder((1536, 8960, 28, 12, 2, 128, 151936), tie=True)
QWEN2_0_5B = _decoder((896, 4864, 24, 14, 2, 64, 151936), tie=True)
LLAMA3_8B = _decoder((4096, 14336, 32, 32, 8, 128, 128256), qkv_bias=False)

TINY = ModelShape(
    name="tiny (the embedded CPU default)",
    llm=_decoder((64, 176, 2, 4, 2, 16, 1024), tie=True),
    vision=SIGLIP_TINY,
)
"""The tiny default of `LongVILAConfig.tiny` (its vocabulary is the tiny tokenizer's) and the CPU stand-in of
the benchmarks; not a planner preset."""

PRESETS: dict[str, ModelShape] = {
    "7b": ModelShape(name="LongVILA-7B (Qwen2-7B)", llm=QWEN2_7B, vision=SIGLIP_SO400M),
    "1.5b": ModelShape(name="LongVILA-1.5B (Qwen2-1.5B)", llm=QWEN2_1_5B, vision=SIGLIP_SO400M),
    "0.5b": ModelShape(name="LongVILA-0.5B (Qwen2-0.5B)", llm=QWEN2_0_5B, vision=SIGLIP_SO400M),
    # Llama-3-8B, the LLM of the paper's LongVILA-8B (its system measurements).
    "8b": ModelShape(name="LongVILA-8B (Llama-3-8B)", llm=LLAMA3_8B, vision=SIGLIP_SO400M),
}


def llm_shape_from_hf(data: dict[str, Any]) -> LLMShape:
    """LLMShape from a Hugging Face causal-LM config dict (Qwen2, Llama, ...)."""
    try:
        hidden = int(data["hidden_size"])
        heads = int(data["num_attention_heads"])
        return LLMShape(
            hidden=hidden,
            intermediate=int(data["intermediate_size"]),
            layers=int(data["num_hidden_layers"]),
            q_heads=heads,
            kv_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=int(data.get("head_dim") or hidden // heads),
            vocab=int(data["vocab_size"]),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            qkv_bias=data.get("model_type", "qwen2") == "qwen2" or bool(data.get("attention_bias", False)),
        )
    except KeyError as exc:
        raise ValueError(f"LLM config has no {exc.args[0]!r}") from None


def vision_shape_from_hf(data: dict[str, Any], select_layer: int = -2) -> VisionShape:
    layers = int(data["num_hidden_layers"])
    return VisionShape(
        hidden=int(data["hidden_size"]),
        intermediate=int(data["intermediate_size"]),
        layers=layers,
        layers_run=select_layer if select_layer >= 0 else layers + 1 + select_layer,
        heads=int(data["num_attention_heads"]),
        image_size=int(data["image_size"]),
        patch_size=int(data["patch_size"]),
    )


def shape_from_config(data: dict[str, Any], name: str = "config") -> ModelShape:
    """A LongVILA config (`model_type: longvila`, with `llm` and `vision`) or a bare HF LLM config
    (then the vision tower is SigLIP-so400m, as in LongVILA)."""
    if data.get("model_type") == "longvila" or ("llm" in data and "vision" in data):
        llm = llm_shape_from_hf(data["llm"])
        vision = vision_shape_from_hf(data["vision"], int(data.get("vision_select_layer", -2)))
        return ModelShape(name=name, llm=llm, vision=vision)
    if "hidden_size" in data:
        return ModelShape(name=name, llm=llm_shape_from_hf(data), vision=SIGLIP_SO400M)
    raise ValueError(f"{name}: neither a LongVILA config (llm + vision) nor a Hugging Face LLM config")


def load_shape(model: str) -> ModelShape:
    """A preset name (7b, 1.5b, 0.5b, 8b) or the path of a config.json (or a directory holding one)."""
    key = model.lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return shape_from_config(data, name=str(path))
