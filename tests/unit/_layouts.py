"""Tiny checkpoints in the released layouts, built from Hugging Face parts, and the official projector
formula written out independently (loops over blocks, explicit LayerNorm/Linear/GELU calls)."""

import json

import torch
from safetensors.torch import save_file
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from longvila.text.tokenizer import load_tiny_tokenizer

BASIC_IMAGE = '{"_target_": "llava.model.encoders.BasicImageEncoder"}'
BASIC_VIDEO = '{"_target_": "llava.model.encoders.BasicVideoEncoder"}'


def merge_by_loops(x_FPC: torch.Tensor, k: int, order: str) -> torch.Tensor:
    """Pad the G x G grid with zeros to a multiple of k; token (i, j) carries the block at (k*i, k*j)
    read row by row; tokens listed row-major (i * n + j) or column-major (j * n + i)."""
    frames, patches, channels = x_FPC.shape
    grid = int(round(patches**0.5))
    padded_side = -(-grid // k) * k
    padded = torch.zeros(frames, padded_side, padded_side, channels, dtype=x_FPC.dtype)
    padded[:, :grid, :grid] = x_FPC.reshape(frames, grid, grid, channels)
    n = padded_side // k
    out = torch.zeros(frames, n * n, k * k * channels, dtype=x_FPC.dtype)
    for i in range(n):
        for j in range(n):
            block = [padded[:, k * i + r, k * j + c] for r in range(k) for c in range(k)]
            index = i * n + j if order == "row" else j * n + i
            out[:, index] = torch.cat(block, dim=-1)
    return out


def official_projector_state(kind: str, c: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's `layers.<index>` keys for a projector type."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp_downsample_3x3_fix":
        shapes = {
            1: ("ln", 9 * c),
            2: ("fc", 9 * c, 3 * c),
            4: ("ln", 3 * c),
            5: ("fc", 3 * c, d),
            7: ("fc", d, d),
        }
    else:
        shapes = {1: ("ln", 4 * c), 2: ("fc", 4 * c, d), 4: ("fc", d, d)}
    state = {}
    for index, spec in shapes.items():
        if spec[0] == "ln":
            state[f"layers.{index}.weight"] = 1 + 0.3 * torch.randn(spec[1], generator=g)
            state[f"layers.{index}.bias"] = 0.3 * torch.randn(spec[1], generator=g)
        else:
            state[f"layers.{index}.weight"] = 0.3 * torch.randn(spec[2], spec[1], generator=g)
            state[f"layers.{index}.bias"] = 0.3 * torch.randn(spec[2], generator=g)
    return state


def official_projector_forward(state, kind: str, features_FPC: torch.Tensor, order: str) -> torch.Tensor:
    """The release's Sequential spelled out: merge, then LN/Linear/GELU in the type's order."""
    f = torch.nn.functional
    k = 3 if kind == "mlp_downsample_3x3_fix" else 2
    x = merge_by_loops(features_FPC, k, order)

    def ln(i, x):
        return f.layer_norm(x, x.shape[-1:], state[f"layers.{i}.weight"], state[f"layers.{i}.bias"], 1e-5)

    def fc(i, x):
        return f.linear(x, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])

    if k == 3:
        return fc(7, f.gelu(fc(5, ln(4, f.gelu(fc(2, ln(1, x)))))))
    return fc(4, f.gelu(fc(2, ln(1, x))))


def tiny_qwen2(vocab_size: int) -> Qwen2ForCausalLM:
    """A 2-layer, 32-wide Qwen2 with untied head."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_parts(
    image_size: int, patch_size: int, layers: int = 2, seed: int = 0, llm_cls=None, llm_config=None
):
    """(llm, vision, tokenizer): a tiny Qwen2 (or `llm_cls(llm_config)`) and a tiny SigLIP."""
    torch.manual_seed(seed)
    tokenizer = load_tiny_tokenizer()
    llm = tiny_qwen2(len(tokenizer)) if llm_cls is None else llm_cls(llm_config).eval()
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=layers,
            num_attention_heads=2,
            vision_use_head=False,
        )
    ).eval()
    return llm, vision, tokenizer


def top_config(family: str, kind: str, select_layer: int = -2) -> dict:
    """The top config.json of each release family (keys as the VILA code of that release writes them)."""
    config = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": {"architectures": ["Qwen2ForCausalLM"]},
        "vision_tower_cfg": {"architectures": ["SiglipVisionModel"]},
        "mm_projector_cfg": {"mm_projector_type": kind},
        "mm_vision_select_layer": select_layer,
        "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": "resize",
        "s2": False,
        "num_video_frames": 8,
    }
    if family in ("nvila", "vila"):
        config.update(
            dynamic_s2=False,
            min_tiles=1,
            max_tiles=12,
            num_time_tokens=0,
            image_encoder=BASIC_IMAGE,
            video_encoder=BASIC_VIDEO,
        )
    if family == "vila":
        config.update(
            model_type="vila",
            architectures=["VILAForCausalLM"],
            version="2.0",
            auto_map={
                "AutoConfig": "modeling_vila.VILAConfig",
                "AutoModel": "modeling_vila.VILAForCausalLM",
            },
        )
    return config


def write_split_layout(root, llm, vision, projector_state, tokenizer, kind: str, top: dict | None):
    """llm/, vision_tower/, mm_projector/ through Hugging Face's writers, and the family's top configs."""
    root.mkdir(parents=True, exist_ok=True)
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(str(root / "llm"))
    vision.save_pretrained(root / "vision_tower")
    size = vision.config.image_size
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(root / "vision_tower")
    (root / "mm_projector").mkdir()
    (root / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": kind}))
    save_file(projector_state, str(root / "mm_projector" / "model.safetensors"))
    if top is not None:
        (root / "config.json").write_text(json.dumps(top))
        if top.get("model_type") == "vila":
            vila_style = {k: v for k, v in top.items() if k not in ("auto_map", "version")}
            vila_style["model_type"] = "llava_llama"
            (root / "config_vila_style.json").write_text(json.dumps(vila_style))
    return root
