import subprocess
import sys

from longvila.cli import COMMANDS


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "longvila.cli", "--help"], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert name in out.stdout


def test_unknown_command_fails_with_the_choices():
    out = subprocess.run([sys.executable, "-m", "longvila.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode != 0 and "unknown command 'frobnicate'" in out.stderr
