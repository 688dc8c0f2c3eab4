"""`effitrain demo` at a tiny size through the real console script: train, export, reload with remote code, decode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from hf_effitrain.cli.demo import DemoArguments


def test_demo_runs_end_to_end_at_tiny_size(tmp_path):
    effitrain = shutil.which("effitrain")
    assert effitrain, "the console script is installed with the package"
    cmd = [
        effitrain, "demo", "--output_dir", str(tmp_path / "demo"), "--preset", "tiny", "--max_files", "30",
        "--vocab_size", "300", "--block_size", "32", "--max_steps", "4", "--max_new_tokens", "12",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["optimizer_steps"] == 4
    assert summary["reloaded_class"] == "EffiLlamaForCausalLM"
    assert summary["tr_jacobi_equals_greedy"] is True
    assert summary["validation_loss"] > 0
    assert (tmp_path / "demo" / "export" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "export" / "README.md").exists()
    assert summary["resumed_from"] is None
    assert summary["tr_jacobi_forwards"] < 12 + 1  # prefill + at most one forward per new token
    assert summary["tr_jacobi_tokens_per_forward"] >= 12 / summary["tr_jacobi_forwards"] - 1e-3

    # run again with a larger step budget: it continues from the first run's last checkpoint
    proc = subprocess.run([*cmd[:-4], "--max_steps", "6", *cmd[-2:]], capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert summary["optimizer_steps"] == 6


@pytest.mark.parametrize("field, value", [("max_steps", 0), ("batch_size", -1), ("time_budget_s", 0.0)])
def test_demo_rejects_bad_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        DemoArguments(**{field: value})
