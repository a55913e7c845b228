"""Recipes: every packaged recipe validates; wrong keys and values fail with the key named, before work."""

import pytest

from longvila.cli import main
from longvila.train.recipe import (
    load_recipe,
    packaged_recipes,
    parse_overrides,
    read_recipe_dict,
    recipe_from_dict,
)

ROPE_TABLE = {131072: 15_300_000, 262144: 207_112_184, 524288: 1_062_356_830, 1048576: 3_580_165_449}


@pytest.mark.parametrize("path", packaged_recipes(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_packaged_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stage.number in (1, 2, 3, 4, 5, 6)  # stage 6: RL (issue 18)
    assert recipe.run.name == path.stem


def test_both_families_have_five_stages_that_chain():
    names = {(p.parent.name, p.stem) for p in packaged_recipes()}
    assert {("tiny", f"stage{i}") for i in range(1, 6)} <= names
    for i in range(2, 6):
        assert load_recipe(f"tiny/stage{i}").model.init == f"runs/tiny/stage{i - 1}/final"
    assert load_recipe("tiny/stage6").model.init == "runs/tiny/stage5/final"
    stages = {load_recipe(p).stage.number for p in packaged_recipes() if p.parent.name == "longvila-7b"}
    assert stages == {1, 2, 3, 4, 5, 6}


def test_longvila_7b_numbers_follow_the_reference():
    assert load_recipe("longvila-7b/stage1_align").train.lr == 1e-3
    assert load_recipe("longvila-7b/stage1_align").train.global_batch_size == 2048
    assert load_recipe("longvila-7b/stage2_pretrain").train.lr == 5e-5
    assert load_recipe("longvila-7b/stage3_short_sft").train.lr == 1e-4
    stage4 = [
        load_recipe(p)
        for p in packaged_recipes()
        if p.parent.name == "longvila-7b" and p.stem.startswith("stage4")
    ]
    assert {r.stage.max_length: r.stage.rope_theta for r in stage4} == ROPE_TABLE
    for r in stage4:
        assert (r.stage.lora_rank, r.stage.lora_alpha, r.train.lr, r.train.schedule) == (
            8,
            16,
            2e-5,
            "constant",
        )
    stage5 = {
        load_recipe(p).data.max_frames: load_recipe(p)
        for p in packaged_recipes()
        if p.parent.name == "longvila-7b" and p.stem.startswith("stage5")
    }
    assert sorted(stage5) == [256, 512, 1024, 2048]
    assert [stage5[f].parallel.sp_degree for f in (256, 512, 1024, 2048)] == [14, 14, 28, 28]
    assert [stage5[f].stage.max_length for f in (256, 512, 1024, 2048)] == [131072, 262144, 262144, 524288]
    assert stage5[256].train.lr == 2e-5 and stage5[512].train.lr == 5e-5


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        load_recipe("tiny/stage1", ["--train.learning_rate", "1e-3"])
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) optimiser"):
        recipe_from_dict({"optimiser": {}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--train.lr", "fast"], r"train\.lr: expected a number"),
        (["--train.lr", "-1"], r"train\.lr must be > 0"),
        (["--stage.number", "7"], r"stage\.number: 7 is not one of"),  # 6 is RL (issue 18)
        (["--train.schedule", "linear"], r"train\.schedule: 'linear'"),
        (["--data.kind", "images"], r"data\.kind"),
        (["--data.batch_size", "2.5"], r"data\.batch_size: expected an integer"),
        (["--run.deterministic", "maybe"], r"run\.deterministic: expected true or false"),
    ],
)
def test_wrong_values_fail_with_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("tiny/stage1", override)


def test_overrides_parse_and_coerce():
    assert parse_overrides(
        ["--train.lr", "1e-5", "--data.shuffle=false", "--stage.lora_targets", "[q_proj]"]
    ) == {
        "train": {"lr": "1e-5"},
        "data": {"shuffle": False},
        "stage": {"lora_targets": ["q_proj"]},
    }
    recipe = load_recipe(
        "tiny/stage4", ["--train.lr", "1e-5", "--run.root", "/x/y", "--stage.lora_targets", "[q_proj]"]
    )
    assert recipe.train.lr == 1e-5 and isinstance(recipe.train.lr, float)
    assert recipe.model.init == "/x/y/stage3/final"  # {root} follows run.root
    assert recipe.stage.lora_targets == ["q_proj"]
    with pytest.raises(ValueError, match="expected --section.key"):
        parse_overrides(["--lr", "1"])


def test_base_is_merged_and_resolved_recipe_round_trips(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  lr: 2.0e-3\n")
    (tmp_path / "base.yaml").write_text(
        "train:\n  lr: 1.0e-3\n  max_steps: 7\nstage:\n  number: 5\ndata:\n  kind: needle\n"
    )
    recipe = load_recipe(child)
    assert (recipe.train.lr, recipe.train.max_steps, recipe.stage.number) == (2e-3, 7, 5)
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert read_recipe_dict(child)["train"]["max_steps"] == 7


def test_cli_rejects_a_bad_recipe_before_any_work(tmp_path, capsys):
    code = main(["train", "--recipe", "tiny/stage1", "--run.root", str(tmp_path), "--train.bogus", "1"])
    assert code == 2
    assert "train.bogus" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_prints_the_resolved_recipe(capsys):
    assert main(["train", "--recipe", "tiny/stage5", "--print-recipe", "--train.lr", "3e-3"]) == 0
    assert "lr: 0.003" in capsys.readouterr().out
