"""Frame preprocessing equals Hugging Face's PIL SigLIP image processor bit for bit on uint8 frames."""

import numpy as np
import pytest
import torch
from transformers import SiglipImageProcessorPil

from longvila.processor import LongVILAProcessor, preprocess_frames

SIGLIP = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
CASES = [
    # (frames, height, width, target size, normalisation)
    (3, 40, 56, 64, SIGLIP),  # upscale, not square
    (2, 720, 1280, 448, SIGLIP),  # 720p to LongVILA-R1's 448
    (2, 480, 640, 384, IMAGENET),  # to LongVILA's 384, other mean/std
    (2, 384, 384, 384, SIGLIP),  # already the size: no resize
    (41, 17, 23, 70, SIGLIP),  # more frames than one normalisation chunk, odd sizes
    (1, 999, 3, 56, IMAGENET),  # extreme aspect ratio
]


def hf_pixels(frames, size, mean, std):
    processor = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    return torch.from_numpy(np.stack(processor(list(frames))["pixel_values"]))


@pytest.mark.parametrize("count,height,width,size,norm", CASES, ids=[f"{c[1]}x{c[2]}->{c[3]}" for c in CASES])
def test_pixels_equal_siglip_image_processor(count, height, width, size, norm):
    frames = np.random.default_rng(height * width).integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    ours = preprocess_frames(frames, size, *norm)
    reference = hf_pixels(frames, size, *norm)
    assert ours.dtype == reference.dtype == torch.float32 and ours.shape == reference.shape
    assert torch.equal(ours, reference)


def test_the_processor_gives_the_reference_pixels_for_a_read_only_video():
    proc = LongVILAProcessor.tiny()
    video = np.random.default_rng(1).integers(0, 256, (4, 90, 120, 3), dtype=np.uint8)
    video.flags.writeable = False
    sample = proc([{"role": "user", "content": "<video>\nWhat?"}], videos=[video], num_frames=4)
    assert torch.equal(
        sample["pixel_values"], hf_pixels(video, proc.image_size, proc.image_mean, proc.image_std)
    )


def test_a_different_filter_would_be_caught():
    """The comparison is sensitive: torch's antialiased bicubic (the previous implementation) differs."""
    frames = np.random.default_rng(2).integers(0, 256, (2, 100, 130, 3), dtype=np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 255)
    torch_pixels = (x / 255 - 0.5) / 0.5
    assert not torch.equal(torch_pixels, hf_pixels(frames, 64, *SIGLIP))
    assert torch.equal(preprocess_frames(frames, 64, *SIGLIP), hf_pixels(frames, 64, *SIGLIP))


def test_the_benchmark_runs_and_checks_identity(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "preprocess.py"
    out = tmp_path / "result.json"
    args = ["--frames", "4", "--cases", "240p:64", "--repeats", "1", "--out", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (case,) = json.loads(out.read_text())["cases"]
    assert case["identical"] and case["frames"] == 4
    assert {"longvila_fps", "hf_pil_fps", "torch_bicubic_fps", "speedup_vs_hf"} <= set(case)
