"""What each stage trains; stage 4: LoRA targets, RoPE base, merged model equal to the unmerged one."""

import pytest
import torch

from longvila import LongVILA, LongVILAConfig
from longvila.train.recipe import StageSection
from longvila.train.stages import apply_stage, finish_stage, rope_theta, trainable_parameter_names


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LongVILA(LongVILAConfig.tiny())


def _groups(names):
    return {n.split(".")[0] for n in names}


def test_stage_1_trains_the_projector_only(model):
    apply_stage(model, StageSection(number=1))
    names = trainable_parameter_names(model)
    assert _groups(names) == {"mm_projector"}
    assert len(names) == len(list(model.mm_projector.parameters()))


def test_stage_2_trains_projector_and_llm(model):
    apply_stage(model, StageSection(number=2))
    assert _groups(trainable_parameter_names(model)) == {"mm_projector", "llm"}
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())


@pytest.mark.parametrize("number", [3, 5])
def test_stages_3_and_5_train_everything(model, number):
    apply_stage(model, StageSection(number=number))
    assert all(p.requires_grad for p in model.parameters())


def test_stage_4_lora_on_qkvo_with_embeddings_and_norms(model):
    apply_stage(model, StageSection(number=4, rope_theta=1e6))
    names = trainable_parameter_names(model)
    assert _groups(names) == {"llm"}
    lora = [n for n in names if "lora_" in n]
    layers = model.config.llm["num_hidden_layers"]
    for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert sum(f".{target}.lora_A" in n for n in lora) == layers
        assert sum(f".{target}.lora_B" in n for n in lora) == layers
    assert not any("mlp" in n for n in lora)
    full = [n for n in names if "lora_" not in n]
    assert any("embed_tokens" in n for n in full)
    assert sum("layernorm" in n for n in full) == 2 * layers
    assert any(n.endswith("model.norm.weight") for n in full)
    base = [n for n, p in model.llm.named_parameters() if "q_proj.base_layer.weight" in n]
    assert base and not any(dict(model.llm.named_parameters())[n].requires_grad for n in base)


def test_stage_4_raises_the_rope_base(model):
    apply_stage(model, StageSection(number=4, rope_theta=1e6, max_length=65536))
    assert rope_theta(model) == 1e6
    head_dim = model.config.llm["head_dim"]
    expected = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    rotary = [m for m in model.llm.modules() if hasattr(m, "inv_freq")]
    assert rotary
    for module in rotary:
        torch.testing.assert_close(module.inv_freq, expected)
    assert model.config.llm["rope_theta"] == 1e6
    assert model.llm.config.max_position_embeddings == 65536


def test_stage_4_merged_model_equals_unmerged(model, tiny_processor, tmp_path):
    apply_stage(model, StageSection(number=4, rope_theta=1e6))
    with torch.no_grad():  # trained adapters: lora_B is zero at init, which would make the test vacuous
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(10, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    finish_stage(model, StageSection(number=4))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # The merged model exports and loads as a plain LongVILA with the raised base.
    model.save_pretrained(tmp_path / "m", processor=tiny_processor)
    loaded = LongVILA.from_pretrained(tmp_path / "m").eval()
    assert rope_theta(loaded) == 1e6
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
