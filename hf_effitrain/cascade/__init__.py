"""Old home of the cascade-aware training pieces, now `hf_effitrain.methods.cascade` (names forwarded with a
`FutureWarning`)."""

from __future__ import annotations

from typing import Any

from hf_effitrain._moved import forward_moved_name

_NEW_HOME = "hf_effitrain.methods.cascade"
_NAMES = (
    "CASES",
    "DEFAULT_PRESET",
    "LOSS_PRESETS",
    "METRICS",
    "CascadeLossWeights",
    "DecodedCurve",
    "DeferralCurve",
    "cascade_aware_loss",
    "decoded_curves",
    "deferral_curve",
    "forward_flops_per_token",
    "plot_decoded_curves",
    "plot_deferral_curves",
    "resolve_loss_weights",
    "summarize_curves",
    "token_cases",
)


def __getattr__(name: str) -> Any:
    return forward_moved_name(__name__, name, dict.fromkeys(_NAMES, _NEW_HOME))
