"""Released checkpoint layouts: frame embeddings against HF SigLIP + the official projector formula written
in the test, for every projector type and 2x2 order; the order rule; refused settings; RoPE of the 1M model."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from _layouts import (
    BASIC_IMAGE,
    merge_by_loops,
    official_projector_forward,
    official_projector_state,
    tiny_parts,
    top_config,
    write_split_layout,
)

from longvila import LongVILA, LongVILAProcessor
from longvila.model.checkpoint import CheckpointError
from longvila.model.projector import DownsampleProjector, merge_blocks

# (family of the top config, projector type, the order the release uses)
CASES = [
    ("longvila-2024-08", "mlp_downsample", "column"),
    ("nvila", "mlp_downsample", "row"),
    ("vila", "mlp_downsample", "row"),
    ("vila", "mlp_downsample_2x2_fix", "row"),
    ("nvila", "mlp_downsample_3x3_fix", "row"),
]
# (image size, patch size, SigLIP layers): odd and even grids; 384 and 448 px kept cheap with one layer
SIZES = [(56, 8, 2), (70, 14, 2), (384, 14, 1), (448, 14, 1)]


def reference_embeddings(vision, state, kind, pixel_values, order, select_layer=-2):
    with torch.no_grad():
        hidden = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[select_layer]
        return official_projector_forward(state, kind, hidden, order)


@pytest.mark.parametrize("size,patch,layers", SIZES, ids=[f"{s[0]}px" for s in SIZES])
@pytest.mark.parametrize("family,kind,order", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_frame_embeddings_equal_the_official_formula(tmp_path, family, kind, order, size, patch, layers):
    llm, vision, tokenizer = tiny_parts(size, patch, layers)
    state = official_projector_state(kind, 8, 32)
    write_split_layout(tmp_path, llm, vision, state, tokenizer, kind, top_config(family, kind))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every family here is identified by its configs: no guessing
        model = LongVILA.from_pretrained(tmp_path).eval()
    assert model.config.projector_type == kind and model.config.projector_token_order == order
    pixel_values = torch.randn(2, 3, size, size)
    expected = reference_embeddings(vision, state, kind, pixel_values, order)
    with torch.no_grad():
        got = model.encode_frames(pixel_values)
    k = 3 if kind.endswith("3x3_fix") else 2
    assert got.shape == (2, math.ceil(size // patch / k) ** 2, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    wrong = reference_embeddings(vision, state, kind, pixel_values, "column" if order == "row" else "row")
    assert (got - wrong).abs().max() > 1e-2, "the token order must matter, or this test could not fail"


def test_longvila_r1_shape_448px_gives_256_tokens_and_the_whole_model_matches(tmp_path):
    """The remote-code release of LongVILA-R1 (448 px SigLIP, 2x2_fix): logits against HF Qwen2 fed the
    reference frame embeddings."""
    llm, vision, tokenizer = tiny_parts(448, 14, 1)
    kind = "mlp_downsample_2x2_fix"
    state = official_projector_state(kind, 8, 32)
    write_split_layout(tmp_path, llm, vision, state, tokenizer, kind, top_config("vila", kind))
    model = LongVILA.from_pretrained(tmp_path).eval()
    proc = LongVILAProcessor.from_pretrained(tmp_path)
    assert proc.tokens_per_frame == model.config.tokens_per_frame == 256 and proc.image_size == 448
    assert proc.num_frames == 8  # num_video_frames of the top config
    video = np.random.default_rng(0).integers(0, 255, (2, 50, 60, 3), dtype=np.uint8)
    batch = proc.collate([proc([{"role": "user", "content": "<video>\nWhat?"}], videos=[video])])
    frames = reference_embeddings(vision, state, kind, batch["pixel_values"], "row")
    with torch.no_grad():
        ids = batch["input_ids"]
        embeds = llm.get_input_embeddings()(ids)
        embeds[ids == proc.image_token_id] = frames.reshape(-1, 32)
        expected = llm(inputs_embeds=embeds).logits
        torch.testing.assert_close(model(**batch, return_logits=True).logits, expected, rtol=0, atol=1e-5)


def test_any_hf_causal_lm_under_llm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from longvila.text.tokenizer import load_tiny_tokenizer

    config = LlamaConfig(
        vocab_size=len(load_tiny_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    llm, vision, tokenizer = tiny_parts(56, 8, llm_cls=LlamaForCausalLM, llm_config=config)
    state = official_projector_state("mlp_downsample", 8, 32)
    write_split_layout(
        tmp_path, llm, vision, state, tokenizer, "mlp_downsample", top_config("nvila", "mlp_downsample")
    )
    model = LongVILA.from_pretrained(tmp_path).eval()
    assert model.llm.config.model_type == "llama"
    ids = torch.randint(10, 200, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llm(input_ids=ids).logits)


# ---- the order rule --------------------------------------------------------------------------------
def _layout(tmp_path, kind="mlp_downsample", top=None):
    llm, vision, tokenizer = tiny_parts(56, 8)
    return write_split_layout(
        tmp_path, llm, vision, official_projector_state(kind, 8, 32), tokenizer, kind, top
    )


def test_without_a_top_config_the_rule_guesses_column_and_warns(tmp_path):
    path = _layout(tmp_path, top=None)
    with pytest.warns(UserWarning, match="--projector-order row"):
        model = LongVILA.from_pretrained(path)
    assert model.config.projector_token_order == "column"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice is not a guess
        assert LongVILA.from_pretrained(path, projector_order="row").config.projector_token_order == "row"


def test_user_override_wins_and_changes_the_embeddings(tmp_path):
    path = _layout(tmp_path, top=top_config("nvila", "mlp_downsample"))
    frames = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        row = LongVILA.from_pretrained(path).encode_frames(frames)
        column = LongVILA.from_pretrained(path, projector_order="column").encode_frames(frames)
    assert (row - column).abs().max() > 1e-2


def test_an_override_contradicting_a_fixed_type_fails(tmp_path):
    path = _layout(tmp_path, "mlp_downsample_2x2_fix", top_config("vila", "mlp_downsample_2x2_fix"))
    with pytest.raises(CheckpointError, match="always row-major"):
        LongVILA.from_pretrained(path, projector_order="column")


def test_explicit_projector_token_order_key_is_read(tmp_path):
    top = {**top_config("nvila", "mlp_downsample"), "projector_token_order": "column"}
    assert LongVILA.from_pretrained(_layout(tmp_path, top=top)).config.projector_token_order == "column"


# ---- settings longvila does not implement: each fails naming the key and the file -------------------
REFUSED = [
    ("config.json", "dynamic_s2", True),
    ("config.json", "s2", True),
    ("config.json", "image_aspect_ratio", "dynamic_s2"),
    ("config.json", "image_aspect_ratio", "pad"),
    (
        "config.json",
        "video_encoder",
        '{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}',
    ),
    (
        "config.json",
        "image_encoder",
        '{"_target_": "llava.model.encoders.BasicImageEncoder", "end_tokens": null}',
    ),
    ("config.json", "num_time_tokens", 8),
    ("config.json", "mm_use_im_start_end", True),
    ("config.json", "mm_vision_select_feature", "patch"),
    ("config.json", "ps3", True),
    ("config.json", "video_max_tiles", 4),
    ("config.json", "vision_resolution", 896),
    ("config.json", "mm_hidden_size", 3456),
    ("config_vila_style.json", "dynamic_s2", True),
    ("mm_projector/config.json", "mm_projector_type", "mlp2x_gelu"),
]


@pytest.mark.parametrize("file,key,value", REFUSED, ids=[f"{r[0]}:{r[1]}={r[2]}"[:60] for r in REFUSED])
def test_unsupported_settings_fail_naming_the_key_and_the_file(tmp_path, file, key, value):
    path = _layout(tmp_path, top=top_config("vila", "mlp_downsample"))
    data = json.loads((path / file).read_text())
    data[key] = value
    (path / file).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{path / file}: {key} = "):
        LongVILA.from_pretrained(path)
    with pytest.raises(CheckpointError, match=key):
        LongVILAProcessor.from_pretrained(path)


def test_the_basic_encoders_and_single_tile_settings_load(tmp_path):
    top = {**top_config("nvila", "mlp_downsample"), "image_encoder": BASIC_IMAGE, "vision_resolution": 56}
    top["video_max_tiles"] = 1
    LongVILA.from_pretrained(_layout(tmp_path, top=top))


def test_a_non_siglip_vision_tower_and_multi_scale_projector_fail_clearly(tmp_path):
    path = _layout(tmp_path / "a", top=top_config("nvila", "mlp_downsample"))
    config = json.loads((path / "vision_tower" / "config.json").read_text())
    config["model_type"] = "clip_vision_model"
    (path / "vision_tower" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_tower/config.json: model_type = 'clip_vision_model'"):
        LongVILA.from_pretrained(path)
    llm, vision, tokenizer = tiny_parts(56, 8)
    state = official_projector_state("mlp_downsample", 8 * 3, 32)  # NVILA dynamic-S2: 3 scales of features
    path = write_split_layout(
        tmp_path / "b", llm, vision, state, tokenizer, "mlp_downsample", top_config("nvila", "mlp_downsample")
    )
    with pytest.raises(CheckpointError, match=r"layers\.1\.weight.*multi-scale"):
        LongVILA.from_pretrained(path)


# ---- the 1M-context checkpoint's RoPE --------------------------------------------------------------
def test_rope_theta_and_linear_scaling_of_the_1m_checkpoint_are_honoured(tmp_path):
    """llm/config.json of qwen2-7b-longvila-1M: rope_theta 1062356830 with linear scaling 4.0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = _layout(tmp_path / "ckpt", top=top_config("longvila-2024-08", "mlp_downsample"))
    config_file = path / "llm" / "config.json"
    data = json.loads(config_file.read_text())
    data.pop("rope_parameters", None)
    data.update(
        rope_theta=1062356830, rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=524288
    )
    config_file.write_text(json.dumps(data))
    model = LongVILA.from_pretrained(path).eval()
    rope = model.llm.config.rope_parameters
    assert rope["rope_theta"] == 1062356830 and rope["rope_type"] == "linear" and rope["factor"] == 4.0

    def hf_logits(rope_parameters):
        base = {k: v for k, v in data.items() if k not in ("rope_theta", "rope_scaling")}
        llm = Qwen2ForCausalLM(Qwen2Config(**{**base, "rope_parameters": rope_parameters})).eval()
        llm.load_state_dict(model.llm.state_dict())
        with torch.no_grad():
            return llm(input_ids=ids, position_ids=positions).logits

    ids = torch.randint(10, 200, (1, 6))
    positions = torch.tensor([[0, 1, 2, 3000, 3001, 9000]])  # far positions, where θ and scaling show
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=positions).logits
    scaled = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1062356830.0}
    torch.testing.assert_close(got, hf_logits(scaled))
    assert (got - hf_logits({"rope_type": "default", "rope_theta": 10000.0})).abs().max() > 1e-3
    # and it survives our own format
    model.save_pretrained(tmp_path / "ours", processor=LongVILAProcessor.from_pretrained(path))
    again = LongVILA.from_pretrained(tmp_path / "ours").eval()
    assert again.llm.config.rope_parameters == model.llm.config.rope_parameters


def test_merge_blocks_matches_loops_for_every_block_and_order():
    for k in (2, 3):
        for grid in (5, 7, 8, 9, 27, 32):
            x = torch.randn(2, grid * grid, 3, dtype=torch.float64)
            for order in ("column", "row"):
                torch.testing.assert_close(
                    merge_blocks(x, k, order), merge_by_loops(x, k, order), rtol=0, atol=0
                )


def test_projector_keeps_the_release_keys_per_type():
    assert sorted(DownsampleProjector(4, 6, "mlp_downsample_3x3_fix", "row").state_dict()) == sorted(
        official_projector_state("mlp_downsample_3x3_fix", 4, 6)
    )
    with pytest.raises(ValueError, match="always uses row-major"):
        DownsampleProjector(4, 6, "mlp_downsample_2x2_fix", "column")


# ---- the NVILA -hf layout --------------------------------------------------------------------------
def write_nvila_hf(root, llm, vision, projector_state, tokenizer, extra=None):
    """config.json with text_config / vision_config / token ids, one safetensors with llm.* /
    vision_tower.vision_model.* / mm_projector.* keys, tokenizer and preprocessor config at the top."""
    from safetensors.torch import save_file
    from transformers import SiglipImageProcessorPil

    root.mkdir(parents=True)
    state = {"llm." + k: v for k, v in llm.state_dict().items()}
    state.update({"vision_tower.vision_model." + k: v for k, v in vision.state_dict().items()})
    state.update({"mm_projector." + k: v for k, v in projector_state.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = {
        "model_type": "nvila",
        "architectures": ["NVILAForConditionalGeneration"],
        "text_config": llm.config.to_dict(),
        "vision_config": vision.config.to_dict(),
        "image_token_id": image_id,
        "video_token_id": image_id,
        **(extra or {}),
    }
    (root / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(root))
    size = vision.config.image_size
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(root)
    return root


def test_nvila_hf_layout_built_from_hf_parts_loads_row_major(tmp_path):
    llm, vision, tokenizer = tiny_parts(70, 14)
    state = official_projector_state("mlp_downsample", 8, 32)
    path = write_nvila_hf(tmp_path / "hf", llm, vision, state, tokenizer)
    model = LongVILA.from_pretrained(path).eval()
    proc = LongVILAProcessor.from_pretrained(path)
    assert model.config.projector_token_order == "row" and proc.tokens_per_frame == 9
    pixel_values = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        got = model.encode_frames(pixel_values)
    torch.testing.assert_close(
        got, reference_embeddings(vision, state, "mlp_downsample", pixel_values, "row")
    )
    ids = torch.randint(10, 200, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llm(input_ids=ids).logits)


def test_nvila_hf_multi_scale_config_fails_naming_the_key(tmp_path):
    llm, vision, tokenizer = tiny_parts(56, 8)
    path = write_nvila_hf(
        tmp_path / "hf",
        llm,
        vision,
        official_projector_state("mlp_downsample", 24, 32),
        tokenizer,
        {"mm_hidden_size": 24},
    )
    with pytest.raises(CheckpointError, match=rf"{path / 'config.json'}: mm_hidden_size = 24"):
        LongVILA.from_pretrained(path)


def test_dynamic_aspect_ratio_loads_with_a_warning_about_single_images(tmp_path):
    top = {
        **top_config("nvila", "mlp_downsample"),
        "image_aspect_ratio": "dynamic",
        "mm_vision_select_layer": -1,
    }
    with pytest.warns(UserWarning, match="image_aspect_ratio 'dynamic'"):
        model = LongVILA.from_pretrained(_layout(tmp_path, top=top))
    assert model.config.vision_select_layer == -1


def test_our_configs_from_before_the_order_field_load_column_major(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config.pop("projector_token_order") == "column"
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert LongVILA.from_pretrained(tmp_path / "old").config.projector_token_order == "column"
    assert (
        LongVILA.from_pretrained(tmp_path / "old", projector_order="row").config.projector_token_order
        == "row"
    )
