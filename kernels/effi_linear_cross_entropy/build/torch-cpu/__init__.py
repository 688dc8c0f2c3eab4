"""effi-linear-cross-entropy: fused LM head + multi-target cross-entropy (Triton), for hf_effitrain."""

from .op import (
    linear_cross_entropy,
    linear_cross_entropy_backward,
    linear_cross_entropy_forward,
    linear_cross_entropy_losses,
)

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_backward",
    "linear_cross_entropy_forward",
    "linear_cross_entropy_losses",
]
