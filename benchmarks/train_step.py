"""One training step (forward, backward, AdamW) of Qwen2 shapes at long context, several stacks in one run.

Variants (each with and without activation checkpointing):
  longvila      LongVILA's LLM path: chunked LM head + loss (no full logits), SDPA, fused AdamW;
                `-sel` = selective checkpointing (keeps attention outputs), `-full` = full checkpointing
  hf            Hugging Face Qwen2ForCausalLM + SDPA, its own loss, AdamW; `-ckpt` = checkpointing
  liger         Hugging Face + Liger kernels (fused linear cross entropy, RMSNorm, RoPE, SwiGLU), when
                liger-kernel is installed; `-ckpt` = checkpointing

MFU counts model FLOPs only: 6·N·L + 6·layers·hidden·L² per step (N = parameters that multiply: all
but the input embedding, the LM head counted once; L = tokens), over 989 TFLOP/s (H100 bf16 dense).

    python benchmarks/train_step.py --model 1.5b --tokens 8192,16384,32768 --out results.json
    python benchmarks/train_step.py --model 1.5b --find-max --variants longvila-sel,liger-ckpt
    python benchmarks/train_step.py --device cpu --model tiny --tokens 128 --steps 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    H100_BF16_DENSE_TFLOPS,
    QWEN2,
    SIGLIP_TINY,
    dump,
    is_oom,
    machine,
    peak_memory,
    qwen2_config,
    timed,
)  # noqa: E402

VARIANTS = ["longvila", "longvila-sel", "longvila-full", "hf", "hf-ckpt", "liger", "liger-ckpt"]


def model_flops(config: dict, tokens: int) -> float:
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter  # q, o, k, v, MLP
    params = layers * per_layer + config["vocab_size"] * h
    return 6.0 * params * tokens + 6.0 * layers * h * tokens * tokens


def build(variant: str, name: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = qwen2_config(name)
    if variant.startswith("longvila"):
        from longvila import LongVILA, LongVILAConfig
        from longvila.model.memory import set_activation_checkpointing

        cfg = LongVILAConfig(
            llm=config, vision=dict(SIGLIP_TINY, model_type="siglip_vision_model"), image_token_id=0
        )
        with torch.device(device):
            model = LongVILA(cfg).to(dtype)
        set_activation_checkpointing(
            model, {"longvila": "none", "longvila-sel": "selective"}.get(variant, "full"), vision=False
        )

        def step(ids):
            return model(input_ids=ids, labels=ids).loss
    else:
        cfg = Qwen2Config(**{k: v for k, v in config.items() if k != "model_type"})
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).to(dtype)
        model.config._attn_implementation = "sdpa"
        if variant.startswith("liger"):
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model)
        if variant.endswith("-ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def step(ids):
            return model(input_ids=ids, labels=ids).loss

    model.train()
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-5, fused=fused if variant.startswith("longvila") else None
    )
    return model, optimizer, step, config


def run_case(variant: str, name: str, tokens: int, device: str, dtype, steps: int, warmup: int) -> dict:
    result = {"variant": variant, "model": name, "tokens": tokens}
    state = {}
    try:
        state["model"], state["optimizer"], loss_fn, config = build(variant, name, device, dtype)
        # Id 0 stands for <image> in the text-only LongVILA model (image_token_id=0): never draw it.
        ids = torch.randint(1, config["vocab_size"], (1, tokens), device=device)

        def one_step():
            loss = loss_fn(ids)
            loss.backward()
            state["optimizer"].step()
            state["optimizer"].zero_grad(set_to_none=True)

        with peak_memory(device, result):
            seconds = timed(one_step, device, steps, warmup)
        result.update(
            step_s=seconds,
            tokens_per_s=tokens / seconds,
            mfu=model_flops(config, tokens) / seconds / (H100_BF16_DENSE_TFLOPS * 1e12),
        )
    except Exception as exc:  # OOM is a result, anything else is reported too
        if not is_oom(exc):
            raise
        result["oom"] = True
    finally:
        state.clear()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(QWEN2), default="1.5b")
    parser.add_argument("--tokens", default="8192,16384,32768,65536,131072")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--find-max", action="store_true", help="double the tokens until out of memory")
    parser.add_argument("--out", help="write the JSON results here too")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        skipped = [v for v in variants if v.startswith("liger")]
        if skipped:
            print(f"liger-kernel not installed: skipping {skipped}", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("liger")]
    results = {"machine": machine(), "dtype": str(dtype), "cases": []}
    for variant in variants:
        if args.find_max:
            tokens, longest = int(args.tokens.split(",")[0]), None
            while True:
                case = run_case(variant, args.model, tokens, args.device, dtype, 1, 0)
                results["cases"].append(case)
                if case.get("oom"):
                    break
                longest, tokens = tokens, tokens * 2
            results.setdefault("longest", {})[variant] = longest
        else:
            for tokens in (int(t) for t in args.tokens.split(",")):
                results["cases"].append(
                    run_case(variant, args.model, tokens, args.device, dtype, args.steps, args.warmup)
                )
    # Ratios against the baselines in the same run.
    by_key = {(c["variant"], c["tokens"]): c for c in results["cases"] if "tokens_per_s" in c}
    for case in results["cases"]:
        for base in ("hf", "liger", "liger-ckpt"):
            other = by_key.get((base, case["tokens"]))
            if other and "tokens_per_s" in case and case["variant"] != base:
                case[f"speed_vs_{base}"] = case["tokens_per_s"] / other["tokens_per_s"]
    dump(results, args.out)


if __name__ == "__main__":
    main()
