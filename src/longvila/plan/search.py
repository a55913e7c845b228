"""Enumerate layouts for a model, a sequence and a cluster; predict each; rank them.

A layout is (dp, Ulysses U, ring R, activation checkpointing, vision micro-batch) with
dp x R x U = GPUs. Valid: U divides the GPUs per node (a Ulysses group must sit inside one NVLink
domain), U divides the query heads, and the K/V heads divide U or U divides them (K/V heads are
replicated when U exceeds them). Layouts that break a rule are still reported (with the rule),
because the "Ulysses only" baseline often does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longvila.plan.hardware import GIB, RING_P2P_EFFICIENCY, Hardware
from longvila.plan.memory import BF16_FSDP, Layout, MemoryBreakdown, PrecisionPolicy, Workload, predict_memory
from longvila.plan.rules import ulysses_head_problems
from longvila.plan.shapes import ModelShape
from longvila.plan.timing import StepTime, padded_length, predict_step_time

VISION_MICRO_BATCHES = (64, 32, 16, 8, 4, 2, 1)


@dataclass
class Candidate:
    """One layout with its predictions."""

    layout: Layout
    role: str = ""
    """"2D", "ring only", "Ulysses only" or "" (no sequence parallelism)."""
    memory: MemoryBreakdown | None = None
    time: StepTime | None = None
    tokens_per_second: float = 0.0
    """Tokens of the whole cluster per second: dp x T / step."""
    problems: list[str] = field(default_factory=list)
    """Why the layout is invalid or does not fit; empty when it runs."""

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def memory_gib(self) -> float:
        return self.memory.peak / GIB if self.memory else float("nan")


@dataclass
class PlanResult:
    shape: ModelShape
    workload: Workload
    gpus: int
    hardware: Hardware
    candidates: list[Candidate]
    """Ranked: layouts that fit by tokens/s, then the rest by memory."""

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None

    def baseline(self, role: str, sp: int) -> Candidate | None:
        """The best candidate of a role ("ring only", "Ulysses only", "2D") at SP degree `sp`."""
        found = [c for c in self.candidates if c.role == role and c.layout.sp == sp]
        return found[0] if found else None

    def explain(self) -> str:
        """Why the best layout won, in a few sentences."""
        best = self.best
        if best is None:
            return "No layout fits: " + "; ".join(self.candidates[0].problems) if self.candidates else ""
        lay, t = best.layout, best.time
        lines = [
            f"Chosen: {lay.label} (SP degree {lay.sp} = Ulysses {lay.ulysses} x ring {lay.ring}, "
            f"{lay.dp} data-parallel replica{'s' if lay.dp != 1 else ''}): {best.memory_gib:.1f} GiB of "
            f"{self.hardware.memory_bytes / GIB:.1f} GiB per GPU, {t.total:.2f} s per step, "
            f"{best.tokens_per_second:,.0f} tokens/s over the cluster.",
        ]
        smaller = [c for c in self.candidates if c.layout.sp < lay.sp]
        if smaller and not any(c.fits for c in smaller):
            lines.append(
                f"A smaller SP degree (more data parallelism) does not fit: "
                f"{smaller[0].layout.label} needs {smaller[0].memory_gib:.1f} GiB."
            )
        parts = {
            "matmuls": t.linear,
            "attention": t.attention,
            "ring exposed": t.ring_exposed,
            "all-to-all": t.ulysses,
            "vision": t.vision,
            "FSDP exposed": t.fsdp_exposed,
        }
        top = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v > 0)
        hops = f"ring hops over {t.ring_link}"
        if t.ring_link == "infiniband":
            hw = self.hardware
            source = (
                "the default, fitted to the paper's ring"
                if hw.ring_p2p_efficiency == RING_P2P_EFFICIENCY
                else "as given"
            )
            hops += (
                f" at {hw.ring_inter_node_bandwidth / 1e9:.1f} GB/s effective ({hw.ring_p2p_efficiency:.2f} of "
                f"the link, {source}; --ring-p2p-efficiency)"
            )
        lines.append(f"Step time: {top}; {hops}.")
        if lay.ulysses > 1:
            lines.append(
                f"Ulysses {lay.ulysses} stays inside a node ({self.hardware.gpus_per_node} GPUs) and divides "
                f"the {self.shape.llm.q_heads} query heads; the ring carries K/V of {self.shape.llm.kv_heads} "
                f"KV heads split {lay.ulysses} ways, so its cross-node traffic is divided by {lay.ulysses}."
            )
        ring = self.baseline("ring only", lay.sp)
        if ring is not None and ring is not best and ring.time is not None:
            lines.append(
                f"Zigzag ring only at the same SP degree (U=1, R={lay.sp}): {ring.time.total:.2f} s per step "
                f"({ring.time.total / t.total:.2f}x){'' if ring.fits else ', ' + '; '.join(ring.problems)}."
            )
        uly = self.baseline("Ulysses only", lay.sp)
        if uly is not None and uly is not best and uly.problems:
            lines.append(f"Ulysses only (U={lay.sp}): {'; '.join(uly.problems)}.")
        return "\n".join(lines)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(shape: ModelShape, layout: Layout, hardware: Hardware) -> list[str]:
    """Rules a layout breaks, as sentences; empty when valid."""
    llm, u = shape.llm, layout.ulysses
    problems = []
    if u > hardware.gpus_per_node or hardware.gpus_per_node % u:
        problems.append(f"Ulysses degree {u} does not fit in a node of {hardware.gpus_per_node} GPUs")
    problems += ulysses_head_problems(llm.q_heads, llm.kv_heads, u)
    return problems


def role_of(layout: Layout) -> str:
    if layout.sp == 1:
        return ""
    if layout.ulysses == 1:
        return "ring only"
    if layout.ring == 1:
        return "Ulysses only"
    return "2D"


def evaluate(
    shape: ModelShape,
    layout: Layout,
    workload: Workload,
    hardware: Hardware,
    policy: PrecisionPolicy = BF16_FSDP,
) -> Candidate:
    """Predict one layout; problems list why it is invalid or does not fit."""
    cand = Candidate(layout=layout, role=role_of(layout))
    cand.problems = layout_problems(shape, layout, hardware)
    padded = Workload(
        tokens=padded_length(workload.tokens, layout),
        frames=workload.frames,
        supervised_tokens=workload.supervised_tokens,
        train_vision=workload.train_vision,
        loss_chunk_size=workload.loss_chunk_size,
    )
    cand.memory = predict_memory(shape, layout, padded, policy)
    cand.time = predict_step_time(shape, layout, padded, hardware, policy)
    cand.tokens_per_second = layout.dp * workload.tokens / cand.time.total
    if cand.memory.peak > hardware.memory_bytes:
        cand.problems.append(
            f"needs {cand.memory_gib:.1f} GiB > {hardware.memory_bytes / GIB:.1f} GiB "
            f"(peak at {cand.memory.peak_phase})"
        )
    return cand


def _best_micro_batch(shape, layout: Layout, workload, hardware, policy) -> Candidate:
    """The largest vision micro-batch that fits (the micro-batch only bounds transient memory)."""
    first = None
    for micro in VISION_MICRO_BATCHES:
        cand = evaluate(
            shape,
            Layout(
                dp=layout.dp,
                ulysses=layout.ulysses,
                ring=layout.ring,
                checkpointing=layout.checkpointing,
                vision_micro_batch=micro,
            ),
            workload,
            hardware,
            policy,
        )
        first = first or cand
        if cand.fits or workload.frames == 0:
            return cand
    return first


def enumerate_layouts(gpus: int, hardware: Hardware) -> list[Layout]:
    """Every (dp, U, R, checkpointing) with dp x R x U = gpus and U up to the GPUs of a node (the
    Ulysses-only baselines may exceed it; they are kept to show why they fail)."""
    layouts = []
    for sp in divisors(gpus):
        for u in divisors(sp):
            for ckpt in (False, True):
                layouts.append(Layout(dp=gpus // sp, ulysses=u, ring=sp // u, checkpointing=ckpt))
    return layouts


def plan(
    shape: ModelShape,
    workload: Workload,
    gpus: int,
    hardware: Hardware,
    policy: PrecisionPolicy = BF16_FSDP,
) -> PlanResult:
    """Predict every layout and rank them: fitting ones by cluster tokens/s, the rest by memory."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpus > hardware.gpus_per_node and gpus % hardware.gpus_per_node:
        raise ValueError(f"--gpus {gpus} is not a whole number of {hardware.gpus_per_node}-GPU nodes")
    candidates = []
    for layout in enumerate_layouts(gpus, hardware):
        # Ulysses-only layouts beyond a node are kept only as baselines (R = 1).
        if layout.ulysses > hardware.gpus_per_node and layout.ring != 1:
            continue
        candidates.append(_best_micro_batch(shape, layout, workload, hardware, policy))
    candidates.sort(key=lambda c: (not c.fits, -c.tokens_per_second if c.fits else c.memory.peak))
    return PlanResult(shape=shape, workload=workload, gpus=gpus, hardware=hardware, candidates=candidates)


def max_sequence_length(
    shape: ModelShape,
    gpus: int,
    hardware: Hardware,
    *,
    checkpointing: bool = False,
    tokens_per_frame: int = 196,
    text_tokens: int = 512,
    policy: PrecisionPolicy = BF16_FSDP,
) -> tuple[int, Candidate | None]:
    """Longest video sequence (frames x (tokens_per_frame + 1) + text) one row of which trains on
    `gpus` GPUs with some valid layout of SP degree `gpus`; returns (tokens, that layout)."""

    def best_at(frames: int) -> Candidate | None:
        workload = Workload.from_frames(frames, tokens_per_frame, text_tokens)
        fitting = []
        for u in divisors(gpus):
            layout = Layout(dp=1, ulysses=u, ring=gpus // u, checkpointing=checkpointing)
            if layout_problems(shape, layout, hardware):
                continue
            cand = _best_micro_batch(shape, layout, workload, hardware, policy)
            if cand.fits:
                fitting.append(cand)
        return max(fitting, key=lambda c: c.tokens_per_second) if fitting else None

    low, high = 0, 1
    while best_at(high) is not None:
        low, high = high, high * 2
        if high > 1 << 24:
            break
    while high - low > 1:
        mid = (low + high) // 2
        if best_at(mid) is not None:
            low = mid
        else:
            high = mid
    best = best_at(low) if low else None
    return (Workload.from_frames(low, tokens_per_frame, text_tokens).tokens if low else 0), best
