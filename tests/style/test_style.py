"""Code style: ruff's lint rules and its formatter, configured in pyproject.toml (line length 120)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.testing_utils import repo_root

pytest.importorskip("ruff", reason="ruff is part of the test extra: pip install -e '.[test]'")

CHECKED = ("hf_effitrain", "scripts", "tests")


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *CHECKED], cwd=repo_root(), capture_output=True, text=True, timeout=300
    )


def test_ruff_lint_rules_pass():
    proc = _ruff("check", "--output-format", "concise")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_code_is_ruff_formatted():
    proc = _ruff("format", "--check")
    assert proc.returncode == 0, "run `ruff format` on:\n" + proc.stdout + proc.stderr
