"""`longvila train --recipe R [--section.key VALUE ...]`: train one stage from a YAML recipe.

longvila train --recipe tiny/stage1 --run.root runs/demo
torchrun --nproc-per-node 8 -m longvila.cli train --recipe longvila-7b/stage5_long_sft_256f
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        required=True,
        help="a recipe file, or a packaged name such as tiny/stage1 or longvila-7b/stage1_align",
    )
    parser.add_argument(
        "--print-recipe", action="store_true", help="print the resolved recipe and exit without training"
    )
    parser.epilog = (
        "Any recipe field can be overridden: --train.lr 1e-5 --run.root runs/x --data.num_frames 64"
    )
    accept_overrides(parser)


def accept_overrides(parser: argparse.ArgumentParser) -> None:
    """Let `parser.parse_args` keep dotted `--section.key VALUE` pairs in `args.overrides`.

    argparse cannot declare every recipe field; the recipe loader validates them instead (a wrong key
    fails there with the list of valid keys)."""

    def parse_args(args=None, namespace=None):
        known, rest = argparse.ArgumentParser.parse_known_args(parser, args, namespace)
        flags = [a.split("=")[0] for a in rest if a.startswith("--")]
        if any("." not in f for f in flags) or (rest and not rest[0].startswith("--")):
            parser.error(f"unrecognized arguments: {' '.join(rest)} (overrides look like --train.lr 1e-5)")
        known.overrides = rest
        return known

    parser.parse_args = parse_args


def run(args: argparse.Namespace) -> int:
    from longvila.train.recipe import load_recipe

    overrides = list(getattr(args, "overrides", None) or [])
    try:
        recipe = load_recipe(args.recipe, overrides)
    except ValueError as exc:
        print(f"longvila train: {exc}", file=sys.stderr)
        return 2
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    from longvila.train.run import make_trainer

    trainer = make_trainer(recipe)
    try:
        trainer.setup()
    except (ValueError, FileNotFoundError) as exc:
        print(f"longvila train: {exc}", file=sys.stderr)
        return 2
    result = trainer.fit()
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(
        f"{recipe.run.name}: {result.steps} steps (resumed from {result.resumed_from}), last loss {last}, "
        f"{result.seconds:.1f} s; model in {result.final_dir}"
    )
    return 0
