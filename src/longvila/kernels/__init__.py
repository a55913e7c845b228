"""Pure-torch compute kernels shared by `longvila.model` and `longvila.parallel` (no distributed code).

`attention`: the fused block kernel returning (out, lse), its backward with an external LSE, the LSE
merge and the mask-free decomposition of packed causal attention into kernel pieces.
"""
