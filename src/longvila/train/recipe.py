"""Training recipes: YAML files validated by typed dataclasses.

A recipe has one section per concern (`run`, `model`, `data`, `stage`, `train`, `parallel`,
`checkpoint`, `logging`); every field carries a docstring (see docs/recipes.md). Loading checks every
key and value before any work starts and raises `ValueError` naming the offending `section.key`.

    recipe = load_recipe("tiny/stage1", overrides=["--train.lr", "1e-3"])
    recipe.run_dir            # where the run writes checkpoints, metrics and the resolved recipe

A recipe may start with `base: other.yaml` (relative to its own file): the base is loaded first and the
recipe's keys are merged over it, section by section. Strings may hold `{root}`, replaced by `run.root`,
so that a stage can start from the previous stage's output (`model.init: "{root}/stage1/final"`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
"""Packaged recipes (`recipes/` at the repository root links here)."""

DATA_KINDS = ("manifest", "needle", "odd_frame", "passkey", "packed_text", "rl_task")
ODD_FRAME_KINDS = ("colour", "digit", "shape", "shape_colour", "tint", "two_digits", "digit_sum")
"""Needle kinds of `data.kind: odd_frame` (`data.odd_frame_mix` keys): the flat colour (the trained V-NIAH
needle) and the kinds of `longvila.data.synthetic.odd_frame_probe`."""


def check_odd_frame_mix(mix: dict[str, float], what: str) -> None:
    """Raise ValueError naming `what` unless `mix` maps kinds of ODD_FRAME_KINDS to shares >= 0 with a
    positive sum."""
    unknown = sorted(set(mix) - set(ODD_FRAME_KINDS))
    if unknown:
        raise ValueError(f"{what}: unknown kind(s) {unknown}; choose from {ODD_FRAME_KINDS}")
    shares = [float(v) for v in mix.values()]
    if not shares or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"{what}: shares must be >= 0 with a positive sum, got {mix}")


SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class RunSection:
    """Where the run writes and how it is seeded."""

    name: str = "run"
    """Name of the run; the run directory is `root/name`."""
    root: str = "runs"
    """Folder holding the runs of one pipeline (each stage a sub-folder); `{root}` in strings expands to it."""
    seed: int = 0
    """Seed of the model init, the data order and the synthetic data."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu` or `cuda` (the local rank's GPU)."""
    precision: str = "auto"
    """`auto` (bf16 autocast on GPU, fp32 on CPU), `bf16` or `fp32`."""
    deterministic: bool = False
    """Use deterministic algorithms (exact resume tests); slower on GPU."""
    num_threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""

    def check(self) -> None:
        _choice("run.device", self.device, DEVICES)
        _choice("run.precision", self.precision, PRECISIONS)
        _at_least("run.num_threads", self.num_threads, 0)


@dataclass(kw_only=True)
class ModelSection:
    """Which model the stage starts from."""

    init: str = "tiny"
    """`tiny` (the embedded default, random init), `parts` (compose `llm_path` + `vision_tower_path` with a
    fresh projector) or a checkpoint directory (longvila or official layout), e.g. `{root}/stage1/final`."""
    llm_path: str | None = None
    """Hugging Face LLM checkpoint (with its tokenizer) for `init: parts`, e.g. Qwen/Qwen2-7B-Instruct."""
    vision_tower_path: str | None = None
    """Hugging Face SigLIP checkpoint for `init: parts`, e.g. google/siglip-so400m-patch14-384."""
    llm_overrides: dict[str, Any] = field(default_factory=dict)
    """LLM config keys changed on a fresh `tiny` model (e.g. `num_hidden_layers: 4`)."""
    vision_micro_batch: int = 0
    """Frames per vision-tower forward (0: keep the model's setting)."""

    def check(self) -> None:
        if self.init == "parts" and not (self.llm_path and self.vision_tower_path):
            raise ValueError("model.init is 'parts' but model.llm_path or model.vision_tower_path is not set")
        if self.llm_overrides and self.init != "tiny":
            raise ValueError("model.llm_overrides only applies to model.init: tiny")
        _at_least("model.vision_micro_batch", self.vision_micro_batch, 0)


@dataclass(kw_only=True)
class DataSection:
    """What the stage trains on."""

    kind: str = "manifest"
    """`manifest` (a JSONL manifest, LLaVA/VILA layout), `needle` (synthetic long-video needle QA made in
    memory: one flat-colour frame in noise, lengths log-uniform in [min_frames, num_frames]), `odd_frame` (the
    same haystacks with one or two odd frames -- a flat colour, a digit, a shape, two digits -- and a
    question about them; `longvila.train.data.OddFrameDataset`) or `passkey`
    (synthetic text-only passkey retrieval made in memory) or `packed_text` (rows written by
    `longvila data pack-text`, for stage 4) or `rl_task` (stage 6: the synthetic questions of
    `rl.task`, made in memory; `num_frames` and `frame_size` shape their videos, `batch_size` is the
    questions per rollout batch)."""
    manifest: str | None = None
    """Path of the JSONL manifest (`kind: manifest`)."""
    media_root: str | None = None
    """Folder that relative media paths resolve against (default: the manifest's folder)."""
    packed_text_dir: str | None = None
    """Output folder of `longvila data pack-text` (`kind: packed_text`); each row is one micro-batch."""
    num_frames: int = 8
    """Frames sampled uniformly per video; the longest haystack for `kind: needle`."""
    min_frames: int = 1
    """Shortest haystack of the `needle` curriculum (log-uniform between min_frames and num_frames)."""
    fps: float | None = None
    """Sample videos at this rate instead of a fixed frame count (capped by max_frames)."""
    max_frames: int | None = None
    """Cap on frames when sampling by fps."""
    text_words: int = 300
    """Words of filler text per `passkey` sample."""
    num_samples: int = 100_000
    """Samples per epoch of the synthetic kinds (each made from (seed, index), so any order replays)."""
    frame_size: int = 64
    """Side of synthetic frames in pixels."""
    odd_frame_mix: dict[str, float] = field(default_factory=dict)
    """Share of each needle kind in `kind: odd_frame` (keys from `ODD_FRAME_KINDS`; shares are
    normalised; other data kinds ignore it); empty: `longvila.train.data.ODD_FRAME_MIX`. An override
    merges into the recipe's mix: `--data.odd_frame_mix.digit 0.2` adds digits, a share of 0 drops a kind."""
    batch_size: int = 1
    """Samples packed into one micro-batch row on each data-parallel rank."""
    num_workers: int = 0
    """DataLoader worker processes."""
    shuffle: bool = True
    """Shuffle every epoch (a permutation seeded by run.seed and the epoch)."""
    on_error: str = "skip"
    """Manifest lines or media that fail: `skip` (counted and reported) or `raise`."""

    def check(self) -> None:
        _choice("data.kind", self.kind, DATA_KINDS)
        _choice("data.on_error", self.on_error, ("skip", "raise"))
        if self.kind == "manifest" and not self.manifest:
            raise ValueError("data.manifest must be set when data.kind is 'manifest'")
        if self.kind == "packed_text":
            if not self.packed_text_dir:
                raise ValueError("data.packed_text_dir must be set when data.kind is 'packed_text'")
            if self.batch_size != 1:
                raise ValueError(
                    f"data.batch_size must be 1 for packed_text rows (already packed), got {self.batch_size}"
                )
        for key in ("num_frames", "min_frames", "text_words", "num_samples", "frame_size", "batch_size"):
            _at_least(f"data.{key}", getattr(self, key), 1)
        _at_least("data.num_workers", self.num_workers, 0)
        if self.min_frames > self.num_frames:
            raise ValueError(f"data.min_frames {self.min_frames} exceeds data.num_frames {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"data.fps must be > 0, got {self.fps}")
        if self.odd_frame_mix:
            check_odd_frame_mix(self.odd_frame_mix, "data.odd_frame_mix")


@dataclass(kw_only=True)
class StageSection:
    """Which of LongVILA's five stages this is: what trains, and stage-specific settings."""

    number: int = 3
    """1 alignment (projector), 2 pre-training (projector + LLM), 3 short SFT (all), 4 context
    extension (LLM through LoRA, text only, RoPE base raised), 5 long SFT (all), 6 RL with GRPO (the
    LLM; vision tower and projector frozen; settings in the `rl` section, docs/rl.md)."""
    rope_theta: float | None = None
    """New RoPE base of the LLM (stage 4; docs/reference.md table: 131072 -> 15.3M, ... 1M -> 3.58e9)."""
    max_length: int | None = None
    """Target context length in tokens; also raises the LLM's max_position_embeddings."""
    lora_rank: int = 8
    """LoRA rank (stage 4)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (stage 4): updates are scaled by alpha / rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (stage 4)."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """LLM linear layers that get LoRA adapters (stage 4)."""
    merge_lora: bool = True
    """Merge the adapters into the weights (peft merge_and_unload) before the final export."""

    def check(self) -> None:
        _choice("stage.number", self.number, (1, 2, 3, 4, 5, 6))
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise ValueError(f"stage.rope_theta must be > 0, got {self.rope_theta}")
        if self.max_length is not None:
            _at_least("stage.max_length", self.max_length, 1)
        _at_least("stage.lora_rank", self.lora_rank, 1)
        if not self.lora_targets:
            raise ValueError("stage.lora_targets must name at least one module")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"stage.lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass(kw_only=True)
class TrainSection:
    """Optimiser, schedule and loop."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    schedule: str = "cosine"
    """`cosine` (decay to min_lr_ratio x lr after warm-up) or `constant` (after warm-up)."""
    warmup_steps: int = 0
    """Linear warm-up steps; if 0, warmup_ratio x max_steps is used."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of max_steps (LongVILA stage 5: 0.03)."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule, as a fraction of lr."""
    max_steps: int = 0
    """Optimiser steps; 0 derives them from epochs and the data size."""
    epochs: float = 1.0
    """Passes over the data when max_steps is 0."""
    grad_accum_steps: int = 1
    """Micro-batches per optimiser step (ignored when global_batch_size is set)."""
    global_batch_size: int = 0
    """Samples per optimiser step over all ranks (0: data.batch_size x dp x grad_accum_steps); the
    accumulation is derived from it and must divide evenly."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    activation_checkpointing: bool = False
    """Recompute the LLM's layer activations in backward (less memory, ~1/3 more compute)."""

    def check(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        _choice("train.schedule", self.schedule, SCHEDULES)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        for key in ("warmup_steps", "max_steps", "global_batch_size", "weight_decay", "max_grad_norm"):
            _at_least(f"train.{key}", getattr(self, key), 0)
        _at_least("train.grad_accum_steps", self.grad_accum_steps, 1)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("train.max_steps is 0 and train.epochs is not > 0: nothing to train")


@dataclass(kw_only=True)
class ParallelSection:
    """Sequence-parallel layout; the rest of the world is data parallel."""

    ulysses_degree: int = 1
    """Ranks splitting attention heads (all-to-all, within a node)."""
    ring_degree: int = 1
    """Ranks passing K/V around a ring (across nodes)."""
    backend: str = "auto"
    """Process-group backend: `auto` (nccl on GPU, gloo on CPU), `nccl` or `gloo`."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 over all ranks (dp x sp); gradients are
    weighted so the optimizer sees the mean over every supervised token of the global batch. Off: every
    rank holds the whole model and gradients are all-reduced."""

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def check(self) -> None:
        _at_least("parallel.ulysses_degree", self.ulysses_degree, 1)
        _at_least("parallel.ring_degree", self.ring_degree, 1)
        _choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))


@dataclass(kw_only=True)
class CheckpointSection:
    """Resumable training state (torch.distributed.checkpoint) and the final export."""

    every_steps: int = 0
    """Save the training state every this many optimiser steps (0: only at the end)."""
    keep_last: int = 2
    """Training-state checkpoints kept (older ones are deleted)."""
    resume: str = "auto"
    """`auto` (resume from the run's latest complete checkpoint if any), `never`, or a checkpoint path."""
    save_final: bool = True
    """Export the trained model with save_pretrained into `run_dir/final`."""

    def check(self) -> None:
        _at_least("checkpoint.every_steps", self.every_steps, 0)
        _at_least("checkpoint.keep_last", self.keep_last, 1)


@dataclass(kw_only=True)
class LoggingSection:
    """Metrics and progress."""

    every_steps: int = 1
    """Write metrics every this many optimiser steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar (rank 0)."""
    tensorboard: bool = True
    """Also write TensorBoard events when the tensorboard package is installed."""

    def check(self) -> None:
        _at_least("logging.every_steps", self.every_steps, 1)


@dataclass(kw_only=True)
class RLSection:
    """Stage 6: reinforcement learning with verifiable rewards (GRPO, DAPO options); docs/rl.md."""

    task: str = "count"
    """Synthetic task (`data.kind: rl_task`): `count` (how many red frames; exact answer) or `order`
    (which of two colours comes first; multiple-choice letter)."""
    train_questions: int = 256
    """Questions in the training split (rewards come from their answer keys; no reply is labelled)."""
    heldout_questions: int = 64
    """Questions in the held-out split (greedy accuracy before and after RL)."""
    group_size: int = 8
    """G: replies sampled per question; advantages are normalised within each group."""
    max_new_tokens: int = 32
    """Longest reply sampled (a reply without its end token by then is cut there)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: all)."""
    clip_low: float = 0.2
    """eps_low: the probability ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """eps_high: clipped above at 1 + clip_high (DAPO's clip-higher: e.g. 0.28)."""
    kl_coef: float = 0.0
    """beta: weight of the k3 KL term to the frozen reference model (0: no reference model, DAPO)."""
    loss_agg: str = "sequence_mean"
    """`sequence_mean` (GRPO) or `token_mean` (DAPO) aggregation of the per-token loss."""
    advantage_std: bool = True
    """Divide advantages by the group's standard deviation (false: Dr. GRPO's mean-only centring)."""
    format_weight: float = 0.1
    """Reward = (1 - w) x accuracy + w x format (`<think>...</think><answer>...</answer>`)."""
    reply_prefix: str = ""
    """Text that opens every reply, given in the prompt (R1-Zero's template prefills `<think>`); rewards
    see prefix + sampled text, labelled SFT replies drop it."""
    updates_per_batch: int = 1
    """Optimiser updates on each rollout batch (> 1: the ratio to the rollout policy and the clip act)."""
    micro_batch_rollouts: int = 0
    """Rollouts packed into one forward/backward row (0: the whole batch in one row)."""
    sft_steps: int = 0
    """Cold-start SFT steps on labelled replies before RL (counted in the stage's steps)."""
    sft_questions: int = 32
    """Labelled questions for the cold-start SFT (from the training split, stratified by answer)."""
    sft_lr: float = 0.0
    """Learning rate of the cold-start SFT steps (0: train.lr, the RL steps' rate)."""
    sft_only: bool = False
    """The SFT-only control: every step of the stage (sft_steps + the RL steps) is a cold-start SFT step
    on the same labelled questions; held-out accuracy at the end (`after` in rl_eval.json)."""
    engine: str = "local"
    """Rollout backend: `local` (our batched `generate`) or a name registered with `register_engine`."""
    sp_min_tokens: int = 16384
    """Under sequence parallelism, prompts of at least this many tokens are generated with MM-SP."""
    cache_dir: str | None = None
    """Persistent embedding cache folder (default `run_dir/embed_cache`); `none` disables the disk layer."""
    cache_memory_videos: int = 64
    """Videos kept in the in-memory layer of the embedding cache."""

    def check(self) -> None:
        _choice("rl.task", self.task, ("count", "order"))
        for key in (
            "train_questions",
            "heldout_questions",
            "group_size",
            "max_new_tokens",
            "updates_per_batch",
        ):
            _at_least(f"rl.{key}", getattr(self, key), 1)
        for key in (
            "sft_steps",
            "sft_questions",
            "micro_batch_rollouts",
            "cache_memory_videos",
            "sp_min_tokens",
        ):
            _at_least(f"rl.{key}", getattr(self, key), 0)
        if self.temperature <= 0:
            raise ValueError(f"rl.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rl.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.format_weight <= 1:
            raise ValueError(f"rl.format_weight must be in [0, 1], got {self.format_weight}")
        _at_least("rl.sft_lr", self.sft_lr, 0)
        if self.sft_steps and self.sft_questions < 1:
            raise ValueError("rl.sft_steps > 0 needs rl.sft_questions >= 1")
        if self.sft_questions > self.train_questions:
            raise ValueError(
                f"rl.sft_questions {self.sft_questions} exceeds rl.train_questions {self.train_questions}"
            )
        self.grpo_settings().check()

    def grpo_settings(self):
        from longvila.train.rl.grpo import GRPOSettings

        return GRPOSettings(
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            kl_coef=self.kl_coef,
            loss_agg=self.loss_agg,
            advantage_std=self.advantage_std,
            temperature=self.temperature,
        )


@dataclass(kw_only=True)
class Recipe:
    """One training stage, end to end."""

    run: RunSection = field(default_factory=RunSection)
    """Run directory, seed, device and precision."""
    model: ModelSection = field(default_factory=ModelSection)
    """Where the weights come from."""
    data: DataSection = field(default_factory=DataSection)
    """Training data."""
    stage: StageSection = field(default_factory=StageSection)
    """Which LongVILA stage: what trains."""
    train: TrainSection = field(default_factory=TrainSection)
    """Optimiser, schedule, loop."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """Sequence-parallel degrees."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Resumable state and export."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics and progress bar."""
    rl: RLSection = field(default_factory=RLSection)
    """Stage 6 (reinforcement learning) settings; ignored by the other stages."""

    def check(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).check()
        if self.stage.number == 4 and self.data.kind in ("needle", "odd_frame"):
            raise ValueError(
                f"stage.number 4 (context extension) is text only; data.kind {self.data.kind!r} has video"
            )
        if (self.stage.number == 6) != (self.data.kind == "rl_task"):
            raise ValueError(
                f"stage.number {self.stage.number} with data.kind {self.data.kind!r}: stage 6 (RL) and "
                "data.kind 'rl_task' go together"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- validation helpers --------------------------------------------------------------------------
def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {list(choices)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and convert where lossless, e.g. the YAML string "1e-5" to a float) one value."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if annotation is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"{key}: unsupported field type {annotation!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(
            f"unknown recipe key(s) {', '.join(where + k for k in unknown)}; "
            f"{prefix or 'the recipe'} takes {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(key, value, hint)
    return cls(**kwargs)


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _expand_root(data: Any, root: str) -> Any:
    if isinstance(data, str):
        return data.replace("{root}", root)
    if isinstance(data, dict):
        return {k: _expand_root(v, root) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_root(v, root) for v in data]
    return data


# ---- files and overrides -------------------------------------------------------------------------
def resolve_recipe_path(name: str | Path) -> Path:
    """A file path, or a packaged recipe name such as `tiny/stage1` or `longvila-7b/stage1_align`."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"recipe {str(name)!r}: no such file, and not a packaged recipe (see `{RECIPES_DIR}`)")


def read_recipe_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a recipe file with its `base:` chain merged in."""
    path = resolve_recipe_path(path).resolve()
    if path in _seen:
        raise ValueError(f"recipe {path}: `base:` chain loops")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(read_recipe_dict(path.parent / base, (*_seen, path)), data)
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--train.lr", "1e-5", "--data.shuffle=false"]` -> nested {"train": {"lr": "1e-5"}, ...}.

    Values are parsed as YAML scalars or lists (`[a, b]`); the recipe's field types then check them.
    """
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"override {arg!r}: expected --section.key VALUE")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(args):
                raise ValueError(f"override --{key} has no value")
            value = args[i + 1]
            i += 1
        i += 1
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"override --{key}: expected --section.key (e.g. --train.lr 1e-5)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override --{key} conflicts with another override")
        node[parts[-1]] = parsed
    return nested


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a nested mapping into a Recipe (expanding `{root}`); raises ValueError naming the key."""
    root = str((data.get("run") or {}).get("root", RunSection.root))
    recipe = _build(Recipe, _expand_root(data, root), "")
    recipe.check()
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Read, merge overrides into, and validate a recipe."""
    data = read_recipe_dict(path)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = _merge(data, extra)
    try:
        return recipe_from_dict(data)
    except ValueError as exc:
        raise ValueError(f"recipe {path}: {exc}") from exc


def packaged_recipes() -> list[Path]:
    """Every packaged recipe file (those whose names start with `_` are bases, not recipes)."""
    return sorted(p for p in RECIPES_DIR.rglob("*.yaml") if not p.name.startswith("_"))
