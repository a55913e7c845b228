"""Stage 6 (GRPO) over several seeds from one stage-5 model, each beside its SFT-only control.

    PYTHONPATH=src python scripts/rl_seeds.py --init runs/demo/stage5/final --out /tmp/rl_seeds

For every seed: `longvila train --recipe tiny/stage6` (cold start, then GRPO) and the same recipe with
`--rl.sft_only true` (the same labelled questions for the same number of steps, no RL). The seed sets
the questions (training and held-out), the data order and the sampling; the stage-5 model is the same.
Prints a table of held-out accuracy (SFT cold start -> after RL; SFT-only control) and writes
`seeds.json` into `--out`. Extra arguments are recipe overrides for both runs (`--train.max_steps 40`).
Runs `--jobs` at a time (one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _command(init: str, out: Path, name: str, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "longvila.cli", "train", "--recipe", "tiny/stage6", "--run.root", str(out),
            "--run.name", name, "--run.seed", str(seed), "--model.init", init, "--run.num_threads", "1",
            "--logging.progress_bar", "false", "--checkpoint.resume", "never", *extra]  # fmt: skip


def _accuracy(out: Path, name: str, key: str) -> float:
    return json.loads((out / name / "rl_eval.json").read_text())[key]["accuracy"]


def run_seeds(init: str, out: Path, seeds: list[int], extra: list[str], jobs: int) -> list[dict]:
    """Run every seed's RL and control runs (`jobs` at a time); returns one row per seed."""
    runs = [(f"rl_seed{s}", s, extra) for s in seeds]
    runs += [(f"sft_control_seed{s}", s, [*extra, "--rl.sft_only", "true"]) for s in seeds]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < jobs:
            name, seed, args = pending.pop(0)
            log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed when the run ends
            began = time.perf_counter()
            proc = subprocess.Popen(_command(init, out, name, seed, args), env=env, stdout=log, stderr=log)
            active.append((name, proc, log, began))
        for item in list(active):
            name, proc, log, began = item
            if proc.poll() is not None:
                log.close()
                active.remove(item)
                if proc.returncode:
                    raise SystemExit(f"{name} failed (exit {proc.returncode}): see {out / name}.log")
                print(f"{name}: {time.perf_counter() - began:.0f} s", flush=True)
        time.sleep(1)
    return [
        {
            "seed": s,
            "before": _accuracy(out, f"rl_seed{s}", "before"),
            "after": _accuracy(out, f"rl_seed{s}", "after"),
            "sft_control": _accuracy(out, f"sft_control_seed{s}", "after"),
        }
        for s in seeds
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--init", required=True, help="the stage-5 model folder (e.g. runs/demo/stage5/final)"
    )
    parser.add_argument("--out", required=True, help="folder for the runs and seeds.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_seeds(args.init, out, args.seeds, extra, args.jobs)
    gains = [r["after"] - r["before"] for r in rows]
    over_control = [r["after"] - r["sft_control"] for r in rows]
    summary = {
        "init": args.init,
        "overrides": extra,
        "seeds": rows,
        "gain_min": min(gains),
        "gain_max": max(gains),
        "gain_mean": sum(gains) / len(gains),
        "over_control_min": min(over_control),
        "over_control_max": max(over_control),
    }
    (out / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("| seed | before RL (cold start) | after RL | gain | SFT-only control | RL - control |")
    print("|---|---|---|---|---|---|")
    for r, g, c in zip(rows, gains, over_control):
        print(
            f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {g:+.3f} | {r['sft_control']:.3f} | {c:+.3f} |"
        )
    print(f"gain {min(gains):+.3f} .. {max(gains):+.3f} (spread {max(gains) - min(gains):.3f}); "
          f"over the control {min(over_control):+.3f} .. {max(over_control):+.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
