"""On a CPU machine, run the Triton kernel tests in a fresh pytest process under TRITON_INTERPRET=1 (see conftest)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.kernels_helpers import triton_interpreter_active

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the Triton tests run directly")
@pytest.mark.skipif(triton_interpreter_active(), reason="already inside the interpreter run")
def test_triton_kernels_in_the_interpreter():
    files = sorted(str(path) for path in HERE.glob("test_triton_*.py"))
    assert files, f"no test_triton_*.py file in {HERE}"  # an empty list would make pytest run the whole suite
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rs", *files]
    result = subprocess.run(command, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, summary
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], summary
