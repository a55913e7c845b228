"""Projector against an independent implementation of the official 2x2 formula; the vision tower
against Hugging Face's own hidden states."""

import torch
from _reference import merge_2x2_by_loops
from transformers import SiglipVisionConfig, SiglipVisionModel

from longvila.model.projector import MLPDownsampleProjector, merge_2x2
from longvila.model.vision import VisionTower


def test_merge_matches_loops_odd_and_even_grids():
    for grid in (27, 8, 5):
        x = torch.randn(3, grid * grid, 6, dtype=torch.float64)
        torch.testing.assert_close(merge_2x2(x), merge_2x2_by_loops(x), rtol=0, atol=0)


def test_projector_equals_formula_then_mlp():
    torch.manual_seed(0)
    proj = MLPDownsampleProjector(6, 10).double()
    x = torch.randn(2, 27 * 27, 6, dtype=torch.float64)
    ln, fc1, fc2 = proj.layers[1], proj.layers[2], proj.layers[4]
    ref = fc2(torch.nn.functional.gelu(fc1(ln(merge_2x2_by_loops(x)))))
    torch.testing.assert_close(proj(x), ref)
    assert proj(x).shape == (2, 196, 10)
    # The release's state-dict keys, so official mm_projector weights load as they are.
    assert sorted(proj.state_dict()) == [
        "layers.1.bias",
        "layers.1.weight",
        "layers.2.bias",
        "layers.2.weight",
        "layers.4.bias",
        "layers.4.weight",
    ]


def test_siglip_384_patch14_gives_196_tokens_per_frame():
    from longvila import LongVILA, LongVILAConfig

    config = LongVILAConfig.tiny()
    config.vision.update(
        image_size=384,
        patch_size=14,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    config = LongVILAConfig.from_dict(config.to_dict())
    assert config.tokens_per_frame == 196
    model = LongVILA(config)
    emb = model.encode_frames(torch.randn(1, 3, 384, 384))
    assert emb.shape == (1, 196, config.llm_hidden_size)


def test_vision_tower_reads_the_selected_layer_in_micro_batches():
    torch.manual_seed(0)
    hf = (
        SiglipVisionModel(
            SiglipVisionConfig(
                image_size=32,
                patch_size=8,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
            )
        )
        .double()
        .eval()
    )
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states
    for layer in (-2, -1, 1):
        tower = VisionTower(hf, select_layer=layer, micro_batch=2)
        torch.testing.assert_close(tower(x), hidden[layer])
