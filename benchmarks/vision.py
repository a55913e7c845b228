"""Frames per second through the vision tower: SigLIP-so400m at 384 px (random weights).

Compares LongVILA's tower (reads hidden layer -2 and stops there, micro-batched) with the Hugging Face
call it replaces (`SiglipVisionModel(..., output_hidden_states=True).hidden_states[-2]`), in one run.

    python benchmarks/vision.py --frames 512 --batch 64
    python benchmarks/vision.py --device cpu --tiny --frames 16 --batch 8      # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SIGLIP_SO400M, SIGLIP_TINY, dump, machine, peak_memory, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized tower instead of so400m")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from longvila.model.vision import VisionTower

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    shape = SIGLIP_TINY if args.tiny else SIGLIP_SO400M
    with torch.device(args.device):
        hf = SiglipVisionModel(SiglipVisionConfig(**shape)).to(dtype).eval()
    tower = VisionTower(hf, select_layer=-2, micro_batch=args.batch)
    size = shape["image_size"]
    frames = torch.randn(args.frames, 3, size, size, device=args.device, dtype=dtype)
    results = {"machine": machine(), "frames": args.frames, "batch": args.batch, "image_size": size}

    @torch.no_grad()
    def ours():
        tower(frames)

    @torch.no_grad()
    def baseline():
        for chunk in frames.split(args.batch):
            hf(pixel_values=chunk, output_hidden_states=True).hidden_states[-2]

    for name, fn in (("hf_hidden_states", baseline), ("longvila", ours)):
        entry = {}
        with peak_memory(args.device, entry):
            seconds = timed(fn, args.device, args.steps, 1)
        entry["frames_per_s"] = args.frames / seconds
        results[name] = entry
    results["speedup"] = results["longvila"]["frames_per_s"] / results["hf_hidden_states"]["frames_per_s"]
    dump(results, args.out)


if __name__ == "__main__":
    main()
