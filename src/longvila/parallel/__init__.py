"""Sequence parallelism for long sequences: the (dp, ring, ulysses) layout and 2D attention.

```python
from longvila.parallel import init_sp, sp_attention
sp = init_sp(ulysses=2, ring=2)          # after torch.distributed init; world = dp x ring x ulysses
x_local = sp.shard(x, dim=1)             # this rank's zigzag share of the full sequence
o = sp_attention(q, k, v, sp, causal=True, cu_seqlens=None)
```
This package never imports from `longvila.model`.
"""

from longvila.parallel.comm import CommCounter
from longvila.parallel.hybrid import sp_attention, sp_attention_comm_bytes
from longvila.parallel.mesh import SequenceParallel, init_sp, zigzag_indices

__all__ = [
    "CommCounter",
    "SequenceParallel",
    "init_sp",
    "sp_attention",
    "sp_attention_comm_bytes",
    "zigzag_indices",
]
