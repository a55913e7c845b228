"""`longvila data`: build data sets.

longvila data synth --out DIR [--seed 0] [--quick]     every stage's synthetic set + V-NIAH
longvila data long-sft …                                (not yet implemented)
longvila data pack-text …                               (not yet implemented)
"""

from __future__ import annotations

import argparse
import sys
import time

HELP = "build data: synthetic sets, long-video SFT, packed text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="write the synthetic sets of every stage and the V-NIAH set")
    synth.add_argument("--out", required=True, help="output folder (manifests, media, index.json)")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    synth.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests and demos")
    sub.add_parser("long-sft", help="long-video SFT data from captioned clips (not yet implemented)")
    sub.add_parser(
        "pack-text", help="pack text to a target length for context extension (not yet implemented)"
    )


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from longvila.data.synthetic import generate_all

        start = time.perf_counter()
        paths = generate_all(args.out, seed=args.seed, quick=args.quick)
        for name, path in paths.items():
            print(f"{name:10s} {path}")
        print(f"wrote {len(paths)} sets to {args.out} in {time.perf_counter() - start:.1f} s (index.json)")
        return 0
    print(f"longvila data {args.data_command}: not yet implemented", file=sys.stderr)
    return 2
