"""Fused ops of hf_effitrain: torch references and the loaders of their Triton kernel repositories (`kernels/`)."""

from .kernel_loading import KernelLoadError, load_kernel_module, local_kernel_repo, set_kernel_source
from .linear_cross_entropy import (
    fused_linear_cross_entropy,
    linear_cross_entropy_naive,
    linear_cross_entropy_reference,
)
from .lm_head import (
    fusable_lm_head,
    fused_causal_lm_loss,
    fused_loss_enabled,
    linear_argmax,
    lm_head_hidden_states,
    logit_transform,
)

__all__ = [
    "KernelLoadError",
    "fusable_lm_head",
    "fused_causal_lm_loss",
    "fused_linear_cross_entropy",
    "fused_loss_enabled",
    "linear_argmax",
    "linear_cross_entropy_naive",
    "linear_cross_entropy_reference",
    "lm_head_hidden_states",
    "logit_transform",
    "load_kernel_module",
    "local_kernel_repo",
    "set_kernel_source",
]
