"""Per-GPU memory of one training step of LongVILA under a (dp, Ulysses, ring) layout.

Everything is counted in bytes from the shapes; no torch. The peak is the largest of four moments of
the step (see `MemoryBreakdown.phases`): the start of the forward (full-sequence embeddings before
MM-SP re-shards them), the end of the forward (every saved activation plus the loss's logits chunk),
the start of the backward (activations plus the LM head's gradient buffers and the attention's
communication buffers) and the optimizer step. docs/scaling.md derives each term.

Activations of one Qwen2 decoder layer (Hugging Face modules, SDPA/flash or the SP ring), per token,
e = bytes of the compute dtype, h hidden, q = Nq*head_dim, kv' = max(Nk, U)*head_dim, I intermediate.
The tensors kept for backward are (13, plus two per-token statistics):
   1. input RMSNorm: its input, upcast to float32 ............................ 4h
   2. input RMSNorm: normalised output (input of q/k/v projections) ......... e*h
   3-5. q and k after RoPE, v: the attention kernel's inputs ................ e*(q + 2 kv')
   6. attention output (kept by the kernel / ring for its backward) ........ e*q
   7. attention output made contiguous, input of o_proj .................... e*q
   8. post-attention RMSNorm input, float32 ................................. 4h
   9. post-attention RMSNorm output (input of gate/up projections) ......... e*h
  10. gate projection output (input of SiLU) ................................ e*I
  11. up projection output (input of the product) ........................... e*I
  12. SiLU output (input of the product) ................................... e*I
  13. product (input of down_proj) .......................................... e*I
  plus the attention's log-sum-exp (4*Nq, float32) and two RMSNorm reciprocal RMS values (2*4).
RoPE keeps only cos/sin (shared by all layers); q/k/v projection outputs before RoPE and residual sums
are not kept (their consumers need no input for backward). With activation checkpointing a layer keeps
only its input (e*h) and one layer's set is rebuilt during its backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from longvila.plan.shapes import LLMShape, ModelShape, VisionShape


@dataclass(frozen=True, kw_only=True)
class PrecisionPolicy:
    """Bytes per parameter and per activation element."""

    name: str
    param_bytes: int
    """Working copy the layers compute with."""
    grad_bytes: int
    """Gradient of the working copy."""
    master_bytes: int
    """Master weights kept by the optimizer (0 when the working copy is the master)."""
    moment_bytes: int
    """Both AdamW moments together."""
    activation_bytes: int
    """Compute dtype of activations (e)."""
    accumulation_bytes: int = 4
    """float32 accumulators: LSE, ring dK/dV, the chunked loss's head gradient, logits."""
    optimizer_temporaries: int = 0
    """Full-size temporaries of one parameter tensor in the optimizer step: 2 for torch's single-tensor
    AdamW (the CPU default: sqrt(v) and its scaled copy), 0 for the fused/foreach-in-place GPU path."""
    sharded: bool = True
    """FSDP2: parameters, gradients and optimizer state sharded over all dp x sp ranks, layers
    all-gathered one (plus one prefetched) at a time."""

    @property
    def state_bytes_per_param(self) -> int:
        return self.param_bytes + self.master_bytes + self.moment_bytes


BF16_FSDP = PrecisionPolicy(
    name="bf16 compute; FSDP2 shards bf16 params/grads, fp32 master weights and fp32 AdamW moments",
    param_bytes=2,
    grad_bytes=2,
    master_bytes=4,
    moment_bytes=8,
    activation_bytes=2,
)
FP32_SINGLE = PrecisionPolicy(
    name="fp32 everything, one process, torch AdamW (single-tensor)",
    param_bytes=4,
    grad_bytes=4,
    master_bytes=0,
    moment_bytes=8,
    activation_bytes=4,
    optimizer_temporaries=2,
    sharded=False,
)
BF16_SINGLE = PrecisionPolicy(
    name="bf16 params, grads, moments and activations, one process, torch AdamW (single-tensor)",
    param_bytes=2,
    grad_bytes=2,
    master_bytes=0,
    moment_bytes=4,
    activation_bytes=2,
    optimizer_temporaries=2,
    sharded=False,
)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How the GPUs are used: world = dp x ring x ulysses."""

    dp: int = 1
    ulysses: int = 1
    ring: int = 1
    checkpointing: bool = False
    vision_micro_batch: int = 64

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.dp * self.sp

    @property
    def label(self) -> str:
        ckpt = " +ckpt" if self.checkpointing else ""
        return f"dp{self.dp} U{self.ulysses} R{self.ring}{ckpt} vmb{self.vision_micro_batch}"

    def overrides(self) -> list[str]:
        """Recipe overrides (`longvila train RECIPE ...`) selecting this layout."""
        return [
            "--parallel.ulysses_degree",
            str(self.ulysses),
            "--parallel.ring_degree",
            str(self.ring),
            "--train.activation_checkpointing",
            "true" if self.checkpointing else "false",
            "--model.vision_micro_batch",
            str(self.vision_micro_batch),
        ]


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One packed sample (a row) per SP group per step."""

    tokens: int
    """Total sequence length T."""
    frames: int = 0
    """Video frames in the row (each becomes tokens_per_frame + 1 tokens)."""
    supervised_tokens: int = 512
    """Tokens with a target (the answer text); only these make logits in the chunked loss."""
    train_vision: bool = True
    """Vision tower and projector trained (stage 5: everything) and thus keep activations."""
    loss_chunk_size: int = 4096
    """Rows of logits the chunked loss builds at once."""

    @classmethod
    def from_frames(
        cls, frames: int, tokens_per_frame: int = 196, text_tokens: int = 512, **kwargs
    ) -> Workload:
        """Each frame is `tokens_per_frame` tokens plus the "\\n" that follows it."""
        kwargs.setdefault("supervised_tokens", text_tokens)
        return cls(tokens=frames * (tokens_per_frame + 1) + text_tokens, frames=frames, **kwargs)


# ------------------------------------------------------------------------------------------------
# Per-token and per-frame counts
# ------------------------------------------------------------------------------------------------


def llm_layer_activation_bytes(llm: LLMShape, e: int, ulysses: int = 1) -> int:
    """Bytes one decoder layer keeps for backward per (local) token; see the module docstring."""
    h, q, inter = llm.hidden, llm.q_dim, llm.intermediate
    kv = max(llm.kv_heads, ulysses) * llm.head_dim
    norms = 2 * (4 * h + e * h + 4)
    attention = e * (q + 2 * kv) + 2 * e * q + 4 * llm.q_heads
    return norms + attention + 4 * e * inter


def llm_layer_backward_transient_bytes(llm: LLMShape, e: int) -> int:
    """Gradients alive inside one layer's backward, per token: the MLP's dgate/dup/dproduct (3 e*I)
    and the residual stream's gradient plus the norm's float32 gradient (e*h + 4h)."""
    return 3 * e * llm.intermediate + (e + 4) * llm.hidden


def vision_frame_activation_bytes(vision: VisionShape, llm_hidden: int, e: int) -> int:
    """Bytes the SigLIP tower + projector keep for backward per frame.

    Per patch and layer: LayerNorm 1 input and output, q, k, v, attention output, its contiguous
    copy (out_proj input), LayerNorm 2 input and output: 9 c; fc1 output and GELU output: 2 I;
    plus LayerNorm statistics and the attention LSE. Projector per merged token: LayerNorm input
    and output (4c each), Linear 1 output and GELU output (d each); the padded feature copy.
    """
    c, inter = vision.hidden, vision.intermediate
    per_patch_layer = e * (9 * c + 2 * inter) + 16 + 4 * vision.heads
    merged = math.ceil(math.isqrt(vision.patches) / 2) ** 2
    projector = merged * e * (8 * c + 2 * llm_hidden) + 2 * vision.patches * c * e
    pixels = 3 * vision.image_size**2 * e
    return vision.patches * vision.layers_run * per_patch_layer + projector + pixels


def vision_frame_layer_bytes(vision: VisionShape, e: int) -> int:
    """One frame's activations of one vision layer (a checkpointed layer rebuilt in backward)."""
    return vision.patches * (e * (9 * vision.hidden + 2 * vision.intermediate) + 16 + 4 * vision.heads)


# ------------------------------------------------------------------------------------------------
# The breakdown
# ------------------------------------------------------------------------------------------------


@dataclass
class MemoryBreakdown:
    """Bytes per GPU by what holds them, and the four moments of the step."""

    weights: int = 0
    """Parameters (sharded working copy + master weights) held for the whole step."""
    optimizer: int = 0
    """AdamW moments."""
    gradients: int = 0
    """Parameter gradients at the end of the backward."""
    activations: int = 0
    """LLM layers' saved tensors for this rank's tokens (or checkpointed layer inputs)."""
    vision: int = 0
    """Vision tower + projector saved tensors for this rank's frames."""
    loss: int = 0
    """Chunked loss: the float32 head gradient and the hidden-state gradient it keeps from forward."""
    other: int = 0
    """Final norm, RoPE tables, ids/labels/positions."""
    phases: dict[str, int] = field(default_factory=dict)
    """Live bytes at: forward start, forward end, backward start, backward end, optimizer step."""

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def predict_memory(
    shape: ModelShape,
    layout: Layout,
    workload: Workload,
    policy: PrecisionPolicy = BF16_FSDP,
) -> MemoryBreakdown:
    """Per-GPU memory of one training step (forward, backward, AdamW step) of one row per SP group."""
    llm, vision = shape.llm, shape.vision
    e, acc = policy.activation_bytes, policy.accumulation_bytes
    sp, ulysses, ring = layout.sp, layout.ulysses, layout.ring
    shards = layout.world if policy.sharded else 1
    tokens_local = math.ceil(workload.tokens / sp)
    frames_local = math.ceil(workload.frames / sp)
    head_params = llm.vocab * llm.hidden
    params = shape.params if workload.train_vision else shape.params - shape.vision.params
    frozen = 0 if workload.train_vision else shape.vision.params

    out = MemoryBreakdown()
    out.weights = math.ceil(
        (params * (policy.param_bytes + policy.master_bytes) + frozen * policy.param_bytes) / shards
    )
    out.optimizer = math.ceil(params * policy.moment_bytes / shards)
    out.gradients = math.ceil(params * policy.grad_bytes / shards)

    # FSDP2 working buffers: the layer being computed and the one prefetched (bf16), plus a layer's
    # unsharded gradient before its reduce-scatter.
    fsdp_layer = 0
    fsdp_head = 0
    if policy.sharded and shards > 1:
        fsdp_layer = 2 * llm.layer_params * policy.param_bytes + llm.layer_params * policy.grad_bytes
        fsdp_head = head_params * (policy.param_bytes + policy.grad_bytes)

    # LLM activations.
    per_layer = llm_layer_activation_bytes(llm, e, ulysses)
    if layout.checkpointing:
        out.activations = tokens_local * (llm.layers * e * llm.hidden + per_layer)
    else:
        out.activations = tokens_local * llm.layers * per_layer
    backward_transient = tokens_local * llm_layer_backward_transient_bytes(llm, e)

    # Vision tower on this rank's frames (two-stage sharding).
    vision_transient = 0
    if frames_local and workload.train_vision:
        if layout.checkpointing:
            inputs = frames_local * vision.patches * vision.hidden * e * vision.layers_run
            rebuilt = min(layout.vision_micro_batch, frames_local) * vision_frame_layer_bytes(vision, e)
            out.vision = inputs + rebuilt
        else:
            out.vision = frames_local * vision_frame_activation_bytes(vision, llm.hidden, e)
    if frames_local:
        # One micro-batch's forward workspace (attention and MLP intermediates of one layer).
        vision_transient = min(layout.vision_micro_batch, frames_local) * vision_frame_layer_bytes(vision, e)

    # Loss: the head gradient in float32 and the hidden-state gradient, computed in forward.
    rows = min(workload.loss_chunk_size, workload.supervised_tokens, tokens_local)
    out.loss = head_params * acc + tokens_local * llm.hidden * e
    logits_chunk = rows * llm.vocab * (acc + (e if e != acc else 0))
    # Final norm (float32 input + output), RoPE cos/sin, ids/labels/positions (int64).
    out.other = tokens_local * (4 * llm.hidden + e * llm.hidden + 2 * e * llm.head_dim + 3 * 8)

    # Attention communication buffers (one layer at a time): Ulysses all-to-all keeps a stacked
    # copy and a receive buffer of q/k/v; the ring double-buffers K/V (and dK/dV in float32 in
    # backward) and accumulates dQ in float32.
    kv_local = max(llm.kv_heads, ulysses) * llm.head_dim
    comm = 0
    if ulysses > 1:
        comm += 2 * tokens_local * e * (llm.q_dim + 2 * kv_local)
    if ring > 1:
        kv_block = 2 * tokens_local * kv_local
        comm += 2 * kv_block * (e + acc) + tokens_local * llm.q_dim * acc

    static = out.weights + out.optimizer
    full_sequence = workload.tokens * llm.hidden * e * (2 if sp > 1 or workload.frames else 1)
    head_grad = head_params * (acc if policy.grad_bytes == acc else acc + policy.grad_bytes)
    out.phases = {
        "forward start": static + out.vision + vision_transient + full_sequence + fsdp_layer,
        "forward end": static
        + out.activations
        + out.vision
        + out.other
        + out.loss
        + logits_chunk
        + fsdp_head,
        "backward start": static
        + out.activations
        + out.vision
        + out.other
        + out.loss
        + head_grad
        + fsdp_head
        + comm
        + backward_transient,
        "backward end": static + out.gradients + out.vision + head_params * acc + fsdp_layer,
        "optimizer step": static
        + out.gradients
        + policy.optimizer_temporaries * _largest_tensor(shape, policy) * policy.param_bytes // shards,
    }
    return out


def _largest_tensor(shape: ModelShape, policy: PrecisionPolicy) -> int:
    """Elements of the largest parameter tensor (the embedding)."""
    llm = shape.llm
    return max(llm.vocab * llm.hidden, llm.intermediate * llm.hidden)
