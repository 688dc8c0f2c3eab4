"""Fused ops of hf_effitrain: torch references and the loaders of their Triton kernel repositories (`kernels/`)."""

from .kernel_loading import KernelLoadError, load_kernel_module, local_kernel_repo, set_kernel_source
from .linear_cross_entropy import (
    fused_linear_cross_entropy,
    linear_cross_entropy_naive,
    linear_cross_entropy_reference,
)

__all__ = [
    "KernelLoadError",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_naive",
    "linear_cross_entropy_reference",
    "load_kernel_module",
    "local_kernel_repo",
    "set_kernel_source",
]
