"""The `longvila` command line: one module per subcommand under `longvila.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int`; its one-line help lives in
`COMMANDS` below, so that listing the commands imports none of them.
Modules are imported only when their subcommand runs, so `longvila --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order `--help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("longvila.commands.demo", "run the whole pipeline on the tiny embedded default"),
    "train": ("longvila.commands.train", "train one stage from a YAML recipe"),
    "eval": ("longvila.commands.eval", "evaluate: needle in a haystack, video QA"),
    "ask": ("longvila.commands.ask", "ask a model about a video or image"),
    "serve": ("longvila.commands.serve", "OpenAI-compatible HTTP server"),
    "data": ("longvila.commands.data", "build data: synthetic sets, long-video SFT, packed text"),
    "plan": ("longvila.commands.plan", "choose a parallel layout for a model, frame count and cluster"),
    "convert": (
        "longvila.commands.convert",
        "convert checkpoints between the longvila, official and NVILA -hf layouts",
    ),
    "info": ("longvila.commands.info", "print versions, devices and a checkpoint's summary"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longvila",
        description="Train and run long-context video language models (LongVILA).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"longvila {name}: not available in this version", file=sys.stderr)
            return 2
        raise
    sub_parser = argparse.ArgumentParser(prog=f"longvila {name}", description=help_text)
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
