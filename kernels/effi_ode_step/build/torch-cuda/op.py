"""Fused ODE step + RMSNorm: `x_new = x + step_size * update`, `y = rms_norm(x_new) * weight`, one pass over x.

Eager PyTorch reads x and update, writes x_new, reads it back for the variance, reads it again to normalise and
writes y (plus the temporaries of `step_size * update` and the float32 upcast). `_ode_step_rms_norm_forward_kernel`
loads one row of x and update once, keeps it in registers and writes x_new and y. Math is float32; x_new is rounded
to the input dtype before the norm, as the eager `x_new.float()` sees it.

Backward: autograd recomputes the eager formula in torch from the saved inputs (x, update, weight); only the
forward is a Triton kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._ops import add_op_namespace_prefix

__all__ = ["ode_step_rms_norm", "ode_step_rms_norm_forward", "ode_step_rms_norm_reference"]



def _num_warps(block_h: int) -> int:
    """Liger-Kernel's row-kernel rule (4 warps, 8 from 2048 columns, 16 from 8192); not re-tuned (no GPU here)."""
    return 16 if block_h >= 8192 else 8 if block_h >= 2048 else 4


@triton.jit
def _ode_step_rms_norm_forward_kernel(
    x_ptr,
    update_ptr,
    weight_ptr,
    x_new_ptr,
    y_ptr,
    hidden_size,
    step_size,
    eps,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden_size
    x = tl.load(x_ptr + row * hidden_size + offs, mask=mask, other=0.0).to(tl.float32)
    update = tl.load(update_ptr + row * hidden_size + offs, mask=mask, other=0.0).to(tl.float32)
    x_new = (x + step_size * update).to(x_new_ptr.dtype.element_ty)
    tl.store(x_new_ptr + row * hidden_size + offs, x_new, mask=mask)
    x_new = x_new.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x_new * x_new, axis=0) / hidden_size + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # eager: weight * normed.to(input_dtype), the product in the promoted dtype
    normed = (x_new * rstd).to(x_new_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * hidden_size + offs, (weight * normed).to(y_ptr.dtype.element_ty), mask=mask)


# TRITON_INTERPRET=1 at import time: the kernel runs in Triton's interpreter, on CPU tensors (tests only)
_INTERPRETED = type(_ode_step_rms_norm_forward_kernel).__name__ == "InterpretedFunction"


def ode_step_rms_norm_reference(x, update, weight, step_size: float, eps: float):
    """The eager formula (the model's own forward): the backward recomputes it."""
    x_new = x + step_size * update
    variance = x_new.float().pow(2).mean(-1, keepdim=True)
    normed = x_new.float() * torch.rsqrt(variance + eps)
    return x_new, weight * normed.to(x.dtype)


@torch.library.custom_op(add_op_namespace_prefix("ode_step_rms_norm_forward"), mutates_args=())
def ode_step_rms_norm_forward(
    x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, step_size: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new, y) for x and update of shape (..., H) and weight (H,)."""
    hidden_size = x.shape[-1]
    x2d, update2d = x.reshape(-1, hidden_size), update.reshape(-1, hidden_size)
    x_new = torch.empty_like(x2d)
    y = torch.empty(x2d.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block_h = triton.next_power_of_2(hidden_size)
    if x2d.shape[0]:
        _ode_step_rms_norm_forward_kernel[(x2d.shape[0],)](
            x2d, update2d, weight, x_new, y, hidden_size, step_size, eps, BLOCK_H=block_h, num_warps=_num_warps(block_h)
        )
    return x_new.view(x.shape), y.view(x.shape)


@ode_step_rms_norm_forward.register_fake
def _(x, update, weight, step_size, eps):
    return torch.empty_like(x), x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


def _setup_context(ctx, inputs, output):
    ctx.step_size, ctx.eps = inputs[3], inputs[4]
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2])


def _backward(ctx, grad_x_new, grad_y):
    x, update, weight = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, update, weight), ctx.needs_input_grad[:3])]
        outputs = ode_step_rms_norm_reference(*inputs, ctx.step_size, ctx.eps)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(outputs, wanted, (grad_x_new, grad_y), allow_unused=True))
    return *(next(grads) if t.requires_grad else None for t in inputs), None, None


ode_step_rms_norm_forward.register_autograd(_backward, setup_context=_setup_context)


def ode_step_rms_norm(x, update, weight, step_size: float, eps: float):
    """Fused `x_new = x + step_size * update; (x_new, rms_norm(x_new) * weight)`; inputs made contiguous.

    x and update of different dtypes are promoted to a common one first, as the eager formula does.
    """
    if x.shape != update.shape or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"need x and update of one shape (..., H) and weight (H,); got {tuple(x.shape)}, "
            f"{tuple(update.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype != update.dtype:
        # as eager `x + step_size * update` promotes (autocast: a bf16 update on a float32 residual stream), so
        # x_new and y get the eager dtypes; the cast is differentiable, gradients return in each input's dtype
        dtype = torch.promote_types(x.dtype, update.dtype)
        x, update = x.to(dtype), update.to(dtype)
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"the Triton kernel needs CUDA tensors, got {x.device}; on CPU set TRITON_INTERPRET=1")
    return ode_step_rms_norm_forward(x.contiguous(), update.contiguous(), weight.contiguous(), float(step_size), eps)
