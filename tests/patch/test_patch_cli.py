"""`effitrain pretrain --patch-size 4 --patch-fraction 0.667`: patch-level pre-training from the command line."""

import json

from hf_effitrain.cli import main


def test_pretrain_command_runs_patch_level_training_and_records_it_in_the_card(tmp_path, capsys):
    argv = [
        "pretrain", "--preset", "tiny", "--max_files", "40", "--vocab_size", "320", "--block_size", "32",
        "--max_eval_blocks", "8", "--patch-size", "4", "--patch-fraction", "0.667", "--max_steps", "12",
        "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "run"), "--report_to", "none",
        "--use_cpu", "--disable_tqdm", "true", "--export_dir", str(tmp_path / "export"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('{\n  "output_dir"'):])
    # budget 12 token-level steps of 4 x 32 tokens: 2 patch steps (8 steps' tokens) + 4 token steps
    assert summary["global_step"] == 6 and summary["tokens_seen"] == 12 * 4 * 32
    assert summary["metrics"]["train_tokens"] == 12 * 4 * 32 and summary["metrics"]["train_flops"] > 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| `patch_size` | 4 |" in card and "| `patch_fraction` | 0.667 |" in card
    assert "train_flops" in card and "patch-level" in card
