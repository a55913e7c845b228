"""The demo's V-NIAH (trained needle and held-out needles) over several seeds, without stage 6.

    PYTHONPATH=src python scripts/demo_niah_seeds.py --out runs/niah_seeds --seeds 0,1,2

For each seed S this runs what `longvila demo --seed S --out OUT/seedS` runs up to and including the
two V-NIAH sweeps (data, stages 1..5, `niah_trained`, `niah_heldout`; a stage already exported there is
reused, so a demo's folder can be pointed at), writes OUT/seedS/niah_report.json and prints one
markdown row per seed: the trained needle by frame count and each held-out kind beside its chance level
(the table in docs/evaluation.md). `--heldout-per-kind N` asks N held-out probes per kind instead of
the demo's 4 (the demo itself is unchanged). `--mix3`/`--mix5` (a JSON mix; kinds left out get
share 0) and `--steps3`/`--steps5` try another curriculum, e.g.

    PYTHONPATH=src python scripts/demo_niah_seeds.py --out /tmp/v --mix5 '{"colour": 0.5, "tint": 0.5}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/niah_seeds", help="one folder per seed is made in here")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--heldout-per-kind", type=int, default=None, help="held-out probes per kind")
    parser.add_argument(
        "--colour-only",
        action="store_true",
        help="the colour-only curriculum (commands/demo.py COLOUR_ONLY; stage 3: 500 steps, 5: 800)",
    )
    for stage in (3, 5):
        parser.add_argument(
            f"--mix{stage}",
            type=json.loads,
            default=None,
            help=f'stage {stage}\'s data.odd_frame_mix as JSON, e.g. \'{{"colour": 0.5, "tint": 0.5}}\' (replaces it)',
        )
        parser.add_argument(f"--steps{stage}", type=int, default=None, help=f"stage {stage}'s steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    from longvila.commands.demo import COLOUR_ONLY, FULL, niah_reports, train_and_probe
    from longvila.data.synthetic import HELDOUT_CHANCE
    from longvila.train.recipe import ODD_FRAME_KINDS

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(FULL)
    if args.colour_only:
        settings["steps"] = {**settings["steps"], 3: 500, 5: 800}
        settings["recipe_overrides"] = COLOUR_ONLY
    overrides = {stage: dict(values) for stage, values in settings.get("recipe_overrides", {}).items()}
    for stage in (3, 5):
        mix, steps = getattr(args, f"mix{stage}"), getattr(args, f"steps{stage}")
        if mix is not None:  # a full mix: kinds it leaves out get share 0 (the recipe's mix is merged into)
            full = dict.fromkeys(ODD_FRAME_KINDS, 0.0) | {k: float(v) for k, v in mix.items()}
            overrides.setdefault(stage, {})["data"] = {"odd_frame_mix": full}
        if steps is not None:
            settings["steps"] = {**settings["steps"], stage: steps}
    settings["recipe_overrides"] = overrides
    if args.heldout_per_kind:
        settings["heldout_per_kind"] = args.heldout_per_kind
    frames = [f for f in settings["frame_counts"] if f >= settings["train_frames"]]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        out = Path(args.out) / f"seed{seed}"
        probed = train_and_probe(out, settings, seed, progress=False)
        trained, heldout = niah_reports(probed["trained"], probed["heldout"], out, settings["train_frames"])
        report = {
            "seed": seed,
            "niah_trained": trained,
            "niah_heldout": heldout,
            "timings": probed["timings"],
        }
        (out / "niah_report.json").write_text(json.dumps(report, indent=1) + "\n")
        by_frames = " / ".join(f"{trained['accuracy_by_frames'][str(f)]:.2f}" for f in frames)
        kinds = " | ".join(f"{heldout['kinds'][k]['mean_accuracy']:.2f}" for k in HELDOUT_CHANCE)
        rows.append(f"| {seed} | {by_frames} | {kinds} |")
    print(f"\n| seed | trained {' / '.join(map(str, frames))} frames | {' | '.join(HELDOUT_CHANCE)} |")
    print("|---" * (2 + len(HELDOUT_CHANCE)) + "|")
    print("\n".join(rows))
    print(f"| chance | 0.10 | {' | '.join(f'{c:.2f}' for c in HELDOUT_CHANCE.values())} |")


if __name__ == "__main__":
    main()
