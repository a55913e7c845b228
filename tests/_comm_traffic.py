"""Count the bytes a rank sends, by wrapping torch.distributed's own calls (not the code's bookkeeping).

```python
with DistTraffic() as traffic:
    out = sp_attention(q, k, v, sp)
traffic.bytes   # {"all_to_all": ..., "ring_p2p": ..., "all_gather": ..., "reduce_scatter": ...}
traffic.calls   # the same keys: number of torch.distributed calls
```
Bytes are what leaves this rank: all_to_all_single sends (w - 1) / w of its input; an all-gather sends
its input to each of the w - 1 others; a reduce-scatter sends the w - 1 shares that are not its own;
batch_isend_irecv sends every isend tensor. A call on a one-rank group moves nothing and is not counted.
"""

from __future__ import annotations

from collections import defaultdict

import torch.distributed as dist

_WRAPPED = {
    "all_to_all_single": "all_to_all",
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "batch_isend_irecv": "ring_p2p",
    "all_reduce": "all_reduce",
    "all_gather": "all_gather_list",
    "broadcast": "broadcast",
    "send": "send",
    "isend": None,  # counted through batch_isend_irecv (P2POp checks the real isend), never wrapped
}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _sent(name: str, args, kwargs) -> int:
    group = kwargs.get("group")
    world = dist.get_world_size(group)
    if name == "all_to_all_single":
        return _nbytes(args[1]) * (world - 1) // world
    if name in ("all_gather_into_tensor", "all_gather_single"):
        return _nbytes(args[1]) * (world - 1)
    if name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        return _nbytes(args[0]) * (world - 1)
    if name == "batch_isend_irecv":
        return sum(_nbytes(op.tensor) for op in args[0] if op.op.__name__ == "isend")
    if name == "all_reduce":
        return 2 * _nbytes(args[0]) * (world - 1) // world  # ring all-reduce
    if name == "all_gather":
        return _nbytes(args[1]) * (world - 1)
    return _nbytes(args[0])


def _world(name: str, args, kwargs) -> int:
    if name == "batch_isend_irecv":
        return 2 if args[0] else 1
    return dist.get_world_size(kwargs.get("group"))


class DistTraffic:
    """Context manager: wraps torch.distributed's collectives and point-to-point batches."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, kind: str, real):
        def counted(*args, **kwargs):
            if _world(name, args, kwargs) > 1:
                self.bytes[kind] += _sent(name, args, kwargs)
                self.calls[kind] += 1
            return real(*args, **kwargs)

        return counted

    def __enter__(self) -> DistTraffic:
        for name, kind in _WRAPPED.items():
            real = getattr(dist, name, None)
            if kind is None or real is None:
                continue
            self._saved[name] = real
            setattr(dist, name, self._wrap(name, kind, real))
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)
        self._saved.clear()
