"""The Triton fused linear cross-entropy against the torch reference: forward and gradients over odd shapes,
K in {1, 4}, with and without weights, ignored and repeated targets, float32 and bfloat16; custom-op checks."""

import pytest
import torch

from hf_effitrain.ops import (
    fused_linear_cross_entropy,
    linear_cross_entropy_naive,
    linear_cross_entropy_reference,
    load_kernel_module,
)
from tests.kernels.kernels_helpers import GRAD_TOL, IGNORE, LOSS_TOL, loss_and_grads, make_inputs

# ----------------------------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("k, weighted", [(1, False), (4, True), (4, False)])
def test_kernel_matches_reference(kernel_device, dtype, reduction, k, weighted):
    inputs = make_inputs(21, 24, 67, k, dtype=dtype, device=kernel_device, weighted=weighted)
    got, got_grads = loss_and_grads(fused_linear_cross_entropy, *inputs, reduction, use_kernel=True)
    want, want_grads = loss_and_grads(linear_cross_entropy_reference, *inputs, reduction)
    atol, rtol = LOSS_TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    atol, rtol = GRAD_TOL[dtype]
    for got_grad, want_grad, param in zip(got_grads, want_grads, inputs[:2]):
        assert got_grad.dtype == param.dtype
        torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=atol, rtol=rtol)


def test_kernel_handles_non_contiguous_inputs_and_no_grad(kernel_device):
    hidden, weight, targets, _ = make_inputs(9, 16, 33, 2, device=kernel_device)
    strided_hidden = torch.stack([hidden, hidden], dim=2)[:, :, 0]  # same values, stride 2
    assert not strided_hidden.is_contiguous()
    want = linear_cross_entropy_reference(hidden.detach(), weight.detach(), targets)
    with torch.no_grad():
        got = fused_linear_cross_entropy(strided_hidden, weight, targets, use_kernel=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# schema, fake tensor and autograd registration; "test_aot_dispatch_dynamic" compiles and takes minutes interpreted
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_kernel_ops_pass_opcheck(kernel_device):
    kernel = load_kernel_module("effi_linear_cross_entropy")
    hidden, weight, targets, _ = make_inputs(5, 8, 19, 2, device=kernel_device)
    coeffs = torch.rand(targets.shape, device=kernel_device)
    forward_args = (hidden, weight, targets, coeffs, IGNORE, True, True)
    torch.library.opcheck(kernel.linear_cross_entropy_forward, forward_args, test_utils=OPCHECKS)
    torch.library.opcheck(kernel.linear_cross_entropy_losses, (hidden, weight, targets, IGNORE), test_utils=OPCHECKS)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_under_autocast_matches_naive_outside(kernel_device, reduction, dtype):
    inputs = make_inputs(13, 16, 37, 2, dtype=dtype, device=kernel_device, weighted=True)
    # the forward in a bf16 autocast region, the backward after it (as torch recommends): the op turns autocast
    # off inside and keeps the inputs' dtypes, so it computes what it computes without autocast
    with torch.autocast(kernel_device, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(*inputs, ignore_index=IGNORE, reduction=reduction, use_kernel=True)
    upstream = torch.linspace(0.5, 2.0, loss.numel(), device=loss.device).reshape(loss.shape)
    got, got_grads = loss.detach(), torch.autograd.grad((loss * upstream).sum(), inputs[:2])
    want, want_grads = loss_and_grads(linear_cross_entropy_naive, *inputs, reduction)
    assert got.dtype == torch.float32
    atol, rtol = LOSS_TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    atol, rtol = GRAD_TOL[dtype]
    for got_grad, want_grad, param in zip(got_grads, want_grads, inputs[:2]):
        assert got_grad.dtype == param.dtype
        torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=atol, rtol=rtol)
