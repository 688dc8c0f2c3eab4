"""Fused linear + multi-target cross-entropy (Liger-style chunking, K targets per row, per-target weights).

Rows are processed in chunks whose (rows, V) logits take about as much memory as the (N, H) hidden states. Per
chunk: `logits = x @ W.T` (cuBLAS), then `_linear_cross_entropy_forward_kernel` computes each row's logsumexp with
an online softmax over V tiles, the K per-target losses, and (when gradients are needed) overwrites the logits in
place with `dlogits = (sum_k c_k) * softmax - sum_k c_k * onehot(t_k)`; then `grad_x = dlogits @ W` and
`grad_W += dlogits.T @ x` (float32 accumulator). For `reduction="mean"|"sum"` the gradients are computed in the
forward and the backward only rescales them (the loss is a scalar); for `"none"` the backward recomputes the
chunk logits with the incoming (N, K) gradient as coefficients.

Reductions (`c` = per-target coefficients, 0 for ignored targets): `"sum"`: sum of w * ce; `"mean"`:
`(1/K) sum_k sum_n w * ce / max(1, count_k)` (per-column mean over non-ignored rows, averaged over columns);
`"none"`: the (N, K) tensor w * ce. Math runs in float32 whatever the input dtype, with autocast disabled (under
`torch.autocast` the inputs keep their dtypes and the result is the same float32 as without it).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._ops import add_op_namespace_prefix

__all__ = ["linear_cross_entropy", "linear_cross_entropy_forward", "linear_cross_entropy_backward"]

REDUCTIONS = ("mean", "sum", "none")
# V tile of the online softmax; untuned (no GPU was available to sweep it), Liger uses up to 32k with 32 warps.
MAX_BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _linear_cross_entropy_forward_kernel(
    logits_ptr,  # (rows, V), overwritten with dlogits when WRITE_GRAD
    logits_row_stride,
    targets_ptr,  # (rows, NUM_TARGETS) int
    coeffs_ptr,  # (rows, NUM_TARGETS) float32, 0 for ignored targets
    losses_ptr,  # (rows, NUM_TARGETS) float32 out: unweighted CE per target, 0 where ignored
    vocab_size,
    ignore_index,
    NUM_TARGETS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    targets_row = targets_ptr + row * NUM_TARGETS
    coeffs_row = coeffs_ptr + row * NUM_TARGETS
    # online logsumexp over V tiles, in float32 (the interpreter and bf16 arithmetic disagree otherwise)
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    # K is small and known at launch: unrolled scalar loops keep the registers to one V tile
    for k in tl.static_range(NUM_TARGETS):
        target = tl.load(targets_row + k).to(tl.int64)
        valid = target != ignore_index
        target_logit = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(losses_ptr + row * NUM_TARGETS + k, tl.where(valid, lse - target_logit, 0.0))

    if WRITE_GRAD:
        coeff_sum = 0.0
        for k in tl.static_range(NUM_TARGETS):
            coeff_sum += tl.load(coeffs_row + k)
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            v_mask = offs < vocab_size
            z = tl.load(row_ptr + offs, mask=v_mask, other=float("-inf")).to(tl.float32)
            grad = tl.exp(z - lse) * coeff_sum
            # an ignored target (never in [0, V)) has coefficient 0; repeated targets simply add up
            for k in tl.static_range(NUM_TARGETS):
                grad = tl.where(offs == tl.load(targets_row + k), grad - tl.load(coeffs_row + k), grad)
            tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=v_mask)


# TRITON_INTERPRET=1 at import time: the kernel runs in Triton's interpreter, on CPU tensors (tests only)
_INTERPRETED = type(_linear_cross_entropy_forward_kernel).__name__ == "InterpretedFunction"


def _chunk_rows(num_rows: int, vocab_size: int, hidden_size: int) -> int:
    """Liger's rule: a chunk's (rows, V) logits are about the size of the (N, H) hidden states."""
    inc_factor = max(1, math.ceil(vocab_size / hidden_size))
    rows = max(1, math.ceil(num_rows / inc_factor))
    return max(1, min(num_rows, 1 << (rows - 1).bit_length()))


def _launch_cross_entropy(logits, targets, coeffs, losses, ignore_index: int, write_grad: bool) -> None:
    rows, vocab_size = logits.shape
    _linear_cross_entropy_forward_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        coeffs,
        losses,
        vocab_size,
        ignore_index,
        NUM_TARGETS=targets.shape[1],
        BLOCK_V=min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size)),
        WRITE_GRAD=write_grad,
        num_warps=NUM_WARPS,
    )


def _autocast_disabled(device_type: str):
    """`torch.autocast(device_type, enabled=False)`, or nothing for a device type without autocast (e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _chunked_loss_and_grads(hidden, weight, targets, coeffs, ignore_index, need_grad_hidden, need_grad_weight):
    """(losses (N, K) float32, grad_hidden (N, H) | None, grad_weight (V, H) float32 | None) for coefficients.

    Autocast off: the matmuls must keep the input dtype (`out=` buffers, in-place dlogits), also when a backward
    that recomputes the logits runs inside an autocast region.
    """
    with _autocast_disabled(hidden.device.type):
        return _chunked_loss_and_grads_impl(
            hidden, weight, targets, coeffs, ignore_index, need_grad_hidden, need_grad_weight
        )


def _chunked_loss_and_grads_impl(hidden, weight, targets, coeffs, ignore_index, need_grad_hidden, need_grad_weight):
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    write_grad = need_grad_hidden or need_grad_weight
    losses = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_weight else None
    chunk = _chunk_rows(num_rows, vocab_size, hidden_size)
    for start in range(0, num_rows, chunk):
        end = min(num_rows, start + chunk)
        x = hidden[start:end]
        logits = x @ weight.T  # (rows, V) in the input dtype; becomes dlogits in place
        rows = slice(start, end)
        _launch_cross_entropy(logits, targets[rows], coeffs[rows], losses[rows], ignore_index, write_grad)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight += (logits.T @ x).float()
    return losses, grad_hidden, grad_weight


def _no_tensor(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op(add_op_namespace_prefix("linear_cross_entropy_forward"), mutates_args=())
def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    coeffs: torch.Tensor,
    ignore_index: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scalar `sum(coeffs * ce)` and, when asked, its gradients w.r.t. hidden and weight (empty otherwise)."""
    losses, grad_hidden, grad_weight = _chunked_loss_and_grads(
        hidden, weight, targets, coeffs, ignore_index, need_grad_hidden, need_grad_weight
    )
    loss = (losses * coeffs).sum()
    return loss, _no_tensor(hidden) if grad_hidden is None else grad_hidden, (
        _no_tensor(coeffs) if grad_weight is None else grad_weight
    )


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, targets, coeffs, ignore_index, need_grad_hidden, need_grad_weight):
    loss = coeffs.new_empty(())
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else _no_tensor(hidden)
    grad_weight = weight.new_empty(weight.shape, dtype=torch.float32) if need_grad_weight else _no_tensor(coeffs)
    return loss, grad_hidden, grad_weight


def _forward_setup_context(ctx, inputs, output):
    ctx.need_grads = inputs[5], inputs[6]
    ctx.weight_dtype = inputs[1].dtype
    ctx.save_for_backward(output[1], output[2])


def _forward_backward(ctx, grad_loss, _grad_hidden, _grad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    need_grad_hidden, need_grad_weight = ctx.need_grads
    # the gradients were computed for d(loss) = 1; the backward only rescales them
    out_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if need_grad_hidden else None
    out_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if need_grad_weight else None
    return out_hidden, out_weight, None, None, None, None, None


linear_cross_entropy_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


@torch.library.custom_op(add_op_namespace_prefix("linear_cross_entropy_losses"), mutates_args=())
def linear_cross_entropy_losses(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """(N, K) float32 unweighted CE per target (0 where ignored), logits chunked, no gradient work."""
    coeffs = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return _chunked_loss_and_grads(hidden, weight, targets, coeffs, ignore_index, False, False)[0]


@linear_cross_entropy_losses.register_fake
def _(hidden, weight, targets, ignore_index):
    return hidden.new_empty(targets.shape, dtype=torch.float32)


@torch.library.custom_op(add_op_namespace_prefix("linear_cross_entropy_backward"), mutates_args=())
def linear_cross_entropy_backward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_losses: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `sum(grad_losses * ce)` w.r.t. hidden and weight (float32), recomputing the chunk logits."""
    _, grad_hidden, grad_weight = _chunked_loss_and_grads(
        hidden, weight, targets, grad_losses.float().contiguous(), ignore_index, True, True
    )
    return grad_hidden, grad_weight


@linear_cross_entropy_backward.register_fake
def _(hidden, weight, targets, grad_losses, ignore_index):
    return torch.empty_like(hidden), weight.new_empty(weight.shape, dtype=torch.float32)


def _losses_setup_context(ctx, inputs, output):
    ctx.ignore_index = inputs[3]
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2])


def _losses_backward(ctx, grad_losses):
    hidden, weight, targets = ctx.saved_tensors
    grad_hidden, grad_weight = linear_cross_entropy_backward(hidden, weight, targets, grad_losses, ctx.ignore_index)
    return grad_hidden, grad_weight.to(weight.dtype), None, None


linear_cross_entropy_losses.register_autograd(_losses_backward, setup_context=_losses_setup_context)


def _target_coefficients(targets, target_weights, ignore_index: int, reduction: str) -> torch.Tensor:
    valid = targets != ignore_index
    weights = torch.ones(targets.shape, device=targets.device) if target_weights is None else target_weights.float()
    coeffs = torch.where(valid, weights.detach(), torch.zeros((), device=targets.device))
    if reduction == "mean":
        coeffs = coeffs / (valid.sum(dim=0).clamp_min(1).float() * targets.shape[1])
    return coeffs.contiguous()


def _check_inputs(hidden, weight, targets, target_weights, ignore_index: int, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"need hidden (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.dim() != 2 or targets.shape[0] != hidden.shape[0] or targets.shape[1] < 1:
        raise ValueError(f"targets must be (N, K) with N={hidden.shape[0]}, K >= 1; got {tuple(targets.shape)}")
    if target_weights is not None and target_weights.shape != targets.shape:
        raise ValueError(f"target_weights must be {tuple(targets.shape)}, got {tuple(target_weights.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if 0 <= ignore_index < weight.shape[0]:
        raise ValueError(f"ignore_index={ignore_index} must lie outside the vocabulary [0, {weight.shape[0]})")
    if hidden.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"the Triton kernel needs CUDA tensors, got {hidden.device}; on CPU set TRITON_INTERPRET=1 before import"
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` (N, V) against `targets` (N, K) without materialising the logits.

    Non-contiguous inputs are made contiguous (a copy). Targets outside `[0, V)` other than `ignore_index` are not
    checked here (a device sync); the caller validates them. Returns a float32 scalar, or (N, K) for `"none"`.
    Runs with autocast disabled (the math is float32 on the inputs' own dtypes).
    """
    _check_inputs(hidden, weight, targets, target_weights, ignore_index, reduction)
    with _autocast_disabled(hidden.device.type):
        return _linear_cross_entropy(hidden, weight, targets, target_weights, ignore_index, reduction)


def _linear_cross_entropy(hidden, weight, targets, target_weights, ignore_index: int, reduction: str) -> torch.Tensor:
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    if reduction == "none":
        losses = linear_cross_entropy_losses(hidden, weight, targets, ignore_index)
        return losses * _target_coefficients(targets, target_weights, ignore_index, "sum")
    coeffs = _target_coefficients(targets, target_weights, ignore_index, reduction)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = linear_cross_entropy_forward(
        hidden,
        weight,
        targets,
        coeffs,
        ignore_index,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
    )
    return loss
