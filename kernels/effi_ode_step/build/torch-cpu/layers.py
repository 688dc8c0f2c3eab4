"""Kernel layer for `use_kernel_forward_from_hub("EffiOdeStepRMSNorm")` (hf_effitrain's `OdeStepRMSNorm`)."""

import torch

from .op import ode_step_rms_norm

__all__ = ["EffiOdeStepRMSNorm"]


class EffiOdeStepRMSNorm(torch.nn.Module):
    """Pure layer: `forward(hidden_states, update, step_size) -> (x_new, rms_norm(x_new) * weight)`.

    Host attributes (from the module whose forward it replaces): `weight` (H,) and `variance_epsilon`.
    """

    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, hidden_states, update, step_size: float):
        return ode_step_rms_norm(hidden_states, update, self.weight, step_size, self.variance_epsilon)
