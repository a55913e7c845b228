"""Long-video prefill on one GPU: a LongVILA-7B-shaped LLM (random weights) reads N frames x 197 tokens
(196 frame tokens + "\\n") and produces the first answer token. Time to first token and peak memory of
longvila (chunked prefill into the KV cache, LM head on the last position only) against the Hugging Face
path (one forward over the whole prompt with `logits_to_keep=1`), in one run. Frame embeddings are random
(the vision tower's share is measured by benchmarks/vision.py).

    python benchmarks/prefill.py --frames 256,512,1024,2048 --chunk 16384
    python benchmarks/prefill.py --device cpu --model tiny --frames 4,8 --tokens-per-frame 17 --chunk 32   # smoke
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QWEN2, SIGLIP_TINY, dump, is_oom, machine, peak_memory, qwen2_config, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(QWEN2), default="7b")
    parser.add_argument("--frames", default="256,512,1024,2048")
    parser.add_argument("--tokens-per-frame", type=int, default=197)
    parser.add_argument("--chunk", type=int, default=16384, help="longvila's prefill chunk (tokens)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="hf,longvila")
    parser.add_argument("--out")
    args = parser.parse_args()
    from longvila import LongVILA, LongVILAConfig

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    config = LongVILAConfig(
        llm=qwen2_config(args.model),
        vision=dict(SIGLIP_TINY, model_type="siglip_vision_model"),
        image_token_id=0,
    )
    with torch.device(args.device):
        model = LongVILA(config).to(dtype).eval()
    width = config.llm_hidden_size
    results = {"machine": machine(), "model": args.model, "chunk": args.chunk, "cases": []}
    for frames in (int(f) for f in args.frames.split(",")):
        tokens = frames * args.tokens_per_frame
        embeds = torch.randn(1, tokens, width, device=args.device, dtype=dtype) * 0.02
        positions = torch.arange(tokens, device=args.device)[None]
        for variant in args.variants.split(","):
            case = {"variant": variant, "frames": frames, "tokens": tokens}

            @torch.no_grad()
            def run(variant=variant, embeds=embeds, positions=positions):
                if variant == "hf":
                    model.llm.config._attn_implementation = "sdpa"
                    out = model.llm(
                        inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1
                    )
                    return out.logits[:, -1].argmax(-1)
                model.llm.config._attn_implementation = "longvila"
                return model.generate(inputs_embeds=embeds, max_new_tokens=1, prefill_chunk_size=args.chunk)

            try:
                with peak_memory(args.device, case):
                    case["ttft_s"] = timed(run, args.device, 1, 0)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                case["oom"] = True
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            results["cases"].append(case)
    by = {(c["variant"], c["frames"]): c for c in results["cases"] if "ttft_s" in c}
    for case in results["cases"]:
        base = by.get(("hf", case["frames"]))
        if base and case["variant"] != "hf" and "ttft_s" in case:
            case["ttft_vs_hf"] = case["ttft_s"] / base["ttft_s"]
    dump(results, args.out)


if __name__ == "__main__":
    main()
