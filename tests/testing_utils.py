"""Helpers shared by the test suite: tiny models of every tested architecture and a package-free subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from hf_effitrain.models.presets import build_model

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2")
TINY_VOCAB = 128


def tiny_model(architecture: str = "llama", vocab_size: int = TINY_VOCAB, seed: int = 0, **overrides):
    """A `tiny` preset model (hidden 32, 2 layers) in float32 eval mode, deterministic for a given seed."""
    torch.manual_seed(seed)
    model = build_model("tiny", architecture, vocab_size=vocab_size, max_position_embeddings=256, **overrides)
    return model.float().eval()


_BLOCK_PACKAGE = '''
import importlib.abc, sys
class _BlockHfEffitrain(importlib.abc.MetaPathFinder):
    """Make `hf_effitrain` unimportable so the checkpoint must stand on its own remote code."""
    def find_spec(self, name, path=None, target=None):
        if name == "hf_effitrain" or name.startswith("hf_effitrain."):
            raise ModuleNotFoundError(f"hf_effitrain is blocked in this test process: {name}", name=name)
        return None
sys.meta_path.insert(0, _BlockHfEffitrain())
'''


def run_without_package(script: str, cwd: str | os.PathLike, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python where `import hf_effitrain` fails, offline, and return the finished process.

    Raises `AssertionError` with the child's stderr when it exits non-zero.
    """
    code = _BLOCK_PACKAGE + textwrap.dedent(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"package-free subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_script_without_package(
    script: str | os.PathLike, *args: str, cwd: str | os.PathLike, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run the Python file `script` with `args` as `run_without_package` runs a code string (`__name__ == "__main__"`)."""
    code = f"import runpy, sys\nsys.argv = {[str(script), *args]!r}\nrunpy.run_path({str(script)!r}, run_name='__main__')\n"
    return run_without_package(code, cwd=cwd, timeout=timeout)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def clear_log_once() -> None:
    """Forget the messages transformers' `warning_once` / `info_once` have already logged in this process, so a test
    can check that a fallback is reported (once)."""
    import logging

    from transformers.utils import logging as hf_logging  # noqa: F401  (installs the *_once methods)

    logging.Logger.warning_once.cache_clear()
    logging.Logger.info_once.cache_clear()
