"""`effitrain cascade-train` and `effitrain cascade-eval`: help texts and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_effitrain.cli import main as effitrain
from hf_effitrain.methods.cascade.job import CascadeExportArguments
from tests.cascade.cascade_helpers import tiny_pair, word_tokenizer


@pytest.mark.parametrize("command", ["cascade-train", "cascade-eval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        effitrain([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--small_model" in text and "--large_model" in text
    assert ("--cascade_preset" in text) == (command == "cascade-train")
    assert ("--metric METRIC" in text) == (command == "cascade-eval")


def test_train_then_eval_end_to_end(tmp_path):
    small, large = tiny_pair("llama")
    tokenizer = word_tokenizer()
    for name, model in (("small", small), ("large", large)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    g = torch.Generator().manual_seed(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": " ".join(f"w{t}" for t in torch.randint(3, 128, (40,), generator=g).tolist())}) + "\n"
            for _ in range(40)
        )
    )
    common = [
        "--small_model",
        str(tmp_path / "small"),
        "--large_model",
        str(tmp_path / "large"),
        "--corpus",
        str(corpus),
        "--validation_fraction",
        "0.25",
        "--block_size",
        "16",
    ]
    out_dir = tmp_path / "run"
    assert (
        effitrain(
            [
                "cascade-train",
                *common,
                "--output_dir",
                str(out_dir),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "4",
                "--cascade_preset",
                "paper",
                "--weight_large_only",
                "0.5",
                "--use_cpu",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
                "--threshold",
                "-4.0",
            ]
        )
        == 0
    )
    cascade = AutoModelForCausalLM.from_pretrained(out_dir / "cascade", trust_remote_code=True)
    assert cascade.config.threshold == -4.0
    # exported like every other job: a model card naming the method and the strategies' custom_generate/
    card = (out_dir / "cascade" / "README.md").read_text()
    assert "cascade-aware training" in card and "| `large_only` | 0.5 |" in card
    assert (out_dir / "cascade" / "custom_generate" / "generate.py").is_file()
    trained = AutoModelForCausalLM.from_pretrained(out_dir)
    assert not torch.equal(trained.lm_head.weight, small.lm_head.weight)
    assert torch.equal(cascade.large.lm_head.weight, large.lm_head.weight)
    eval_dir = tmp_path / "eval"
    assert (
        effitrain(
            [
                "cascade-eval",
                "--cascade",
                str(out_dir / "cascade"),
                "--corpus",
                str(corpus),
                "--validation_fraction",
                "0.25",
                "--block_size",
                "16",
                "--num_points",
                "3",
                "--output_dir",
                str(eval_dir),
                "--decoded_prompts",
                "1",
                "--decoded_prompt_len",
                "8",
                "--decoded_new_tokens",
                "6",
            ]
        )
        == 0
    )
    curve = json.loads((eval_dir / "deferral_curve.json").read_text())
    assert curve["deferral_ratio"][0] == 0.0 and curve["deferral_ratio"][-1] == 1.0
    assert (eval_dir / "deferral_curve.png").exists()
    decoded = json.loads((eval_dir / "decoded_curves.json").read_text())
    chow = decoded["curves"]["speculative_chow"][
        "points"
    ]  # alpha 0 is the large model's greedy output, alpha 1 the small's
    assert (chow[0]["small_share"], chow[0]["quality"]) == (0.0, decoded["large"]["quality"])
    assert (chow[-1]["small_share"], chow[-1]["quality"]) == (1.0, decoded["small"]["quality"])
    assert decoded["speculative_decoding"]["equal_to_large_greedy"] == 1 and (eval_dir / "decoded_curves.png").exists()


@pytest.mark.parametrize("command", ["cascade-train", "cascade-eval"])
@pytest.mark.parametrize("option", ["--small_model", "--large_model", "--cascade"])
def test_bad_checkpoint_folders_are_refused_before_any_work(tmp_path, command, option):
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text("{}")
    (binonly / "pytorch_model.bin").write_bytes(b"pickle")
    extra = ["--output_dir", str(tmp_path / "out")] + (
        ["--use_cpu", "--report_to", "none"] if command == "cascade-train" else []
    )
    with pytest.raises(ValueError, match=f"{option}: .*'nope' does not exist"):
        effitrain([command, option, "nope", *extra])
    with pytest.raises(ValueError, match=f"{option}: .*pickled weights.*pytorch_model.bin"):
        effitrain([command, option, str(binonly), *extra])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("--split", "foo", r"split 'foo'.*\['validation', 'test'\]"),
        ("--split", "train", r"split 'train'.*\['validation', 'test'\]"),
        ("--batch_size", "0", "batch_size must be >= 1, got 0"),
        ("--max_examples", "0", "max_examples must be >= 1 or unset, got 0"),
        ("--max_new_tokens", "-1", "max_new_tokens must be >= 1 or unset, got -1"),
        ("--num_points", "1", "num_points must be >= 2"),
        ("--metric", "bleu", r"metric 'bleu'.*token_accuracy"),
        ("--decoded_prompts", "-1", "decoded_prompts must be >= 0"),
        ("--cascade_draft_len", "0", "cascade_draft_len must be >= 1, got 0"),
    ],
)
def test_cascade_eval_argument_checks(tmp_path, option, value, match):
    with pytest.raises(ValueError, match=match):
        effitrain(["cascade-eval", option, value, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_cascade_eval_accepts_the_documented_splits():
    from hf_effitrain.methods.cascade.job import CascadeEvalArguments

    assert [CascadeEvalArguments(split=split, max_examples=None).split for split in ("validation", "test")] == [
        "validation",
        "test",
    ]


def test_cascade_train_refuses_a_non_empty_export_dir_before_any_work(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite_export"):
        CascadeExportArguments(export_dir=str(export))
    assert CascadeExportArguments(export_dir=str(export), overwrite_export=True).overwrite_export
