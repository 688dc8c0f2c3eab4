"""effi-ode-step: fused scaled residual update + RMSNorm (Triton) for hf_effitrain's OdeSharedForCausalLM."""

from . import layers
from .op import ode_step_rms_norm, ode_step_rms_norm_forward, ode_step_rms_norm_reference

__all__ = ["layers", "ode_step_rms_norm", "ode_step_rms_norm_forward", "ode_step_rms_norm_reference"]
