"""The `effitrain` console script: help for every subcommand, clear errors, and a 2-process DDP pre-training run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from hf_effitrain.cli import SUBCOMMANDS, main


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_subcommand_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["pretrian"])
    assert "unknown command 'pretrian'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--preset", "huge", "--output_dir", "unused"], "Unknown preset 'huge'; valid presets are"),
        (["generate", "--checkpoint", "unused", "--dtype", "float64"], "Unknown dtype 'float64'; valid dtypes are"),
        (["generate", "--checkpoint", "unused", "--device", "tpu"], "Unknown device 'tpu'; valid devices are"),
        (["generate", "--checkpoint", "unused", "--prompt", ""], "prompt is empty"),
        (
            ["pretrain", "--preset", "tiny", "--config_overrides", "hiden_size=64", "--output_dir", "unused"],
            "Unknown config field 'hiden_size'",
        ),
    ],
)
def test_console_script_reports_a_bad_value_in_one_line(argv, message, tmp_path):
    effitrain = shutil.which("effitrain")
    assert effitrain, "the console script is installed with the package"
    proc = subprocess.run([effitrain, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"effitrain {argv[0]}: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    debug = subprocess.run(
        [effitrain, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "EFFITRAIN_TRACEBACK": "1"},
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and message in debug.stderr


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(command):
    proc = subprocess.run(
        [sys.executable, "-m", "hf_effitrain.cli", command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: effitrain" in proc.stdout


def test_pretrain_under_two_process_ddp(tmp_path):
    """`torchrun` with the gloo backend on CPU: both ranks train, rank 0 saves, the step count is shared."""
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "hf_effitrain.cli",
        "pretrain",
        "--preset",
        "tiny",
        "--max_files",
        "30",
        "--vocab_size",
        "300",
        "--block_size",
        "32",
        "--max_eval_blocks",
        "4",
        "--output_dir",
        str(tmp_path / "ddp"),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "--report_to",
        "none",
        "--save_steps",
        "3",
        "--ddp_backend",
        "gloo",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '"global_step": 3' in proc.stdout
    # 3 steps x 2 ranks x 2 sequences x 32 tokens: both processes consumed data
    assert '"tokens_seen": 384' in proc.stdout
    assert (tmp_path / "ddp" / "model.safetensors").exists()
