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
        effitrain,
        "demo",
        "--output_dir",
        str(tmp_path / "demo"),
        "--preset",
        "tiny",
        "--max_files",
        "30",
        "--vocab_size",
        "300",
        "--block_size",
        "32",
        "--max_steps",
        "4",
        "--max_new_tokens",
        "12",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # interrupted: a time budget that ends training after its first (patch-level) step, which is saved
    proc = subprocess.run(
        [*cmd, "--time_budget_s", "0.001"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["optimizer_steps"] == 1 and summary["resumed_from"] is None
    assert summary["pretraining"]["stage_reached"] == "patch"
    assert "never trained at token level" in proc.stderr

    # run again: it continues from that checkpoint, through the token-level stage, to the end of the same schedule
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-1")
    assert summary["optimizer_steps"] == 4
    patch = summary["pretraining"]
    assert patch["patch_size"] == 4 and patch["stage_reached"] == "token" and 0.25 < patch["relative_compute"] < 1.0
    assert summary["reloaded_class"] == "EffiLlamaForCausalLM"
    assert summary["tr_jacobi_equals_greedy"] is True
    assert summary["validation_loss"] > 0
    assert (tmp_path / "demo" / "export" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "export" / "README.md").exists()
    assert summary["tr_jacobi_forwards"] < 12 + 1  # prefill + at most one forward per new token
    assert summary["tr_jacobi_tokens_per_forward"] >= 12 / summary["tr_jacobi_forwards"] - 1e-3
    assert summary["tr_jacobi_speed_vs_greedy"] > 0


@pytest.mark.parametrize("field, value", [("max_steps", 0), ("batch_size", -1), ("time_budget_s", 0.0)])
def test_demo_rejects_bad_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        DemoArguments(**{field: value})
