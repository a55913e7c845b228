"""Checkpoints: own-format round trip, the official LongVILA layout, composing from parts, bad input."""

import json

import numpy as np
import pytest
import torch
from _layouts import tiny_qwen2
from _reference import merge_2x2_by_loops
from safetensors.torch import save_file
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from longvila import LongVILA, LongVILAConfig, LongVILAProcessor
from longvila.model.checkpoint import CheckpointError
from longvila.text.tokenizer import load_tiny_tokenizer


def sample_batch(proc, frames=3, seed=0):
    video = np.random.default_rng(seed).integers(0, 255, (frames, 40, 56, 3), dtype=np.uint8)
    return proc.collate(
        [
            proc(
                [
                    {"role": "user", "content": "<video>\nWhat colour?"},
                    {"role": "assistant", "content": "red"},
                ],
                videos=[video],
                num_frames=frames,
            )
        ]
    )


def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_model, tiny_processor):
    batch = sample_batch(tiny_processor)
    before = tiny_model(**batch, return_logits=True)
    tiny_model.save_pretrained(tmp_path / "ckpt", processor=tiny_processor)
    loaded = LongVILA.from_pretrained(tmp_path / "ckpt").eval()
    proc = LongVILAProcessor.from_pretrained(tmp_path / "ckpt")
    after = loaded(**sample_batch(proc), return_logits=True)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)
    assert (
        loaded.llm.get_output_embeddings().weight.data_ptr()
        == loaded.llm.get_input_embeddings().weight.data_ptr()
    )
    assert not list(tmp_path.glob(".ckpt.tmp-*")), "temporary directory left behind"


def test_sharded_save_round_trips(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loaded = LongVILA.from_pretrained(tmp_path / "sharded")
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def write_official_layout(root, llm, vision, projector_state, tokenizer, select_layer=-2):
    """The release's layout, each part written through Hugging Face's save_pretrained."""
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(str(root / "llm"))
    vision.save_pretrained(root / "vision_tower")
    SiglipImageProcessor(
        size={"height": vision.config.image_size, "width": vision.config.image_size}
    ).save_pretrained(root / "vision_tower")
    (root / "mm_projector").mkdir()
    (root / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": "mlp_downsample"}))
    save_file(projector_state, str(root / "mm_projector" / "model.safetensors"))
    (root / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaLlamaModel"],
                "llm_cfg": {"architectures": ["Qwen2ForCausalLM"]},
                "vision_tower_cfg": {"architectures": ["SiglipVisionModel"]},
                "mm_projector_cfg": {"mm_projector_type": "mlp_downsample"},
                "mm_vision_select_layer": select_layer,
            }
        )
    )


@pytest.fixture
def official_parts():
    torch.manual_seed(0)
    tokenizer = load_tiny_tokenizer()
    llm = tiny_qwen2(len(tokenizer))
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            image_size=56,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
        )
    ).eval()
    projector = torch.nn.Sequential(
        torch.nn.Identity(),
        torch.nn.LayerNorm(64),
        torch.nn.Linear(64, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 32),
    )
    for p in projector.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return llm, vision, projector, tokenizer


def test_official_layout_loads_and_matches_parts_composed_by_hand(tmp_path, official_parts):
    llm, vision, projector, tokenizer = official_parts
    write_official_layout(
        tmp_path, llm, vision, {"layers." + k: v for k, v in projector.state_dict().items()}, tokenizer
    )
    model = LongVILA.from_pretrained(tmp_path).eval()
    proc = LongVILAProcessor.from_pretrained(tmp_path)
    assert proc.tokens_per_frame == 16 and model.config.tokens_per_frame == 16  # 7x7 grid, padded to 8x8
    batch = sample_batch(proc, frames=2)
    with torch.no_grad():
        # By hand: SigLIP second-to-last hidden layer -> the formula's 2x2 merge -> the Sequential's MLP.
        feats = vision(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
        frames = projector[4](projector[3](projector[2](projector[1](merge_2x2_by_loops(feats)))))
        torch.testing.assert_close(model.encode_frames(batch["pixel_values"]), frames)
        ids = batch["input_ids"]
        embeds = llm.get_input_embeddings()(ids)
        embeds[ids == proc.image_token_id] = frames.reshape(-1, 32)
        expected = llm(inputs_embeds=embeds).logits
        torch.testing.assert_close(model(**batch, return_logits=True).logits, expected)


def test_from_parts_composes_hf_checkpoints_with_a_fresh_projector(tmp_path, official_parts):
    llm, vision, _, tokenizer = official_parts
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(str(tmp_path / "llm"))
    vision.save_pretrained(tmp_path / "siglip")
    model = LongVILA.from_parts(tmp_path / "llm", tmp_path / "siglip")
    ids = torch.randint(10, 1000, (1, 12))
    torch.testing.assert_close(model(input_ids=ids).logits, llm(input_ids=ids).logits)
    assert model.mm_projector.layers[2].weight.shape == (32, 64)


def test_weight_of_the_wrong_shape_names_the_tensor(tmp_path, official_parts):
    llm, vision, projector, tokenizer = official_parts
    state = {"layers." + k: v for k, v in projector.state_dict().items()}
    state["layers.2.weight"] = torch.zeros(32, 60)
    write_official_layout(tmp_path, llm, vision, state, tokenizer)
    with pytest.raises(CheckpointError, match=r"layers\.2\.weight.*\(32, 60\).*\(32, 64\)"):
        LongVILA.from_pretrained(tmp_path)


def test_own_checkpoint_with_a_wrong_shape_or_layout_fails_clearly(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config["llm"]["intermediate_size"] = 100
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight"):
        LongVILA.from_pretrained(tmp_path / "ok")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a known checkpoint layout"):
        LongVILA.from_pretrained(tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        LongVILA.from_pretrained(tmp_path / "missing")


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, tiny_model, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    import longvila.model.checkpoint as ck

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="projector_type 'linear'"):
        LongVILAConfig.tiny(projector_type="linear")
    with pytest.raises(ValueError, match="unknown LongVILAConfig keys"):
        LongVILAConfig.from_dict({**LongVILAConfig.tiny().to_dict(), "frobnicate": 1})
