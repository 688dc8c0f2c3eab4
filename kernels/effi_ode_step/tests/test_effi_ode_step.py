"""Kernel-repo tests (run from the repo root on a CUDA machine): the built kernel against the eager formula."""

from pathlib import Path

import pytest
import torch
from kernels import get_local_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernel: needs CUDA")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 2e-2)])
@pytest.mark.parametrize("shape", [(2, 17, 512), (5, 4096), (3, 1, 1000)])
def test_matches_eager(dtype, atol, rtol, shape):
    kernel = get_local_kernel(REPO)
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    update = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.rand(shape[-1], device="cuda", requires_grad=True)
    fused = kernel.ode_step_rms_norm(x, update, weight, 0.25, 1e-6)
    eager = kernel.ode_step_rms_norm_reference(x, update, weight, 0.25, 1e-6)
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    grads_out = [torch.randn_like(t) for t in eager]
    for got, want in zip(torch.autograd.grad(fused, (x, update, weight), grads_out),
                         torch.autograd.grad(eager, (x, update, weight), grads_out)):  # fmt: skip
        torch.testing.assert_close(got.float(), want.float(), atol=5 * atol, rtol=5 * rtol)
