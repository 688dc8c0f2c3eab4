"""Helpers of the kernel tests: linear cross-entropy inputs, a loss+gradients helper, the interpreter check, and
the import of the kernel tooling under `scripts/`."""

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"


def import_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as a module, imported as running the script does: with `scripts/` first on `sys.path`
    (so its sibling imports such as `from kernel_build import ...` resolve), then `sys.path` restored."""
    sys.path.insert(0, str(SCRIPTS_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS_DIR))


def triton_interpreter_active() -> bool:
    """Whether Triton kernels defined from now on run in the interpreter, standard library included."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language as tl

    return type(tl.standard.max).__name__ == "InterpretedFunction"


IGNORE = -100
# (atol, rtol) of kernel vs reference. bf16: the kernel's chunk logits and dlogits are bf16 (as Liger's), the
# reference computes float32 logits from the same bf16 inputs.
LOSS_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}
GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}


def make_inputs(n, h, v, k, dtype=torch.float32, device="cpu", weighted=False, ignored=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=generator) * h**-0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n, k), generator=generator)
    if ignored:
        targets[::3, 0] = IGNORE
        targets[1, :] = IGNORE
    if k > 1:
        targets[2, 1] = targets[2, 0] = 5  # a repeated target in one row
    target_weights = torch.rand(n, k, generator=generator).to(device) if weighted else None
    return hidden, weight, targets.to(device), target_weights


def loss_and_grads(fn, hidden, weight, targets, target_weights, reduction, **kwargs):
    loss = fn(hidden, weight, targets, target_weights, ignore_index=IGNORE, reduction=reduction, **kwargs)
    # a non-trivial upstream gradient checks that the backward rescales (scalar) or reweights ("none")
    upstream = torch.linspace(0.5, 2.0, loss.numel(), device=loss.device).reshape(loss.shape)
    grads = torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
    return loss.detach(), grads
