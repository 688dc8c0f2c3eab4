"""Kernel-repo tests (run from the repo root on a CUDA machine): the built kernel against a naive torch loss."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernels import get_local_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernel: needs CUDA")
REPO = Path(__file__).resolve().parents[1]


def naive(hidden, weight, targets, ignore_index=-100):
    log_probs = F.log_softmax(hidden.float() @ weight.float().T, dim=-1)
    return sum(F.nll_loss(log_probs, targets[:, k], ignore_index=ignore_index) for k in range(targets.shape[1])) / (
        targets.shape[1]
    )


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 3e-2, 2e-2)])
@pytest.mark.parametrize("n, h, v, k", [(37, 64, 1000, 1), (129, 128, 5003, 4)])
def test_matches_naive(dtype, atol, rtol, n, h, v, k):
    lce = get_local_kernel(REPO)
    hidden = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") * h**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n, k), device="cuda")
    targets[::5, 0] = -100
    got = lce.linear_cross_entropy(hidden, weight, targets)
    want = naive(hidden, weight, targets)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    want_grads = torch.autograd.grad(want, (hidden, weight))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=10 * rtol)
