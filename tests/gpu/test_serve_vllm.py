"""The engine route on a GPU: vLLM loads `export_llm`'s checkpoint and, fed `prompt_embeds`, decodes the
same greedy tokens as our model. Skipped without CUDA or without vLLM (not run on this project's CPU
machines)."""

import numpy as np
import pytest
import torch
from _models import lively_tiny_model

from longvila.processor import LongVILAProcessor
from longvila.serve.handoff import export_llm, prompt_embeds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_vllm_with_our_prompt_embeds_decodes_our_tokens(tmp_path):
    vllm = pytest.importorskip("vllm")
    processor = LongVILAProcessor.tiny()
    model = lively_tiny_model(seed=4).cuda()
    out = export_llm(model, processor, tmp_path / "llm")
    video = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    messages = [
        {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Now?"}]}
    ]
    embeds = prompt_embeds(model, processor, messages).float().cpu()
    ours = model.generate(**processor.collate([processor(messages)]), max_new_tokens=8)[0].tolist()
    llm = vllm.LLM(
        str(out), enable_prompt_embeds=True, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2
    )
    params = vllm.SamplingParams(temperature=0.0, max_tokens=8)
    theirs = list(llm.generate({"prompt_embeds": embeds}, params)[0].outputs[0].token_ids)
    assert len(set(ours)) > 1
    assert theirs == ours[: len(theirs)]
