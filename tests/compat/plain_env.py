"""Plain Python environments with another transformers release and without hf_effitrain, for checkpoint checks.

A checkpoint's code runs on whatever transformers its user has, so the export is checked in a virtual environment
that holds only torch (the version of the running interpreter), safetensors and the transformers release under
test. Environments are built once and reused (under `~/.cache/hf_effitrain/test-venvs`, or
`EFFI_TEST_VENVS`); building one takes about a minute (torch comes from the local wheel cache or index).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import torch

from tests.testing_utils import _BLOCK_PACKAGE


def _venv_root() -> Path:
    return Path(os.environ.get("EFFI_TEST_VENVS", Path.home() / ".cache" / "hf_effitrain" / "test-venvs"))


def _python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def plain_python(transformers_version: str) -> Path:
    """The interpreter of a venv with torch (this process's version), safetensors and `transformers_version`.

    Raises:
        RuntimeError: with pip's output when the environment cannot be built (e.g. no package index reachable).
    """
    torch_version = torch.__version__.split("+")[0]
    env_dir = _venv_root() / f"transformers-{transformers_version}-torch-{torch_version}"
    python = _python(env_dir)
    marker = env_dir / ".complete"
    if marker.exists():
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    command = [
        str(python),
        "-m",
        "pip",
        "install",
        "-q",
        f"torch=={torch_version}",
        f"transformers=={transformers_version}",
        "safetensors",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Could not build a plain environment with transformers {transformers_version}:\n{proc.stdout}\n{proc.stderr}"
        )
    marker.write_text(transformers_version, encoding="utf-8")
    return python


def run_checks(
    python: Path | str, script: Path, jobs_file: Path, cwd: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `script jobs_file` with `python`, offline and with `hf_effitrain` unimportable; raise on a non-zero exit."""
    code = (
        _BLOCK_PACKAGE
        + f"\nimport runpy, sys\nsys.argv = [{str(script)!r}, {str(jobs_file)!r}]\nrunpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        [str(python), "-c", code], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"checkpoint checks failed under {python}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def current_python() -> str:
    """The running interpreter (the newest supported transformers in CI), used with the package blocked."""
    return sys.executable
