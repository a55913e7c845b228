"""V-NIAH with the haystack encoded in shares and every prompt prefilled with MM-SP (gloo, float64)
returns the single-process sweep: the same generated answers, teacher-forced scores and logits."""

from __future__ import annotations

from _launch import run_distributed
from _niah_cases import niah_case


def _check(results, layouts):
    for rank, r in enumerate(results):
        assert len({a for cell in r["ref_generated"] for a in cell}) > 1  # answers vary: a real comparison
        for name in layouts:
            got = r["sp"][name]
            assert got["generated"] == r["ref_generated"], (rank, name)
            assert got["teacher_forced"] == r["ref_teacher_forced"], (rank, name)
            assert got["accuracy"] == r["ref_accuracy"], (rank, name)
            assert got["haystack_rel"] <= 1e-12, (rank, name, got["haystack_rel"])
            assert got["logits_rel"] <= 1e-10, (rank, name, got["logits_rel"])
            assert got["resumed_equal"], (rank, name)
    # SP rank 0 wrote one file per cell (2 frame counts x 3 depths); the files are shared.
    for name in layouts:
        assert len(results[0]["sp"][name]["files"]) == 6


def test_niah_under_sp_equals_single_process_on_2_ranks(tmp_path):
    layouts = [(2, 1), (1, 2)]
    results = run_distributed(niah_case, 2, layouts, tmp_path, timeout=600)
    _check(results, [f"u{u}r{r}" for u, r in layouts])


def test_niah_under_sp_equals_single_process_on_4_ranks(tmp_path):
    layouts = [(2, 2)]
    results = run_distributed(niah_case, 4, layouts, tmp_path, timeout=600)
    _check(results, [f"u{u}r{r}" for u, r in layouts])


def test_eval_niah_cli_under_torchrun_writes_the_single_process_cells(tmp_path):
    import json
    import subprocess
    import sys

    from _models import lively_checkpoint
    from _torchrun import TORCHRUN, run_command

    ckpt = lively_checkpoint(tmp_path / "ckpt")
    grid = ["--frames", "4,8", "--depths", "0,100", "--num-needles", "2", "--model", str(ckpt)]
    cli = ["-m", "longvila.cli", "eval", "niah", *grid]
    single = subprocess.run(
        [sys.executable, *cli, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]
    parallel = run_command(
        [*TORCHRUN, "--nproc-per-node", "2", *cli, "--ulysses", "2", "--out", str(tmp_path / "sp")],
        timeout=300,
    )
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout.count("mean ") == 1  # rank 0 alone reports
    cells = sorted((tmp_path / "one" / "cells").glob("*.json"))
    assert len(cells) == 4
    for cell in cells:
        ours = json.loads((tmp_path / "sp" / "cells" / cell.name).read_text())
        assert ours["needles"] == json.loads(cell.read_text())["needles"]
    assert (tmp_path / "sp" / "niah.png").stat().st_size > 0
    # A layout that does not match the processes fails before any work, naming both.
    wrong = subprocess.run(
        [sys.executable, *cli, "--ulysses", "2", "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert wrong.returncode == 1 and "must equal the number of processes (1" in wrong.stderr
