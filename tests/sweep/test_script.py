"""`scripts/sweep_architectures.py` runs, merges slices and prints the README table."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.testing_utils import repo_root

SCRIPT = repo_root() / "scripts" / "sweep_architectures.py"


def run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=repo_root()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sweep_script_writes_merges_and_tabulates(tmp_path):
    run("--types", "gpt2", "openai-gpt", "--output", str(tmp_path / "a.json"))
    partial = json.loads((tmp_path / "a.json").read_text())
    assert partial["uncommitted_changes"] == partial["git_dirty"] and "source_digest" in partial  # the run record
    partial["results"] = partial["results"][:1]  # a slice holding gpt2 only, joined with the full run
    # recorded as earlier runs did (three packages): still merges with a run that records more
    partial["versions"] = {k: partial["versions"][k] for k in ("transformers", "torch", "python")}
    (tmp_path / "b.json").write_text(json.dumps(partial))
    run("--merge", str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--output", str(tmp_path / "all.json"))
    payload = json.loads((tmp_path / "all.json").read_text())
    assert payload["versions"]["transformers"] and payload["date"] and payload["slice_commands"]
    results = {r["model_type"]: r for r in payload["results"]}
    assert [results["gpt2"][f] for f in ("jacobi", "tr_jacobi", "export", "patch_loss")] == ["exact"] * 4
    assert results["openai-gpt"]["jacobi"].startswith("refused: ValueError:")
    assert payload["summary"]["built"] == 2
    table = run("--table", str(tmp_path / "all.json"))
    assert "| `gpt2` |" in table and "| `openai-gpt` |" in table
    assert "refused: no KV cache" in table
