"""Triton kernel tests run on CUDA when there is one, else on CPU in Triton's interpreter.

The interpreter only works when `TRITON_INTERPRET=1` is set before `triton.language` is first imported (its
standard-library functions are decorated at import), and `transformers.Trainer` alone imports triton. So on CPU
the `test_triton_*.py` files skip in the ordinary run and `test_interpreter.py` runs them in a
fresh pytest process started with `TRITON_INTERPRET=1`.
"""

import pytest
import torch

from tests.kernels.kernels_helpers import triton_interpreter_active


@pytest.fixture
def kernel_device() -> str:
    """ "cuda", or "cpu" inside the interpreter subprocess; skips otherwise."""
    if torch.cuda.is_available():
        return "cuda"
    if triton_interpreter_active():
        return "cpu"
    pytest.skip("Triton kernel test: on CPU it runs in test_interpreter.py's TRITON_INTERPRET=1 subprocess")
