"""The scale planner: predicts per-GPU memory and step time of LongVILA training layouts and picks one.

```python
from longvila.plan import load_shape, Workload, plan
result = plan(load_shape("7b"), Workload.from_frames(2048), gpus=256)
result.best.layout.overrides()     # ['--parallel.ulysses_degree', '4', '--parallel.ring_degree', ...]
```
No torch import: the CLI (`longvila plan`) stays fast. docs/scaling.md has the equations.
"""

from longvila.plan.hardware import H100, HARDWARE, Hardware, get_hardware
from longvila.plan.memory import (
    BF16_FSDP,
    BF16_SINGLE,
    FP32_SINGLE,
    Layout,
    MemoryBreakdown,
    PrecisionPolicy,
    Workload,
    llm_layer_activation_bytes,
    predict_memory,
)
from longvila.plan.shapes import PRESETS, LLMShape, ModelShape, VisionShape, load_shape, shape_from_config

__all__ = [
    "BF16_FSDP",
    "BF16_SINGLE",
    "FP32_SINGLE",
    "H100",
    "HARDWARE",
    "PRESETS",
    "Hardware",
    "LLMShape",
    "Layout",
    "MemoryBreakdown",
    "ModelShape",
    "PrecisionPolicy",
    "VisionShape",
    "Workload",
    "get_hardware",
    "llm_layer_activation_bytes",
    "load_shape",
    "predict_memory",
    "shape_from_config",
]
