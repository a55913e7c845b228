"""The training loop of one stage: recipe in, checkpoints, metrics and an exported model out.

    result = Trainer(load_recipe("tiny/stage1")).fit()

One process or many under torchrun (RANK / WORLD_SIZE): ranks are laid out (dp, ring, ulysses) with the
sequence-parallel ranks innermost, so the `sp_degree` consecutive ranks of one SP group read the same
batch and `model(**batch, sp=sp)` splits it among them. The loop accumulates gradients over micro-batches,
clips, steps AdamW and the schedule, logs, and checkpoints the full state (model, optimizer, scheduler,
data position, RNG) so that a killed run resumes on the same loss curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longvila.parallel.launch import DistInfo, setup_distributed
from longvila.train import checkpointing as ckpt
from longvila.train.data import (
    PackCollate,
    PackedRowCollate,
    ResumableBatchSampler,
    build_dataset,
    build_loader,
)
from longvila.train.distributed import wrap_data_parallel
from longvila.train.metrics import MetricsWriter, memory_gib
from longvila.train.optim import build_optimizer, build_scheduler
from longvila.train.recipe import Recipe
from longvila.train.stages import apply_stage, finish_stage, trainable_summary


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    """Loss of every optimiser step run in this process (not those before a resume)."""
    resumed_from: int = 0
    seconds: float = 0.0


def build_model(recipe: Recipe):
    """(model, processor) as `recipe.model` describes; fresh weights are seeded by `run.seed`."""
    from longvila.config import LongVILAConfig
    from longvila.model.vlm import LongVILA
    from longvila.processor import LongVILAProcessor

    spec = recipe.model
    torch.manual_seed(recipe.run.seed)
    if spec.init == "tiny":
        config = LongVILAConfig.tiny()
        config.llm.update(spec.llm_overrides)
        model, processor = LongVILA(config), LongVILAProcessor.tiny()
    elif spec.init == "parts":
        from longvila.text.tokenizer import load_tokenizer

        model = LongVILA.from_parts(spec.llm_path, spec.vision_tower_path)
        processor = LongVILAProcessor.from_config(model.config, load_tokenizer(spec.llm_path))
    else:
        path = Path(spec.init)
        if not path.is_dir():
            raise ValueError(f"model.init {spec.init!r}: no such checkpoint directory")
        model, processor = LongVILA.from_pretrained(path), LongVILAProcessor.from_pretrained(path)
    if spec.vision_micro_batch:
        model.config.vision_micro_batch = spec.vision_micro_batch
        model.vision_tower.micro_batch = spec.vision_micro_batch
    return model, processor


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    def __init__(self, recipe: Recipe, *, dist_info: DistInfo | None = None):
        self.recipe = recipe
        self.dist = dist_info or setup_distributed(recipe.run.device, recipe.parallel.backend)
        sp_degree = recipe.parallel.sp_degree
        if self.dist.world_size % sp_degree:
            raise ValueError(
                f"parallel: ulysses_degree x ring_degree = {sp_degree} does not divide the world size "
                f"{self.dist.world_size}"
            )
        self.dp_degree = self.dist.world_size // sp_degree
        self.dp_rank = self.dist.global_rank // sp_degree
        self.run_dir = recipe.run_dir
        self.ddp = None
        """DistributedDataParallel around `_data_parallel_module()` once `_step` first runs with several
        ranks (no FSDP): it reduces the gradients over the world in the backward."""
        self.sp = None
        self.fsdp = recipe.parallel.fsdp and self.dist.world_size > 1
        if sp_degree > 1 or self.fsdp:
            from longvila.parallel import init_sp

            self.sp = init_sp(ulysses=recipe.parallel.ulysses_degree, ring=recipe.parallel.ring_degree)

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build model, data, optimizer and schedule (fit() calls it; idempotent). Bad inputs (a missing
        manifest or checkpoint, a batch size that does not divide) raise here, before any step."""
        if getattr(self, "_ready", False):
            return
        recipe = self.recipe
        if recipe.run.num_threads:
            torch.set_num_threads(recipe.run.num_threads)
        if recipe.run.deterministic:
            torch.use_deterministic_algorithms(True)
        self.model, self.processor = build_model(recipe)
        apply_stage(self.model, recipe.stage)
        if recipe.train.activation_checkpointing:
            from longvila.model.memory import set_activation_checkpointing

            set_activation_checkpointing(self.model, "full")
        self.model.to(self.dist.device).train()
        if self.fsdp:
            from longvila.parallel.fsdp import fully_shard_model

            fully_shard_model(self.model, self.model.llm.get_decoder().layers)
        self._setup_data()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, recipe.train)
        self.scheduler = build_scheduler(self.optimizer, recipe.train, self.max_steps)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        self._ready = True

    def _setup_data(self) -> None:
        """Dataset, sampler, accumulation, step count and collate (a subclass hook: stage 6 differs)."""
        recipe = self.recipe
        self.dataset = build_dataset(recipe.data, self.processor, recipe.run.seed)
        self.sampler = self._batch_sampler(len(self.dataset))
        self.accum = self._grad_accum_steps()
        self.max_steps = recipe.train.max_steps or max(
            1, math.ceil(recipe.train.epochs * self.sampler.batches_per_epoch / self.accum)
        )
        if recipe.data.kind == "packed_text":
            self.collate = PackedRowCollate(pad_to_multiple_of=self.sequence_multiple)
        else:
            self.collate = PackCollate(self.processor, pad_to_multiple_of=self.sequence_multiple)

    def _batch_sampler(self, num_samples: int) -> ResumableBatchSampler:
        """This data-parallel rank's seeded, resumable micro-batches of `data.batch_size` sample indices."""
        data = self.recipe.data
        return ResumableBatchSampler(
            num_samples,
            data.batch_size,
            seed=self.recipe.run.seed,
            shuffle=data.shuffle,
            dp_rank=self.dp_rank,
            dp_degree=self.dp_degree,
        )

    @property
    def sequence_multiple(self) -> int:
        """Rows are padded to a multiple of this (the SP layout's 2 x ulysses x ring; 1 without SP)."""
        if self.sp is None:
            return 1
        return getattr(self.sp, "sequence_multiple", 2 * self.recipe.parallel.sp_degree)

    def _grad_accum_steps(self) -> int:
        train, micro = self.recipe.train, self.recipe.data.batch_size
        if not train.global_batch_size:
            return train.grad_accum_steps
        per_step = micro * self.dp_degree
        if train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size {train.global_batch_size} is not a multiple of data.batch_size "
                f"{micro} x {self.dp_degree} data-parallel ranks"
            )
        return train.global_batch_size // per_step

    def _resume(self) -> ckpt.TrainProgress:
        mode = self.recipe.checkpoint.resume
        if mode == "never":
            return ckpt.TrainProgress(data=ckpt.DataPosition(sampler_seed=self.recipe.run.seed))
        path = ckpt.find_latest(self.run_dir / "checkpoints") if mode == "auto" else Path(mode)
        if path is None:
            return ckpt.TrainProgress(data=ckpt.DataPosition(sampler_seed=self.recipe.run.seed))
        progress = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        if progress.data.sampler_seed != self.recipe.run.seed:
            raise ValueError(
                f"{path}: written with run.seed {progress.data.sampler_seed}, this recipe has {self.recipe.run.seed}"
            )
        return progress

    # ---- the loop ------------------------------------------------------------------------------
    def _micro_batches(self, position: ckpt.DataPosition):
        """Yield (batch or None, position after it) forever, epoch after epoch, from `position`."""
        while True:
            self.sampler.set_position(position.epoch, position.batch_in_epoch)
            loader = build_loader(
                self.dataset,
                self.sampler,
                self.collate,
                self.recipe.data.num_workers,
                seed=self.recipe.run.seed * 1_000_003 + position.epoch,
            )
            for item in loader:
                position = ckpt.DataPosition(
                    position.epoch, position.batch_in_epoch + 1, position.sampler_seed
                )
                for skipped in item.skipped:
                    print(f"skipped {skipped.where}: {skipped.reason}", flush=True)
                yield item.batch, position
            position = ckpt.DataPosition(position.epoch + 1, 0, position.sampler_seed)

    def _forward_backward(self, batch: dict[str, torch.Tensor], sync: bool = True) -> tuple[float, int, int]:
        """One micro-batch; `sync=False` keeps DDP from reducing its gradients (all but a step's last)."""
        device = self.dist.device
        batch = {k: v.to(device) for k, v in batch.items()}
        module = self.ddp if self.ddp is not None else self.model
        with self._sync(sync):
            with _autocast(device, self.recipe.run.precision):
                out = module(**batch, sp=self.sp) if self.sp is not None else module(**batch)
            weight = 1.0
            if self.fsdp:  # FSDP sums gradients over all ranks: weight this group's mean by its tokens
                from longvila.parallel.fsdp import global_loss_weight

                weight = global_loss_weight(out.num_supervised, self.sp, device=out.loss.device)
            (out.loss * weight / self.accum).backward()
        frames = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        return float(out.loss.detach()), batch["input_ids"].numel(), frames

    def _padding_batch(self) -> dict[str, torch.Tensor]:
        """One row of padding with no target: loss 0, zero gradients, the same graph as a real row."""
        length = self.sequence_multiple
        size = self.model.config.image_size
        return {
            "input_ids": torch.full((1, length), self.processor.pad_token_id, dtype=torch.long),
            "labels": torch.full((1, length), -100, dtype=torch.long),
            "position_ids": torch.arange(length)[None],
            "cu_seqlens": torch.tensor([0, length], dtype=torch.int32),
            "pixel_values": torch.zeros(0, 3, size, size),
        }

    def _global_loss(self, loss: float) -> float:
        """The logged loss of the whole global batch: the mean over data-parallel replicas of their
        losses, as the gradients are averaged (rank 0's own share alone is not the batch's loss)."""
        if self.dp_degree == 1:
            return loss
        import torch.distributed as dist

        total = torch.tensor([loss], dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(total, group=self.sp.dp_group if self.sp is not None else None)
        return float(total.item()) / self.dp_degree

    ddp_find_unused_parameters = True
    """Whether DDP looks for parameters a backward did not reach (see `wrap_data_parallel`)."""

    def _data_parallel_module(self) -> torch.nn.Module:
        """The module DDP wraps; its forward computes the loss (stage 6 wraps its loss module instead)."""
        return self.model

    def _wrap_data_parallel(self) -> None:
        """DDP around `_data_parallel_module()` the first time, with several ranks and no FSDP (FSDP
        reduces the gradients itself; one process has nothing to reduce)."""
        if self.ddp is None and not self.fsdp and self.dist.world_size > 1:
            self.ddp = wrap_data_parallel(
                self._data_parallel_module(),
                self.dp_degree,
                find_unused_parameters=self.ddp_find_unused_parameters,
            )

    def _sync(self, sync: bool):
        """A context for one micro-batch's forward and backward: `sync=False` keeps DDP from reducing
        (DDP skips its reduction for a forward *and* backward run under no_sync: the gradients accumulate)."""
        return self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()

    def _apply_gradients(self) -> float:
        """Clip the accumulated gradients (already reduced over the ranks by DDP or FSDP in the backward),
        step AdamW, zero them; returns the gradient norm before clipping (the caller steps the schedule)."""
        clip = self.recipe.train.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _step(self, stream) -> tuple[dict[str, Any], ckpt.DataPosition]:
        start = time.perf_counter()
        losses, tokens, frames = [], 0, 0
        position = None
        self._wrap_data_parallel()
        for index in range(self.accum):
            batch, position = next(stream)
            last = index == self.accum - 1
            if batch is None:  # every sample of this micro-batch was skipped
                if last and self.ddp is not None:
                    # DDP reduces in the backward of the step's last micro-batch: every rank must run one.
                    self._forward_backward(self._padding_batch())
                continue
            loss, n_tokens, n_frames = self._forward_backward(batch, sync=last)
            losses.append(loss)
            tokens += n_tokens
            frames += n_frames
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self._apply_gradients()
        self.scheduler.step()
        seconds = time.perf_counter() - start
        record = {
            "loss": self._global_loss(sum(losses) / len(losses) if losses else float("nan")),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "frames": frames,
            "tokens_per_s": tokens * self.dp_degree / seconds,
            "frames_per_s": frames * self.dp_degree / seconds,
            "memory_gib": memory_gib(self.dist.device),
            "step_s": seconds,
            "epoch": position.epoch,
        }
        return record, position

    def fit(self) -> TrainResult:
        began = time.perf_counter()
        self.setup()
        progress = self._resume()
        resumed_from = progress.step
        recipe = self.recipe
        writer = MetricsWriter(
            self.run_dir,
            resume_step=progress.step,
            tensorboard=recipe.logging.tensorboard,
            enabled=self.dist.is_main,
        )
        if self.dist.is_main:
            info = {**trainable_summary(self.model), "max_steps": self.max_steps, "grad_accum": self.accum}
            info.update(world_size=self.dist.world_size, dp_degree=self.dp_degree, resumed_from=resumed_from)
            (self.run_dir / "setup.json").write_text(json.dumps(info, indent=1) + "\n")
        losses = []
        bar = _progress_bar(
            self.max_steps, progress.step, recipe.run.name, self.dist.is_main and recipe.logging.progress_bar
        )
        stream = self._micro_batches(progress.data)
        every = recipe.checkpoint.every_steps
        while progress.step < self.max_steps:
            record, progress.data = self._step(stream)
            progress.step += 1
            progress.tokens_seen += record["tokens"] * self.dp_degree
            losses.append(record["loss"])
            if progress.step % recipe.logging.every_steps == 0 or progress.step == self.max_steps:
                writer.log({"step": progress.step, **record, "tokens_seen": progress.tokens_seen})
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if every and progress.step % every == 0 and progress.step < self.max_steps:
                ckpt.save_checkpoint(
                    self.run_dir / "checkpoints",
                    progress,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    keep_last=recipe.checkpoint.keep_last,
                )
        bar.close()
        writer.close()
        final_dir = self._export() if recipe.checkpoint.save_final else None
        return TrainResult(
            run_dir=self.run_dir,
            final_dir=final_dir,
            steps=progress.step,
            losses=losses,
            resumed_from=resumed_from,
            seconds=time.perf_counter() - began,
        )

    def _export(self) -> Path:
        final = self.run_dir / "final"
        model = self.model
        if self.fsdp:
            # Gather the sharded weights into an unsharded copy of the same model (a collective).
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if self.dist.is_main:
                model, _ = build_model(self.recipe)
                apply_stage(model, self.recipe.stage)
                model.load_state_dict(full)
        if self.dist.is_main:
            finish_stage(model, self.recipe.stage)
            model.to("cpu").eval()
            model.save_pretrained(final, processor=self.processor)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return final


def _progress_bar(total: int, initial: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, disable=not enabled, dynamic_ncols=True)
