"""Stage 6 end to end on the tiny model: a run killed mid-RL (SIGKILL) and resumed follows the same
reward curve and samples the same rollouts; each video goes through the vision tower once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from _models import lively_checkpoint

from longvila.train.metrics import read_metrics
from longvila.train.recipe import load_recipe
from longvila.train.rl.trainer import RLTrainer

SMALL = [
    "--data.num_frames", "2", "--data.batch_size", "2", "--rl.group_size", "4", "--rl.train_questions", "6",
    "--rl.heldout_questions", "4", "--rl.sft_questions", "4", "--rl.sft_steps", "2", "--rl.max_new_tokens", "6",
    "--rl.temperature", "2.0", "--rl.format_weight", "0.5", "--run.deterministic", "true",
    "--run.num_threads", "1", "--logging.progress_bar", "false", "--checkpoint.save_final", "false",
]  # fmt: skip


def _cmd(root, name, init, every):
    return [sys.executable, "-m", "longvila.cli", "train", "--recipe", "tiny/stage6", "--run.root", str(root),
            "--run.name", name, "--model.init", str(init), "--train.max_steps", "6",
            "--checkpoint.every_steps", str(every), *SMALL]  # fmt: skip


def _env():
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_killed_rl_run_resumes_on_the_same_reward_curve(tmp_path):
    init = lively_checkpoint(tmp_path / "init")
    ref = subprocess.run(_cmd(tmp_path, "ref", init, 0), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [r["phase"] for r in reference] == ["sft"] * 2 + ["rl"] * 6
    rl = [r for r in reference if r["phase"] == "rl"]
    assert len({r["rollout_digest"] for r in rl}) == len(rl)  # every step samples new replies

    cmd = _cmd(tmp_path, "killed", init, 3)  # the first checkpoint is after one RL step
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(tmp_path / "killed" / "metrics.jsonl")) < len(reference)

    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "killed" / "setup.json").read_text())["resumed_from"] >= 3
    curve = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    keys = ("step", "phase", "loss", "grad_norm", "reward", "accuracy", "format", "rollout_digest")
    assert [[r.get(k) for k in keys] for r in curve] == [[r.get(k) for k in keys] for r in reference]
    before = json.loads((tmp_path / "ref" / "rl_eval.json").read_text())
    after_kill = json.loads((tmp_path / "killed" / "rl_eval.json").read_text())
    assert after_kill["before"] == before["before"] and after_kill["after"] == before["after"]
    # the resumed process read the videos it had already encoded from the persistent cache
    assert after_kill["cache"]["disk_hits"] > 0
    assert after_kill["cache"]["encodes"] <= after_kill["cache"]["videos"]


def test_each_video_is_encoded_once_for_rollouts_reference_and_policy(tmp_path):
    init = lively_checkpoint(tmp_path / "init")
    overrides = [*SMALL, "--run.root", str(tmp_path), "--run.name", "count", "--model.init", str(init),
                 "--train.max_steps", "5", "--rl.kl_coef", "0.1", "--rl.updates_per_batch", "2",
                 "--rl.micro_batch_rollouts", "3"]  # fmt: skip
    trainer = RLTrainer(load_recipe("tiny/stage6", overrides))
    trainer.setup()
    frames_in = []
    tower = trainer.model.vision_tower
    forward = tower.forward
    tower.forward = lambda x: (frames_in.append(int(x.shape[0])), forward(x))[1]
    result = trainer.fit()
    assert result.steps == 7
    evaluation = json.loads((tmp_path / "count" / "rl_eval.json").read_text())
    cache = evaluation["cache"]
    # one vision call per distinct video (train + held-out), however many rollouts and forward passes
    assert len(frames_in) == cache["encodes"] == cache["videos"]
    assert sum(frames_in) == 2 * cache["videos"]
    assert cache["memory_hits"] > cache["videos"]
    assert evaluation["rollouts"] == 5 * 2 * 4
    assert trainer.reference is not None and not any(p.requires_grad for p in trainer.reference.parameters())
    assert not any(p.requires_grad for p in trainer.model.vision_tower.parameters())
    records = read_metrics(tmp_path / "count" / "metrics.jsonl")
    assert all(r["kl"] >= 0 for r in records if r["phase"] == "rl")
    # the reference is the policy frozen when RL began (after the cold-start SFT), not the initial model
    from longvila import LongVILA

    initial = LongVILA.from_pretrained(init).llm.get_input_embeddings().weight
    frozen = trainer.reference.llm.get_input_embeddings().weight
    final = trainer.model.llm.get_input_embeddings().weight
    assert not torch.equal(frozen, initial) and not torch.equal(frozen, final)
    assert torch.equal(
        torch.load(tmp_path / "count" / "rl_reference.pt")["llm.model.embed_tokens.weight"], frozen
    )
    assert torch.isfinite(torch.tensor([r["loss"] for r in records])).all()
    # the demo's report section reads this run
    from longvila.commands.demo import _rl_report

    report = _rl_report(tmp_path / "count")
    assert report["reward_curve"] == [round(r["reward"], 4) for r in records if r["phase"] == "rl"]
    assert len(report["reward_curve"]) == 5 and report["rollouts"] == 40
    assert report["heldout_accuracy_before"] == evaluation["before"]["accuracy"]
    assert report["vision_encodes"] == report["videos"] == cache["videos"]


def test_sft_only_control_and_the_stratified_cold_start(tmp_path):
    """`rl.sft_only`: every step of the stage is a cold-start SFT step (the control RL is measured
    against), evaluated at the end; the labelled questions cover every answer of the training split."""
    from longvila.commands.demo import QUICK, _rl_sft_control

    lively_checkpoint(tmp_path / "stage5" / "final")  # where the demo's stage 6 starts
    settings = {**QUICK, "rl": {**QUICK["rl"], "sft_questions": 5, "train_questions": 12}}
    out = _rl_sft_control(tmp_path, settings, seed=0, progress=False)
    run_dir = tmp_path / "stage6_sft_control"
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = QUICK["rl"]["sft_steps"] + QUICK["steps"][6]
    assert [r["phase"] for r in records] == ["sft"] * steps
    evaluation = json.loads((run_dir / "rl_eval.json").read_text())
    assert evaluation["sft_only"] and evaluation["rollouts"] == 0 and evaluation["sft_steps"] == steps
    assert "before" not in evaluation  # no RL began
    assert out["report"] == {
        "heldout_accuracy_sft_control": evaluation["after"]["accuracy"],
        "sft_control_steps": steps,
    }
    # the cold start's questions: stratified by answer, from a split whose first 5 questions miss some
    trainer = RLTrainer(load_recipe(run_dir / "recipe.yaml"))
    trainer.setup()
    pool = trainer._sft_pool()
    answers = [trainer.train_set[i].answer for i in range(len(trainer.train_set))]
    assert len(pool) == 5 and {answers[i] for i in pool} == set(answers)
    assert len(set(answers[:5])) < len(set(answers))  # the first questions alone would miss an answer
