"""`longvila demo --quick`: the whole pipeline's mechanics (files, grid shape, report keys), not accuracy."""

import json

import numpy as np

from longvila.cli import main


def test_quick_demo_writes_report_heatmap_and_grid(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "chance 10%" in printed and "V-NIAH, trained needle" in printed and "held-out" in printed

    report = json.loads((out / "report.json").read_text())
    for key in ("stages", "niah_trained", "niah_heldout", "train_frames", "timings"):
        assert key in report
    assert sorted(report["stages"]) == [f"stage{i}" for i in range(1, 6)]
    for stage in report["stages"].values():
        assert stage["steps"] >= 1 and len(stage["losses"]) == stage["steps"]
    trained = report["niah_trained"]
    grid = trained["grid"]
    assert len(grid["accuracy"]) == len(grid["depths"]) == 3
    assert all(len(row) == len(grid["frame_counts"]) for row in grid["accuracy"])
    assert max(grid["frame_counts"]) == 4 * report["train_frames"]
    assert 0.0 <= trained["mean_accuracy"] <= 1.0 and trained["chance"] == 0.1
    assert (out / "niah.png").stat().st_size > 1000 and (out / "niah_heldout.png").stat().st_size > 1000
    assert len(list((out / "niah" / "cells").glob("*.json"))) == 9
    # Held-out: every kind, each with its own chance level and a grid of the same shape.
    from longvila.data.synthetic import HELDOUT_CHANCE

    heldout = report["niah_heldout"]
    assert sorted(heldout["kinds"]) == sorted(HELDOUT_CHANCE)
    for kind, result in heldout["kinds"].items():
        assert result["chance"] == HELDOUT_CHANCE[kind]
        assert np.array(result["grid"]["accuracy"]).shape == (3, 3)
        assert len(list((out / "niah_heldout" / kind / "cells").glob("*.json"))) == 9
    assert abs(heldout["chance"] - np.mean(list(HELDOUT_CHANCE.values()))) < 1e-9
    for i in range(1, 6):
        assert (out / f"stage{i}" / "final" / "config.json").is_file()
    llm = json.loads((out / "stage4" / "final" / "config.json").read_text())["llm"]
    assert (llm.get("rope_parameters") or {}).get("rope_theta", llm.get("rope_theta")) == 1e6
    assert "total_s" in report["timings"]
