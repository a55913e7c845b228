"""`longvila demo [--out DIR] [--quick]`: the whole pipeline on the tiny embedded default, on a CPU.

1. synthetic data (`longvila.data.synthetic`): captions, short-video QA, passkey text;
2. the five tiny stages (`recipes/tiny/stage{1..5}.yaml`), each starting from the previous one's export:
   projector alignment, pre-training, short SFT ("what does the odd frame show": flat colours, shapes and
   tints in 1..4-frame clips), text-only context extension (LoRA, RoPE base 10^4 -> 10^6, merged), long SFT on
   the same odd-frame task in haystacks of 1..32 frames, log-uniform;
3. V-NIAH on the exported stage-5 model over frame counts up to 4x the training length and depths
   0..100 %, twice: with the **trained** needle (a flat colour frame and the stage-5 question: the
   training task at new lengths, `niah_trained`, `niah.png`) and with **held-out** needles the model never
   saw (digits, shapes, rendered words, a shape's colour, two-needle order and sum, each with its own
   question: `niah_heldout`, `niah_heldout.png`), each beside its chance level, in `report.json`;
4. stage 6, reinforcement learning (GRPO, `recipes/tiny/stage6.yaml`) from the stage-5 model on a
   counting task (how many red frames): a cold-start SFT on a few labelled replies, then GRPO on
   rule-checked answers, beside an SFT-only control (the same labelled replies for as many steps);
   `report.json`'s "rl" section holds held-out accuracy before and after RL and of the control, the
   reward curve and the vision-encoder calls (docs/rl.md).

`--quick` runs the same path with few steps and a small grid (a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

DATA_SIZES = {
    "captions": {"num_images": 48, "num_videos": 16},
    "video_qa": {"num": 32, "num_frames": 8},
    "passkey": {"num": 32, "length": 120},
    "needle_qa": {"num": 2, "num_frames": 32, "min_sample_frames": 8},
    "vniah": {"haystack_seconds": 8, "num_needles": 2},
}
FULL = {
    "steps": {1: 20, 2: 20, 3: 300, 4: 20, 5: 1000, 6: 110},
    "rl": {},
    "train_frames": 32,
    "frame_counts": [8, 16, 32, 64, 128],
    "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "num_needles": 10,
    "heldout_per_kind": 4,  # held-out probes per kind (2 were too few to tell transfer from chance)
}
_NO_SHAPE_OR_TINT = {"shape": 0.0, "tint": 0.0}  # overrides merge into a recipe's mix: drop these by name
COLOUR_ONLY = {
    3: {
        "run": {"num_threads": 1},
        "data": {"odd_frame_mix": {"colour": 0.3, "shape_colour": 0.7, **_NO_SHAPE_OR_TINT}},
    },
    5: {
        "run": {"num_threads": 1},
        "data": {"odd_frame_mix": {"colour": 0.55, "shape_colour": 0.45, **_NO_SHAPE_OR_TINT}},
    },
}
"""`recipe_overrides` of the colour-only curriculum (scripts/demo_niah_seeds.py --colour-only, with stage
steps 3: 500, 5: 800): no shape names, no tints, most of stage 3 on a shape's colour; measured beside the
default in docs/evaluation.md."""
QUICK = {
    "steps": {1: 2, 2: 2, 3: 2, 4: 2, 5: 10, 6: 2},
    "rl": {"sft_steps": 2, "heldout_questions": 8, "train_questions": 16, "sft_questions": 8},
    "train_frames": 4,
    "frame_counts": [4, 8, 16],
    "depths": [0.0, 0.5, 1.0],
    "num_needles": 2,
    "heldout_per_kind": 1,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (data, stages, report)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage and a small grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and order")
    parser.add_argument(
        "--progress", action="store_true", help="show per-stage progress bars and every V-NIAH cell"
    )


def _train_stage(number: int, out: Path, settings: dict, seed: int, progress: bool) -> dict:
    from longvila.train.metrics import read_metrics
    from longvila.train.recipe import load_recipe
    from longvila.train.run import train

    overrides = {
        "run": {"root": str(out), "seed": seed},
        "train": {"max_steps": settings["steps"][number]},
        "logging": {"progress_bar": progress},
    }
    if number == 5:
        overrides["data"] = {"num_frames": settings["train_frames"]}
    if number == 6 and settings["rl"]:
        overrides["rl"] = dict(settings["rl"])
    for section, values in settings.get("recipe_overrides", {}).get(number, {}).items():
        overrides.setdefault(section, {}).update(values)  # a variant's settings win
    recipe = load_recipe(f"tiny/stage{number}", overrides)
    final = recipe.run_dir / "final"
    began = time.perf_counter()
    if (final / "config.json").is_file() and (recipe.run_dir / "done.json").is_file():
        print(f"stage {number}: reusing {final}", flush=True)
    else:
        train(recipe)
        (recipe.run_dir / "done.json").write_text(json.dumps({"stage": number}) + "\n")
    losses = [r["loss"] for r in read_metrics(recipe.run_dir / "metrics.jsonl")]
    seconds = time.perf_counter() - began
    summary = {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "seconds": round(seconds, 2),
        "recipe": f"tiny/stage{number}",
    }
    first = f"{losses[0]:.3f}" if losses else "-"
    last = f"{losses[-1]:.3f}" if losses else "-"
    print(f"stage {number}: {len(losses)} steps, loss {first} -> {last}, {seconds:.1f} s", flush=True)
    return summary


def _sweep(needles, out_dir: Path, settings: dict, seed: int, progress: bool, model, processor):
    """One V-NIAH grid over the demo's frame counts and depths, on a haystack the model never saw
    (its own seed stream, separate from the training samples)."""
    from longvila.data.synthetic import noise_frames
    from longvila.eval.niah import run_niah

    haystack = noise_frames(np.random.default_rng([seed, 99]), max(settings["frame_counts"]), 64)
    return run_niah(
        model, processor, haystack, needles, settings["frame_counts"], settings["depths"], out_dir,
        max_new_tokens=6, progress=progress,
    )  # fmt: skip


def _niah(out: Path, settings: dict, seed: int, progress: bool, model, processor):
    """V-NIAH with the trained needle: flat colour frames, the stage-5 question."""
    from longvila.data.synthetic import COLOUR_NAMES, NEEDLE_QUESTION, needle_frame
    from longvila.eval.niah import Needle

    needles = [
        Needle(needle_frame(c, 64), NEEDLE_QUESTION, c) for c in COLOUR_NAMES[: settings["num_needles"]]
    ]
    return _sweep(needles, out / "niah", settings, seed, progress, model, processor)


def _niah_heldout(out: Path, settings: dict, seed: int, progress: bool, model, processor) -> dict:
    """V-NIAH with held-out needles, one grid per kind: {kind: NiahGrid}."""
    from longvila.data.synthetic import heldout_needles
    from longvila.eval.niah import Needle

    grids = {}
    for kind, probes in heldout_needles(seed, settings["heldout_per_kind"], 64).items():
        if progress:
            print(f"held-out needles: {kind}", flush=True)
        needles = [Needle(p["images"], p["question"], p["answer"]) for p in probes]
        grids[kind] = _sweep(needles, out / "niah_heldout" / kind, settings, seed, progress, model, processor)
    return grids


def _grid_summary(grid, chance: float) -> dict:
    frames = grid.frame_counts
    return {
        "chance": chance,
        "mean_accuracy": round(grid.mean_accuracy, 4),
        "mean_accuracy_teacher_forced": round(grid.mean_accuracy_teacher_forced, 4),
        "accuracy_by_frames": {str(f): round(grid.accuracy_at(f), 4) for f in frames},
        "accuracy_by_frames_teacher_forced": {
            str(f): round(grid.accuracy_at(f, teacher_forced=True), 4) for f in frames
        },
        "grid": grid.to_dict(),
    }


HELD_OUT = {
    "images": "digits and shapes drawn centred and full size in an ink colour no training frame uses "
    "(orange, cyan, purple: longvila.data.synthetic.HELDOUT_INKS; training inks are red, yellow, green, "
    "blue, magenta, black); words are never drawn in training at all",
    "questions": "no held-out question is a training question: stages 3 and 5 ask about the odd frame in "
    "other words (longvila.data.synthetic.ODD_FRAME_QUESTIONS), sharing only the key word "
    "(number, shape, colour, order, sum)",
    "haystack": "grey noise frames from their own seed stream, never a training sample",
    "trained_skill": "stages 3 and 5 train 'say what the odd frame shows' on flat colours (all ten colour "
    "names), on shapes in the training inks at random sizes and places (which colour; which shape in stage 3 "
    "only), and on tints (a colour other than white and black thinned with 0-60 % white, one flat frame: "
    "which colour) (each stage's data.odd_frame_mix, by default longvila.train.data.ODD_FRAME_MIX); digits "
    "in the training inks are 5 % of stage 5 (not learned); words and digit pairs are not trained",
}
"""What `niah_heldout` holds out relative to training (report.json, docs/evaluation.md)."""


def niah_reports(trained, heldout: dict, out: Path, train_frames: int) -> tuple[dict, dict]:
    """`niah_trained` and `niah_heldout` of report.json, with their heat maps (`niah.png`, the
    trained needle; `niah_heldout.png`, the mean over held-out kinds)."""
    from longvila.data.synthetic import COLOUR_NAMES, HELDOUT_CHANCE, HELDOUT_QUESTIONS, NEEDLE_QUESTION
    from longvila.eval.plots import plot_niah_heatmap

    chance = 1.0 / len(COLOUR_NAMES)  # ten colours: a guess is right one time in ten
    title = f"V-NIAH, TRAINED needle (flat colour, the stage-5 task; trained <= {train_frames} frames; chance {chance:.2f})"
    niah_trained = {
        "needle": "a flat colour frame: the stage-5 training task, at new haystack lengths",
        "question": NEEDLE_QUESTION,
        **_grid_summary(trained, chance),
        "heatmap": str(plot_niah_heatmap(trained, out / "niah.png", title=title)),
    }
    kinds = {
        kind: {"question": HELDOUT_QUESTIONS[kind], **_grid_summary(grid, HELDOUT_CHANCE[kind])}
        for kind, grid in heldout.items()
    }
    first = next(iter(heldout.values()))
    mean_grid = {
        "frame_counts": first.frame_counts,
        "depths": first.depths,
        "accuracy": np.mean([g.accuracy for g in heldout.values()], axis=0).tolist(),
    }
    mean_chance = float(np.mean([HELDOUT_CHANCE[k] for k in heldout]))
    title = f"V-NIAH, HELD-OUT needles (never trained: digits, shapes, words, two-needle; chance {mean_chance:.2f})"
    niah_heldout = {
        "needle": "images and questions no training stage saw (longvila.data.synthetic.heldout_needles)",
        "held_out": HELD_OUT,
        "chance": mean_chance,
        "mean_accuracy": round(float(np.mean([g.mean_accuracy for g in heldout.values()])), 4),
        "mean_accuracy_teacher_forced": round(
            float(np.mean([g.mean_accuracy_teacher_forced for g in heldout.values()])), 4
        ),
        "kinds": kinds,
        "heatmap": str(plot_niah_heatmap(mean_grid, out / "niah_heldout.png", title=title)),
    }
    return niah_trained, niah_heldout


def train_and_probe(out: Path, settings: dict, seed: int, progress: bool) -> dict:
    """Synthetic data, stages 1..5 (a stage whose export and `done.json` exist is reused) and the two
    V-NIAH sweeps of the stage-5 model: {"stages", "timings", "trained": NiahGrid, "heldout": {kind:
    NiahGrid}}. `run_demo` adds stage 6; scripts/demo_niah_seeds.py runs this alone over seeds."""
    from longvila.data.synthetic import generate_all
    from longvila.model.vlm import LongVILA
    from longvila.processor import LongVILAProcessor

    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    timings = {}
    generate_all(out / "data", seed=seed, quick=True, sizes=DATA_SIZES)
    timings["data_s"] = round(time.perf_counter() - began, 2)
    print(f"synthetic data in {out / 'data'} ({timings['data_s']:.1f} s)", flush=True)
    stages = {}
    for number in range(1, 6):
        stages[f"stage{number}"] = _train_stage(number, out, settings, seed, progress)
        timings[f"stage{number}_s"] = stages[f"stage{number}"]["seconds"]
    final = out / "stage5" / "final"
    model, processor = LongVILA.from_pretrained(final), LongVILAProcessor.from_pretrained(final)
    start = time.perf_counter()
    trained = _niah(out, settings, seed, progress, model, processor)
    timings["niah_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    heldout = _niah_heldout(out, settings, seed, progress, model, processor)
    timings["niah_heldout_s"] = round(time.perf_counter() - start, 2)
    return {"stages": stages, "timings": timings, "trained": trained, "heldout": heldout}


def run_demo(out: str | Path, *, quick: bool = False, seed: int = 0, progress: bool = False) -> dict:
    """Run the demo into `out`; returns the report (also written to `out/report.json`)."""
    import torch

    out = Path(out)
    settings = QUICK if quick else FULL
    began = time.perf_counter()
    probed = train_and_probe(out, settings, seed, progress)
    timings = probed["timings"]
    stage6 = _train_stage(6, out, settings, seed, progress)  # reported under "rl", not "stages"
    timings["stage6_s"] = stage6["seconds"]
    rl_control = _rl_sft_control(out, settings, seed, progress)
    timings["stage6_sft_control_s"] = rl_control["seconds"]
    timings["total_s"] = round(time.perf_counter() - began, 2)
    train_frames = settings["train_frames"]
    niah_trained, niah_heldout = niah_reports(probed["trained"], probed["heldout"], out, train_frames)
    report = {
        "quick": quick,
        "seed": seed,
        "stages": probed["stages"],
        "niah_trained": niah_trained,
        "niah_heldout": niah_heldout,
        "train_frames": train_frames,
        "rl": {**_rl_report(out / "stage6"), **rl_control["report"], "stage": stage6},
        "timings": timings,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    _print_summary(report, out)
    return report


def _rl_sft_control(out: Path, settings: dict, seed: int, progress: bool) -> dict:
    """Stage 6's SFT-only control (`rl.sft_only`): the cold start's labelled replies for every step of
    the stage, no RL; what RL's held-out gain is measured against."""
    from longvila.train.recipe import load_recipe
    from longvila.train.run import train

    overrides = {
        "run": {"root": str(out), "seed": seed, "name": "stage6_sft_control"},
        "train": {"max_steps": settings["steps"][6]},
        "logging": {"progress_bar": progress},
        "rl": {**settings["rl"], "sft_only": True},
    }
    recipe = load_recipe("tiny/stage6", overrides)
    path = recipe.run_dir / "rl_eval.json"
    began = time.perf_counter()
    if not (path.is_file() and "after" in json.loads(path.read_text())):
        train(recipe)
    seconds = round(time.perf_counter() - began, 2)
    evaluation = json.loads(path.read_text())
    accuracy = evaluation["after"]["accuracy"]
    print(f"stage 6 SFT-only control: held-out accuracy {accuracy:.3f}, {seconds:.1f} s", flush=True)
    report = {"heldout_accuracy_sft_control": accuracy, "sft_control_steps": evaluation["sft_steps"]}
    return {"report": report, "seconds": seconds}


def _rl_report(run_dir: Path) -> dict:
    """The "rl" section of the report, from stage 6's `rl_eval.json` and metrics."""
    from longvila.train.metrics import read_metrics

    evaluation = json.loads((run_dir / "rl_eval.json").read_text())
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("phase") == "rl"]
    return {
        "task": "count",
        "heldout_accuracy_before": evaluation["before"]["accuracy"],
        "heldout_accuracy_after": evaluation["after"]["accuracy"],
        "heldout_format_before": evaluation["before"]["format"],
        "heldout_format_after": evaluation["after"]["format"],
        "heldout_questions": evaluation["after"]["questions"],
        "reward_curve": [round(r["reward"], 4) for r in records],
        "accuracy_curve": [round(r["accuracy"], 4) for r in records],
        "vision_encodes": evaluation["cache"]["encodes"],
        "videos": evaluation["cache"]["videos"],
        "rollouts": evaluation["rollouts"],
    }


def _print_summary(report: dict, out: Path) -> None:
    train_frames = report["train_frames"]
    trained, heldout = report["niah_trained"], report["niah_heldout"]
    print(
        f"\nV-NIAH, trained needle (flat colour; exact match of the generated colour; chance {trained['chance']:.0%}):"
    )
    for frames, acc in trained["accuracy_by_frames"].items():
        ratio = int(frames) / train_frames
        tf = trained["accuracy_by_frames_teacher_forced"][frames]
        print(f"  {int(frames):5d} frames ({ratio:g}x training length): {acc:.3f}  (teacher-forced {tf:.3f})")
    print(f"  mean {trained['mean_accuracy']:.3f} over depths 0..100 %")
    print(f"V-NIAH, held-out needles (never trained; mean chance {heldout['chance']:.0%}):")
    for kind, result in heldout["kinds"].items():
        print(
            f"  {kind:13s} {result['mean_accuracy']:.3f}  (teacher-forced "
            f"{result['mean_accuracy_teacher_forced']:.3f}; chance {result['chance']:.3f})"
        )
    print(f"  mean {heldout['mean_accuracy']:.3f}")
    rl = report["rl"]
    print(
        f"RL (stage 6, GRPO, counting): held-out accuracy {rl['heldout_accuracy_before']:.3f} -> "
        f"{rl['heldout_accuracy_after']:.3f} (SFT-only control {rl['heldout_accuracy_sft_control']:.3f}); "
        f"{rl['rollouts']} rollouts, {rl['vision_encodes']} vision "
        f"encodes for {rl['videos']} videos"
    )
    print(
        f"report: {out / 'report.json'}  heat maps: {trained['heatmap']}, {heldout['heatmap']}  "
        f"total {report['timings']['total_s']:.0f} s"
    )


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, seed=args.seed, progress=args.progress)
    return 0
