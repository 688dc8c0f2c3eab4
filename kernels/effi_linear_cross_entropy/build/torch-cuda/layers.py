"""Pure layer wrapper of the fused loss, for code that maps layers to kernels (`kernels.kernelize`)."""

import torch

from .op import linear_cross_entropy

__all__ = ["EffiLinearCrossEntropyLoss"]


class EffiLinearCrossEntropyLoss(torch.nn.Module):
    """`forward(hidden (N, H), weight (V, H), targets (N, K), target_weights=None)` -> the fused loss.

    Host attributes read from the module it replaces: `ignore_index` and `reduction`.
    """

    ignore_index: int
    reduction: str

    def forward(self, hidden, weight, targets, target_weights=None):
        return linear_cross_entropy(
            hidden,
            weight,
            targets,
            target_weights,
            ignore_index=getattr(self, "ignore_index", -100),
            reduction=getattr(self, "reduction", "mean"),
        )
