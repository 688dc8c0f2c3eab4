"""`effitrain pretrain --patch-size 4 --patch-fraction 0.667`: patch-level pre-training from the command line."""

import json

import pytest
from transformers import HfArgumentParser

from hf_effitrain.cli import main
from hf_effitrain.methods.patch.job import PretrainArguments, training_arguments_class


def test_pretrain_command_runs_patch_level_training_and_records_it_in_the_card(tmp_path, capsys):
    argv = [
        "pretrain",
        "--preset",
        "tiny",
        "--max_files",
        "40",
        "--vocab_size",
        "320",
        "--block_size",
        "32",
        "--max_eval_blocks",
        "8",
        "--patch-size",
        "4",
        "--patch-fraction",
        "0.667",
        "--max_steps",
        "12",
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(tmp_path / "run"),
        "--report_to",
        "none",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--export_dir",
        str(tmp_path / "export"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('{\n  "output_dir"') :])
    # equal-tokens batching (default): 12 steps of 4 x 32 tokens = 8 patch steps (1 sequence of 4 x 32) + 4 token steps
    assert summary["global_step"] == 12 and summary["tokens_seen"] == 12 * 4 * 32
    assert summary["metrics"]["train_tokens"] == 12 * 4 * 32 and summary["metrics"]["train_flops"] > 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| `patch_size` | 4 |" in card and "| `patch_fraction` | 0.667 |" in card
    assert "| `patch_batching` | equal_tokens |" in card
    assert "train_flops" in card and "patch-level" in card


def _parse(*flags):
    parser = HfArgumentParser((PretrainArguments, training_arguments_class()), prog="effitrain pretrain")
    return parser.parse_args_into_dataclasses(args=["--output_dir", "run", "--use_cpu", *flags])[1]


def test_pretrain_command_exposes_the_patch_batching():
    assert _parse("--patch-size", "4", "--patch-fraction", "0.5").patch_batching == "equal_tokens"
    assert (
        _parse("--patch-size", "4", "--patch-fraction", "0.5", "--patch-batching", "equal_positions").patch_batching
        == "equal_positions"
    )
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'tokens' (choose from equal_tokens, equal_positions)"
        _parse("--patch-batching", "tokens")
