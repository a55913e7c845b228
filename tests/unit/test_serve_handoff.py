"""The engine route: the LLM exported as a plain HF checkpoint plus our prompt embeddings reproduce our
model's logits and tokens in Hugging Face's own Qwen2 (what vLLM loads, fed what vLLM would be fed)."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from _models import lively_tiny_model
from transformers import AutoModelForCausalLM

from longvila.serve.handoff import encode_prompt_embeds, export_llm, prompt_embeds


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_processor):
    model = lively_tiny_model(seed=2)
    out = export_llm(model, tiny_processor, tmp_path_factory.mktemp("export") / "llm")
    return model, out


def conversation():
    rng = np.random.default_rng(5)
    video = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    return [
        {
            "role": "user",
            "content": [{"type": "video", "video": video}, {"type": "text", "text": "What now?"}],
        }
    ]


def test_export_is_a_plain_hf_checkpoint(exported, tiny_processor):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert tiny_processor.im_end_id in generation["eos_token_id"]  # the engine stops where we stop
    assert "longvila" not in json.dumps(config)
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_refuses_a_non_empty_directory(exported, tiny_processor, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_llm(exported[0], tiny_processor, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_hf_model_fed_our_prompt_embeds_matches_our_forward_and_generate(exported, tiny_processor):
    model, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    messages = conversation()
    embeds = prompt_embeds(model, tiny_processor, messages)
    sample = tiny_processor(messages)
    assert embeds.shape == (sample["input_ids"].shape[0], model.config.llm["hidden_size"])
    with torch.no_grad():
        theirs = hf(inputs_embeds=embeds[None]).logits[0]
        ours = model(
            sample["input_ids"][None], pixel_values=sample["pixel_values"], return_logits=True
        ).logits[0]
    torch.testing.assert_close(theirs, ours.float(), rtol=1e-5, atol=1e-5)
    new_ids = model.generate(**tiny_processor.collate([sample]), max_new_tokens=8)[0].tolist()
    with torch.no_grad():
        hf_ids = hf.generate(inputs_embeds=embeds[None], max_new_tokens=8, do_sample=False, eos_token_id=None)
    hf_ids = hf_ids[0, -8:].tolist()
    assert hf_ids[: len(new_ids)] == new_ids
    assert len(set(new_ids)) > 1  # the tokens vary, so the equality means something


def test_encoded_prompt_embeds_round_trip(exported, tiny_processor):
    model, _ = exported
    embeds = prompt_embeds(model, tiny_processor, conversation())
    decoded = torch.load(io.BytesIO(base64.b64decode(encode_prompt_embeds(embeds))), weights_only=True)
    assert torch.equal(decoded, embeds)
