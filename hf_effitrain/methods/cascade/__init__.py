"""Cascade-aware training and evaluation: the CAT loss, deferral curves and their plots.

The model (`CascadeForCausalLM`) and its decoding live in `hf_effitrain.hub` (they ship inside checkpoints).
"""

from .config import CascadeAwareTrainingArguments
from .curves import METRICS, DeferralCurve, deferral_curve, forward_flops_per_token, summarize_curves
from .decoding_curves import DecodedCurve, decoded_curves, plot_decoded_curves
from .job import run_cascade_eval, run_cascade_train
from .loss import (
    CASES,
    DEFAULT_PRESET,
    LOSS_PRESETS,
    CascadeLossWeights,
    cascade_aware_loss,
    resolve_loss_weights,
    token_cases,
)
from .plotting import plot_deferral_curves
from .trainer import CascadeAwareTrainer

__all__ = [
    "CASES",
    "CascadeAwareTrainer",
    "CascadeAwareTrainingArguments",
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
    "run_cascade_eval",
    "run_cascade_train",
    "summarize_curves",
    "token_cases",
]
