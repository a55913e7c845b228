"""The training loop: exact resume after SIGKILL, atomic checkpoints, schedules, data order, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longvila import LongVILA, LongVILAConfig
from longvila.train import checkpointing as ckpt
from longvila.train.data import ResumableBatchSampler
from longvila.train.metrics import read_metrics
from longvila.train.optim import lr_factor
from longvila.train.recipe import load_recipe
from longvila.train.trainer import Trainer

# A needle-task run small enough for seconds: data made in memory, no files needed.
SMALL = [
    "--model.init", "tiny", "--data.num_frames", "4", "--data.batch_size", "2",
    "--train.warmup_steps", "2", "--run.deterministic", "true", "--run.num_threads", "1",
    "--logging.progress_bar", "false",
]  # fmt: skip


def _train_cmd(root: Path, name: str, steps: int, every: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "longvila.cli", "train", "--recipe", "tiny/stage5",
        "--run.root", str(root), "--run.name", name, "--train.max_steps", str(steps),
        "--checkpoint.every_steps", str(every), "--checkpoint.save_final", "false", *SMALL, *extra,
    ]  # fmt: skip


def _env():
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_killed_run_resumes_on_the_same_loss_curve(tmp_path):
    steps = 12
    ref = subprocess.run(_train_cmd(tmp_path, "ref", steps, 0), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    assert len(reference) == steps

    cmd = _train_cmd(tmp_path, "killed", steps, 3)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert len(logged) < steps

    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    setup = json.loads((tmp_path / "killed" / "setup.json").read_text())
    assert setup["resumed_from"] >= 3
    curve = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in curve] == list(range(1, steps + 1))
    assert [r["loss"] for r in curve] == reference  # exactly, fp32 on CPU


def _tiny_state():
    torch.manual_seed(0)
    model = LongVILA(LongVILAConfig.tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
    ids = torch.randint(10, 1000, (1, 20), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_checkpoint_round_trip_and_half_written_ones_are_never_loaded(tmp_path):
    model, optimizer, scheduler = _tiny_state()
    progress = ckpt.TrainProgress(step=2, data=ckpt.DataPosition(epoch=1, batch_in_epoch=5, sampler_seed=0))
    root = tmp_path / "checkpoints"
    saved = ckpt.save_checkpoint(root, progress, model, optimizer, scheduler)
    assert saved.name == "step_000002" and (root / "latest").read_text().strip() == "step_000002"
    # A save killed halfway (temporary name) and a directory without the completion marker,
    # even when `latest` names it.
    (root / ".tmp_step_000004").mkdir()
    (root / ".tmp_step_000004" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step_000006").mkdir()
    (root / "latest").write_text("step_000006\n")
    assert ckpt.find_latest(root) == saved
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(root / "step_000006", model, optimizer, scheduler)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(root / ".tmp_step_000004", model, optimizer, scheduler)

    fresh_model = LongVILA(LongVILAConfig.tiny())
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 0.5**s)
    restored = ckpt.load_checkpoint(saved, fresh_model, fresh_opt, fresh_sched)
    assert restored.step == 2 and restored.data == progress.data
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    state_a, state_b = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    for key in state_a:
        torch.testing.assert_close(state_a[key]["exp_avg"], state_b[key]["exp_avg"], rtol=0, atol=0)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model, optimizer, scheduler = _tiny_state()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(
            tmp_path,
            ckpt.TrainProgress(step=step, data=ckpt.DataPosition()),
            model,
            optimizer,
            scheduler,
            keep_last=2,
        )
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]


def test_schedules():
    cosine = [lr_factor(s, schedule="cosine", warmup=2, max_steps=10, min_ratio=0.1) for s in range(10)]
    assert cosine[:2] == [0.5, 1.0] and cosine[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:])) and cosine[-1] > 0.1
    assert lr_factor(20, schedule="cosine", warmup=2, max_steps=10, min_ratio=0.1) == pytest.approx(0.1)
    assert [lr_factor(s, schedule="constant", warmup=2, max_steps=10, min_ratio=0) for s in range(4)] == [
        0.5,
        1,
        1,
        1,
    ]


def test_batch_order_is_seeded_resumable_and_split_across_ranks():
    whole = ResumableBatchSampler(10, 2, seed=3, shuffle=True)
    batches = list(whole)
    assert len(batches) == 5 and sorted(sum(batches, [])) == list(range(10))
    whole.set_position(0, 3)
    assert list(whole) == batches[3:]
    whole.set_position(1, 0)
    assert list(whole) != batches  # a new permutation each epoch
    ranks = [ResumableBatchSampler(10, 2, seed=3, shuffle=True, dp_rank=r, dp_degree=2) for r in (0, 1)]
    firsts = [next(iter(r)) for r in ranks]
    assert sorted(firsts[0] + firsts[1]) == sorted(batches[0] + batches[1])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 2, seed=0, shuffle=False, dp_degree=2)


def test_fit_logs_metrics_and_exports_a_loadable_model(tmp_path):
    recipe = load_recipe(
        "tiny/stage5",
        [*SMALL, "--run.root", str(tmp_path), "--train.max_steps", "3", "--train.grad_accum_steps", "2"]
        + ["--train.activation_checkpointing", "true"],
    )
    result = Trainer(recipe).fit()
    assert result.steps == 3 and len(result.losses) == 3
    records = read_metrics(tmp_path / "stage5" / "metrics.jsonl")
    for key in ("loss", "lr", "tokens_per_s", "frames_per_s", "memory_gib", "grad_norm"):
        assert key in records[0]
    assert records[0]["frames"] > 0
    assert (tmp_path / "stage5" / "recipe.yaml").read_text() == recipe.to_yaml()
    loaded = LongVILA.from_pretrained(result.final_dir)
    assert loaded.config.extra["stage"] == 5


def test_padding_batch_gives_zero_loss_and_zero_gradients(tmp_path):
    """What a rank runs for a skipped last micro-batch under DDP (so that every rank runs the same
    backward passes): nothing is learnt from it."""
    trainer = Trainer(load_recipe("tiny/stage5", [*SMALL, "--run.root", str(tmp_path)]))
    trainer.setup()
    batch = trainer._padding_batch()
    assert int((batch["labels"] != -100).sum()) == 0
    loss, tokens, frames = trainer._forward_backward(batch)
    assert loss == 0.0 and tokens == trainer.sequence_multiple and frames == 0
    grads = [p.grad for p in trainer.params if p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)
