"""Linear + multi-target cross-entropy: the LM head and the loss in one call, without the (N, V) logits.

`fused_linear_cross_entropy` is the single entry point used by the trainers. It scores one row of logits
`hidden[n] @ weight.T` against K targets `targets[n, :]` (K=1: the ordinary causal-LM loss; K>1: the patch-level
loss; per-target weights: the cascade-aware loss). On CUDA it runs the Triton kernel from the
`effi_linear_cross_entropy` kernel repository (loaded through `kernels`); elsewhere, or when that kernel cannot be
loaded, it runs the chunked torch reference below and logs once why.

Reduction, exactly (`valid[n, k] = targets[n, k] != ignore_index`, `w` = `target_weights` or ones,
`ce[n, k] = logsumexp(logits[n]) - logits[n, targets[n, k]]`, computed in float32):

- `"none"`: the (N, K) tensor `w * ce`, 0 where the target is ignored.
- `"sum"`: `sum_{n,k} valid * w * ce`.
- `"mean"`: `(1/K) * sum_k [ sum_n valid * w * ce / max(1, count_k) ]` with `count_k = sum_n valid[n, k]`.
  That is the mean over target columns of each column's mean over its non-ignored rows. Weights scale the loss
  terms but do NOT enter the denominator; to drop a target from the mean, set it to `ignore_index`. Hence:
  K=1 is the stock causal-LM cross-entropy (sum over non-ignored tokens / their number); K>1 is the patch-level
  loss `(1/K) sum_k mean_n CE` exactly as the official code (one `nll_loss(mean)` per offset), also with padding;
  with weights, a zero weight removes a token's gradient without changing the scale of the others (the
  cascade-aware loss keeps the stock loss scale). When no target is ignored this equals
  `sum / (N * K)`. A column with no valid target contributes 0 (where `nll_loss` would give nan).

`target_weights` are constants: no gradient flows into them. Under `torch.autocast` the call runs with autocast
disabled: the inputs keep their dtypes and the math stays float32 (the result is float32 as without autocast).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils import logging as hf_logging

from .kernel_loading import KernelLoadError, load_kernel_module

__all__ = [
    "REDUCTIONS",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_naive",
    "linear_cross_entropy_reference",
    "target_coefficients",
    "validate_linear_cross_entropy_inputs",
]

# transformers' logger: `info_once` / `warning_once` report each fallback reason once per process
logger = hf_logging.get_logger(__name__)

REDUCTIONS = ("mean", "sum", "none")
KERNEL_NAME = "effi_linear_cross_entropy"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_CHUNK_LOGITS = 2**22  # 16 MiB of float32 logits per chunk at least


def validate_linear_cross_entropy_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_weights: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    check_target_range: bool = True,
) -> None:
    """Raise a ValueError/TypeError naming the bad argument; see `fused_linear_cross_entropy` for the contract."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (V, H) with H={hidden.shape[1]} matching hidden, got shape {tuple(weight.shape)}"
        )
    if targets.dim() != 2 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be (N, K) with N={hidden.shape[0]}, got shape {tuple(targets.shape)}")
    if targets.shape[1] < 1:
        raise ValueError("targets must have at least one column (K >= 1)")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 (or int32) tensor, got {targets.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be one of {_FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if target_weights is not None and target_weights.shape != targets.shape:
        raise ValueError(
            f"target_weights must have the shape of targets {tuple(targets.shape)}, got {tuple(target_weights.shape)}"
        )
    if target_weights is not None and not target_weights.is_floating_point():
        raise TypeError(f"target_weights must be a floating tensor, got {target_weights.dtype}")
    for name, tensor in (("weight", weight), ("targets", targets), ("target_weights", target_weights)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    vocab_size = weight.shape[0]
    if 0 <= ignore_index < vocab_size:
        raise ValueError(
            f"ignore_index={ignore_index} is a valid class id in [0, {vocab_size}); use a value outside the "
            "vocabulary (the usual -100) so no real token is silently dropped"
        )
    if check_target_range and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
        if bool(bad.any()):
            example = targets[bad][0].item()
            raise ValueError(
                f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {example}"
            )


def target_coefficients(
    targets: torch.Tensor, target_weights: torch.Tensor | None, ignore_index: int, reduction: str
) -> torch.Tensor:
    """(N, K) float32 factor of each per-target CE in the reduced loss (0 for ignored targets).

    For `"mean"` it folds in the per-column denominator `K * max(1, count_k)` (see the module docstring).
    """
    valid = targets != ignore_index
    weights = torch.ones_like(targets, dtype=torch.float32) if target_weights is None else target_weights.float()
    coeffs = torch.where(valid, weights.detach(), torch.zeros((), dtype=torch.float32, device=targets.device))
    if reduction == "mean":
        count = valid.sum(dim=0).clamp_min(1).to(torch.float32)  # (K,)
        coeffs = coeffs / (count * targets.shape[1])
    return coeffs


def default_chunk_size(num_rows: int, vocab_size: int, hidden_size: int) -> int:
    """Rows per chunk so that a chunk's (rows, V) logits take about as much memory as the (N, H) hidden states.

    Liger-Kernel's rule (`inc_factor = ceil(V / H)`, `chunk = next_pow2(ceil(N / inc_factor))`), with a floor of
    `_MIN_CHUNK_LOGITS` logits per chunk: on CPU, smaller chunks cost more in per-op overhead than they save
    (N=1024, H=256, V=32768, one shared CPU core: 32-row chunks 4.3 s, 128-row chunks 3.3 s per forward+backward).
    """
    if num_rows == 0:
        return 1
    inc_factor = max(1, math.ceil(vocab_size / hidden_size))
    rows = max(math.ceil(num_rows / inc_factor), math.ceil(_MIN_CHUNK_LOGITS / vocab_size))
    return min(num_rows, 1 << (rows - 1).bit_length())


def _chunk_logits(hidden: torch.Tensor, weight32: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Float32 logits (n, V) of a chunk of rows, their logsumexp (n, 1), and the per-target CE (n, K), 0 if ignored."""
    logits = F.linear(hidden.float(), weight32)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    ce = torch.where(valid, lse - logits.gather(1, safe_targets), torch.zeros((), device=logits.device))
    return logits, lse, safe_targets, ce


def _chunk_target_ce(hidden: torch.Tensor, weight32: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    return _chunk_logits(hidden, weight32, targets, ignore_index)[3]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """`sum(coeffs * ce)` with its gradients computed chunk by chunk in the forward (Liger's scheme, in torch).

    Three matmuls per chunk and one float32 `grad_weight` accumulator, where checkpointing would take four and an
    autograd sum of one (V, H) gradient per chunk: the backward only rescales by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, coeffs, ignore_index: int, chunk: int):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        weight32 = weight.float()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight32) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits, lse, safe_targets, ce = _chunk_logits(hidden[rows], weight32, targets[rows], ignore_index)
            total += (ce * coeffs[rows]).sum()
            # d total / d logits = (sum_k c_k) * softmax - sum_k c_k * onehot(t_k), built in place of the logits
            grad_logits = logits.sub_(lse).exp_().mul_(coeffs[rows].sum(1, keepdim=True))
            grad_logits.scatter_add_(1, safe_targets, -coeffs[rows])
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight32
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden[rows].float())
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Chunked torch reference of `fused_linear_cross_entropy` (the CPU path); inputs are assumed validated.

    Rows are processed `chunk_size` at a time (default: `default_chunk_size`), so no more than one chunk's
    (rows, V) float32 logits ever exist: for `"mean"`/`"sum"` the gradients are computed in the forward
    (`_ChunkedLinearCrossEntropy`), for `"none"` each chunk is activation-checkpointed. The per-row math is the
    naive one, in float32, so it matches `linear_cross_entropy_naive` up to summation order.
    """
    num_rows = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(num_rows, weight.shape[0], weight.shape[1])
    coeffs = target_coefficients(targets, target_weights, ignore_index, "sum" if reduction == "none" else reduction)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if needs_grad and reduction != "none":
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, coeffs, ignore_index, chunk)
    weight32 = weight.float()
    pieces = []
    for start in range(0, num_rows, chunk):
        args = (hidden[start : start + chunk], weight32, targets[start : start + chunk], ignore_index)
        # checkpointed: the backward recomputes one chunk's logits at a time instead of keeping them all
        if needs_grad:
            pieces.append(checkpoint(_chunk_target_ce, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_target_ce(*args))
    if not pieces:  # N = 0: an empty (0, K), still connected to hidden and weight when they need gradients
        ce = hidden.new_zeros((0, targets.shape[1]), dtype=torch.float32)
        if needs_grad:
            ce = ce + (hidden.float().sum() + weight.float().sum()) * 0
        return ce
    ce = torch.cat(pieces)
    return ce * coeffs if reduction == "none" else (ce * coeffs).sum()


def linear_cross_entropy_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The textbook computation (full float32 logits, one `F.cross_entropy` per target column): the test oracle."""
    logits = hidden.float() @ weight.float().T
    num_targets = targets.shape[1]
    weights = torch.ones_like(targets, dtype=torch.float32) if target_weights is None else target_weights.float()
    columns = []
    for k in range(num_targets):
        ce = F.cross_entropy(logits, targets[:, k].long(), ignore_index=ignore_index, reduction="none")
        columns.append(torch.where(targets[:, k] != ignore_index, ce * weights[:, k].detach(), torch.zeros_like(ce)))
    losses = torch.stack(columns, dim=1)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    counts = (targets != ignore_index).sum(dim=0).clamp_min(1)
    return sum(losses[:, k].sum() / counts[k] for k in range(num_targets)) / num_targets


def _kernel_unavailable_reason(hidden: torch.Tensor, required: bool) -> str | None:
    """Why the Triton kernel does not run for `hidden` (None: it does). `required`: the caller asked for it."""
    if not required and os.environ.get("DISABLE_KERNEL_MAPPING", "0") not in ("", "0"):
        return "DISABLE_KERNEL_MAPPING is set"
    if hidden.device.type == "cuda" or (required and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return (
        f"the inputs are on {hidden.device.type}; the Triton kernel runs on CUDA "
        "(on CPU only with use_kernel=True under TRITON_INTERPRET=1, for tests)"
    )


def _load_kernel_or_log(hidden: torch.Tensor, required: bool):
    """The kernel module, or None after logging once why not; with `required`, raise instead of falling back."""
    reason = _kernel_unavailable_reason(hidden, required)
    if reason is not None:
        if required:
            raise ValueError(f"use_kernel=True but the fused kernel cannot run: {reason}")
        logger.info_once("fused_linear_cross_entropy: using the chunked torch reference because %s", reason)
        return None
    try:
        return load_kernel_module(KERNEL_NAME)
    except KernelLoadError as error:
        if required:
            raise
        logger.warning_once("fused_linear_cross_entropy: using the chunked torch reference because %s", str(error))
        return None


def _autocast_disabled(device_type: str):
    """`torch.autocast(device_type, enabled=False)`, or nothing for a device type without autocast (e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against K targets per row, without materialising the (N, V) logits.

    Args:
        hidden (`torch.Tensor` of shape `(N, H)`):
            Final hidden states (already flattened over batch and time), float32 / bfloat16 / float16.
        weight (`torch.Tensor` of shape `(V, H)`):
            LM-head weight, same dtype and device as `hidden`.
        targets (`torch.LongTensor` of shape `(N, K)`):
            Target ids in `[0, V)` or `ignore_index`. K=1: next-token loss; K>1: patch-level loss.
        target_weights (`torch.Tensor` of shape `(N, K)`, *optional*):
            Per-target loss weights (constants, no gradient); see the module docstring for how they enter `"mean"`.
        ignore_index (`int`, *optional*, defaults to -100):
            Targets equal to it contribute nothing and are not counted. Must not be a class id in `[0, V)`.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"`, `"sum"` or `"none"` (returns the (N, K) weighted per-target losses), defined exactly in the
            module docstring.
        use_kernel (`bool`, *optional*):
            `None`: the Triton kernel on CUDA (unless `DISABLE_KERNEL_MAPPING=1`), the chunked torch reference
            elsewhere or when the kernel repo does not load (one log line says why). `True`: require the kernel (an
            error if it cannot run or load; on CPU it runs only under `TRITON_INTERPRET=1`, which is for tests).
            `False`: always the torch reference.

    Returns:
        `torch.Tensor`: a float32 scalar, or (N, K) float32 for `reduction="none"` (also under `torch.autocast`,
        which is disabled inside the call).
    """
    validate_linear_cross_entropy_inputs(hidden, weight, targets, target_weights, ignore_index, reduction)
    kernel = None if use_kernel is False else _load_kernel_or_log(hidden, required=bool(use_kernel))
    # the op sets its own precision (float32 math on inputs of their own dtype): autocast would change the logits'
    # dtype under it (bf16 logits for "none", dtype clashes in the in-place gradient work for "mean"/"sum")
    with _autocast_disabled(hidden.device.type):
        if kernel is None:
            return linear_cross_entropy_reference(hidden, weight, targets, target_weights, ignore_index, reduction)
        return kernel.linear_cross_entropy(
            hidden, weight, targets, target_weights, ignore_index=ignore_index, reduction=reduction
        )
