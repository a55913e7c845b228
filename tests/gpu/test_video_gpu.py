"""GPU video decoding (NVDEC): `pyav-cuda` (PyAV hwaccel) and `torchcodec-cuda` against the CPU decode.

Skipped without CUDA. Not yet run on a device: no GPU was lent to the session that wrote them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _video_helpers import read_codes, write_video  # noqa: E402

from longvila.data.video import available_backends, decode_frames, uniform_indices  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("backend", ["pyav-cuda", "torchcodec-cuda"])
def test_gpu_decoding_returns_the_cpu_frames(tmp_path, backend):
    """The frames decoded on the GPU are the sampled ones (index codes) and, H.264 decoding being
    exact, their pixels match the CPU decode to within the RGB conversion's rounding."""
    if backend not in available_backends():
        pytest.skip(f"{backend} not available in this environment")
    path = write_video(tmp_path / "clip.mp4", 60, "libx264")
    for n in (5, 60):
        gpu, gpu_ts = decode_frames(path, num_frames=n, backend=backend)
        cpu, cpu_ts = decode_frames(path, num_frames=n)
        assert read_codes(gpu) == uniform_indices(60, n).tolist()
        assert gpu.shape == cpu.shape and gpu.dtype == np.uint8
        assert np.abs(gpu.astype(np.int16) - cpu).max() <= 2
        np.testing.assert_allclose(gpu_ts, cpu_ts, atol=1e-3)
