"""The chunked torch reference of the fused linear cross-entropy against the naive loss and the stock / patch-level
losses it must equal; the dispatch (CPU fallback logged once) and the errors of `fused_linear_cross_entropy`."""

import logging

import pytest
import torch
import torch.nn.functional as F

from hf_effitrain.ops import fused_linear_cross_entropy, linear_cross_entropy_naive, linear_cross_entropy_reference
from hf_effitrain.ops import linear_cross_entropy as lce_module
from tests.kernels.kernels_helpers import IGNORE, loss_and_grads, make_inputs
from tests.testing_utils import clear_log_once

# ---------------------------------------------------------------------------------------------- reference vs naive


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("k, weighted", [(1, False), (4, False), (4, True), (1, True)])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_reference_matches_naive(reduction, k, weighted, chunk_size):
    inputs = make_inputs(23, 12, 37, k, weighted=weighted)
    ref, ref_grads = loss_and_grads(linear_cross_entropy_reference, *inputs, reduction, chunk_size=chunk_size)
    naive, naive_grads = loss_and_grads(linear_cross_entropy_naive, *inputs, reduction)
    torch.testing.assert_close(ref, naive, atol=1e-6, rtol=1e-5)
    for got, want in zip(ref_grads, naive_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_k1_mean_is_the_stock_causal_lm_loss():
    hidden, weight, targets, _ = make_inputs(19, 8, 29, 1)
    loss = fused_linear_cross_entropy(hidden, weight, targets, use_kernel=False)
    stock = F.cross_entropy(hidden @ weight.T, targets[:, 0], ignore_index=IGNORE)
    torch.testing.assert_close(loss, stock)


def test_k4_mean_is_the_patch_level_loss():
    hidden, weight, targets, _ = make_inputs(19, 8, 29, 4)
    loss = fused_linear_cross_entropy(hidden, weight, targets, use_kernel=False)
    log_probs = F.log_softmax(hidden @ weight.T, dim=-1)
    patch = sum(F.nll_loss(log_probs, targets[:, i], ignore_index=IGNORE) for i in range(4)) / 4
    torch.testing.assert_close(loss, patch)


def test_weights_scale_terms_but_not_the_denominator():
    hidden, weight, targets, _ = make_inputs(10, 8, 29, 1, ignored=False)
    half = torch.full(targets.shape, 0.5)
    full = fused_linear_cross_entropy(hidden, weight, targets, use_kernel=False)
    torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets, half, use_kernel=False), full / 2)


def test_reference_never_holds_the_full_logits():
    """Chunked under checkpointing: no saved tensor for backward is as large as the (N, V) logits."""
    hidden, weight, targets, _ = make_inputs(64, 8, 512, 1)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy_reference(hidden, weight, targets, chunk_size=8)
    assert sizes and max(sizes) < 64 * 512


def test_all_ignored_column_contributes_zero():
    hidden, weight, targets, _ = make_inputs(6, 8, 29, 2, ignored=False)
    targets[:, 1] = IGNORE
    loss = fused_linear_cross_entropy(hidden, weight, targets, use_kernel=False)
    first = F.cross_entropy(hidden @ weight.T, targets[:, 0])
    torch.testing.assert_close(loss, first / 2)


# ------------------------------------------------------------------------------------------------ dispatch, errors


def test_cpu_default_runs_the_reference_and_logs_once(caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    clear_log_once()
    hidden, weight, targets, _ = make_inputs(7, 8, 19, 1)
    with caplog.at_level(logging.INFO, logger=lce_module.__name__):
        for _ in range(3):
            loss = fused_linear_cross_entropy(hidden, weight, targets)
    assert len([r for r in caplog.records if "torch reference" in r.getMessage()]) == 1
    torch.testing.assert_close(loss, linear_cross_entropy_naive(hidden, weight, targets))
    with pytest.raises(ValueError, match="use_kernel=True"):
        fused_linear_cross_entropy(hidden, weight, targets, use_kernel=True)


def _bad(hidden, weight, targets):
    return {
        "targets_1d": (dict(targets=targets[:, 0]), ValueError, "targets must be"),
        "targets_rows": (dict(targets=targets[:-1]), ValueError, "targets must be"),
        "weight_h": (dict(weight=weight[:, :-1]), ValueError, "weight must be"),
        "hidden_3d": (dict(hidden=hidden[None]), ValueError, "hidden must be"),
        "dtype": (dict(weight=weight.double()), TypeError, "dtype"),
        "float_targets": (dict(targets=targets.float()), TypeError, "int64"),
        "target_range": (dict(targets=torch.full_like(targets, 19)), ValueError, r"\[0, 19\)"),
        "ignore_in_vocab": (dict(ignore_index=3), ValueError, "ignore_index=3"),
        "weights_shape": (dict(target_weights=torch.ones(7, 3)), ValueError, "target_weights"),
        "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    }


@pytest.mark.parametrize(
    "case",
    ["targets_1d", "targets_rows", "weight_h", "hidden_3d", "dtype", "float_targets", "target_range",
     "ignore_in_vocab", "weights_shape", "reduction"],
)  # fmt: skip
def test_bad_inputs_are_named(case):
    hidden, weight, targets, _ = make_inputs(7, 8, 19, 2)
    overrides, error, message = _bad(hidden, weight, targets)[case]
    kwargs = dict(hidden=hidden, weight=weight, targets=targets) | overrides
    with pytest.raises(error, match=message):
        fused_linear_cross_entropy(**kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_under_autocast_matches_naive_outside(reduction, dtype):
    inputs = make_inputs(11, 8, 23, 2, dtype=dtype, weighted=True)
    # the forward in a bf16 autocast region, the backward after it (as torch recommends): the op turns autocast
    # off inside and keeps the inputs' dtypes, so it computes what it computes without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(*inputs, ignore_index=IGNORE, reduction=reduction, use_kernel=False)
    upstream = torch.linspace(0.5, 2.0, loss.numel(), device=loss.device).reshape(loss.shape)
    got, got_grads = loss.detach(), torch.autograd.grad((loss * upstream).sum(), inputs[:2])
    want, want_grads = loss_and_grads(linear_cross_entropy_naive, *inputs, reduction)
    assert got.dtype == torch.float32
    # same float32 math on the same inputs; bf16 gradients differ by their final rounding only
    loss_tol, grad_tol = ((1e-5, 1e-5), (1e-5, 1e-4)) if dtype == torch.float32 else ((1e-5, 1e-5), (1e-2, 1e-2))
    torch.testing.assert_close(got, want, atol=loss_tol[0], rtol=loss_tol[1])
    for got_grad, want_grad, param in zip(got_grads, want_grads, inputs[:2]):
        assert got_grad.dtype == param.dtype
        torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=grad_tol[0], rtol=grad_tol[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_with_no_rows_is_differentiable(reduction):
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.zeros(0, 2, dtype=torch.long), reduction=reduction)
    assert loss.shape == ((0, 2) if reduction == "none" else ()) and loss.dtype == torch.float32
    loss.sum().backward()
    assert torch.count_nonzero(weight.grad) == 0 and hidden.grad.shape == hidden.shape
