"""`effitrain recipe` at its micro size: every stage runs, is recorded, is skipped when done and resumes when not."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hf_effitrain.training.recipe import STAGES, RecipeArguments, run_recipe


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    args = RecipeArguments(output_dir=str(tmp_path_factory.mktemp("recipe") / "run"), size="micro")
    return args, run_recipe(args)


def test_every_stage_runs_and_the_exports_carry_their_default_strategies(recipe_run):
    args, summary = recipe_run
    assert list(summary["stages"]) == list(STAGES)
    stages = summary["stages"]
    assert stages["pretrain_small"]["relative_compute"] == pytest.approx(0.5)  # K=4, lambda=2/3
    assert stages["pretrain_small"]["optimizer_steps"] == 8
    losses = stages["evaluate"]["validation_loss"]
    assert set(losses) == {"pretrain_small", "msn_small", "cat_small", "pretrain_large"} and all(
        loss > 0 for loss in losses.values()
    )
    decoding = stages["evaluate"]["decoding"]["methods"]
    assert decoding["tr_jacobi"]["equal_to_greedy"] == stages["evaluate"]["decoding"]["prompts"]  # exact
    assert set(stages["evaluate"]["cascade"]) == {"large_alone", "sequence", "token", "speculative_cascade"}
    for name, strategy in (("small", "tr_jacobi"), ("cascade", "speculative_cascade")):
        export = stages["export"][name]
        assert json.loads(open(f"{export}/generation_config.json").read())["strategy"] == strategy
        card = open(f"{export}/README.md").read()
        assert "pretrain_small.heldout_loss" in card and "cat_small.heldout_loss" in card
    assert "| decode tr_jacobi |" in summary["table"]


def test_a_second_run_reuses_finished_stages_and_resumes_an_unfinished_one(recipe_run, caplog):
    args, first = recipe_run
    root = first["stages"]["export"]["small"].rsplit("/export/", 1)[0]
    (Path(root) / "cat_small" / "stage.json").unlink()  # as if killed after its last checkpoint
    with caplog.at_level(logging.INFO, logger="hf_effitrain.training.recipe"):
        second = run_recipe(args)
    assert "stage pretrain_small already done" in caplog.text and "running stage cat_small" in caplog.text
    # the re-run CAT stage continued from its last complete checkpoint: no further optimizer steps
    assert second["stages"]["cat_small"]["optimizer_steps"] == first["stages"]["cat_small"]["optimizer_steps"]
    assert second["stages"]["pretrain_small"] == first["stages"]["pretrain_small"]


def test_changed_arguments_are_refused_for_finished_stages(recipe_run):
    args, _ = recipe_run
    changed = RecipeArguments(output_dir=args.output_dir, size="micro", noise_length=3)
    with pytest.raises(ValueError, match="noise_length"):
        run_recipe(changed)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": "huge"}, "Unknown size 'huge'"),
        ({"small_architecture": "gpt2"}, "small_architecture 'gpt2'"),
        ({"time_budget_s": 0}, "time_budget_s"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecipeArguments(**kwargs)
