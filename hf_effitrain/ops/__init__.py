"""Fused ops of hf_effitrain: pure tensor code (torch references) and the loaders of their Triton kernel
repositories (`kernels/`). Nothing here knows about transformers models: the glue that finds a model's LM head or
logit transform lives in `hf_effitrain.integrations`.
"""

from __future__ import annotations

from typing import Any

from hf_effitrain._moved import forward_moved_name

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

# names that lived here before the transformers glue moved to `hf_effitrain.integrations.lm_head`
_MOVED = {
    name: "hf_effitrain.integrations.lm_head"
    for name in (
        "fusable_lm_head",
        "fused_causal_lm_loss",
        "fused_loss_enabled",
        "linear_argmax",
        "lm_head_hidden_states",
        "logit_transform",
    )
}


def __getattr__(name: str) -> Any:
    return forward_moved_name(__name__, name, _MOVED)
