"""Cascade-aware training loss (CAT, Wang et al. 2024): token cross-entropy weighted by who gets the token right.

Each target token falls in one of four cases, by whether the small model's and the large model's greedy
predictions equal it: both right, small only, large only, both wrong. The small model's cross-entropy on that token
is multiplied by the case's weight; an optional distillation term pulls the small model's temperature-softened
distribution towards the large model's. The paper's method section was not available to us: what is known is that
tokens neither model gets right are dropped (preset `"paper"`); every other choice is a knob, and the shipped
default is the preset that measured best in `scripts/bench_cascade.py` (see `DEFAULT_PRESET`).

The loss takes logits, or hidden states plus the LM-head weight: then (without distillation) it runs through
`hf_effitrain.ops.fused_linear_cross_entropy` and the (tokens, vocab) logits are never materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_effitrain.integrations.lm_head import linear_argmax
from hf_effitrain.ops import fused_linear_cross_entropy

CASES = ("both_right", "small_only", "large_only", "both_wrong")


@dataclass(frozen=True)
class CascadeLossWeights:
    """Per-case token weights and the distillation term of the cascade-aware loss.

    Args:
        both_right: weight of tokens that the small and the large model both predict correctly.
        small_only: tokens that only the small model predicts correctly.
        large_only: tokens that only the large model predicts correctly (the cascade can defer them).
        both_wrong: tokens that neither predicts correctly (deferring does not help; the paper drops them).
        kd_weight: weight of the KL divergence from the large model's softened distribution to the small model's.
        kd_temperature: softmax temperature of that term (the term is scaled by temperature**2, as in Hinton et al.).

    Raises:
        ValueError: a negative or non-finite weight, all four case weights zero, or a non-positive temperature.
    """

    both_right: float = 1.0
    small_only: float = 1.0
    large_only: float = 1.0
    both_wrong: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0

    def __post_init__(self):
        for name in (*CASES, "kd_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Cascade loss weight {name}={value!r} must be a finite number >= 0.")
        if all(getattr(self, name) == 0 for name in CASES):
            raise ValueError(
                "All four cascade loss case weights (both_right, small_only, large_only, both_wrong) are zero: "
                "no token would be trained. Give at least one case a positive weight."
            )
        if (
            not isinstance(self.kd_temperature, (int, float))
            or not math.isfinite(self.kd_temperature)
            or self.kd_temperature <= 0
        ):
            raise ValueError(f"kd_temperature={self.kd_temperature!r} must be a finite number > 0.")

    @property
    def case_weights(self) -> tuple[float, float, float, float]:
        return (self.both_right, self.small_only, self.large_only, self.both_wrong)

    @property
    def is_standard(self) -> bool:
        """True when the loss is plain cross-entropy: every case weighted 1 and no distillation."""
        return self.case_weights == (1.0, 1.0, 1.0, 1.0) and self.kd_weight == 0

    @property
    def needs_large_predictions(self) -> bool:
        """The large model's predictions matter only when the case weights differ from each other."""
        return len(set(self.case_weights)) > 1

    @property
    def needs_large_logits(self) -> bool:
        return self.kd_weight > 0


# Named variants. "standard" is the ordinary LM loss (the baseline); "paper" is the paper-aligned variant.
LOSS_PRESETS: dict[str, CascadeLossWeights] = {
    "standard": CascadeLossWeights(),
    "paper": CascadeLossWeights(both_wrong=0.0),
    "defer_aware": CascadeLossWeights(large_only=0.5, both_wrong=0.0),
    "paper_kd": CascadeLossWeights(both_wrong=0.0, kd_weight=0.5, kd_temperature=2.0),
}
# The preset with the largest area under the token-level deferral curve in scripts/bench_cascade.py, CPU size,
# seeds 0, 1 and 2 (scripts/results/cascade_cpu_small{,_seed1,_seed2}.json: +0.0016 / +0.0016 / +0.0051 over
# "standard"; "defer_aware" and "paper_kd" gained less or lost). A CPU-scale measurement; GPU-scale run pending.
DEFAULT_PRESET = "paper"


def resolve_loss_weights(preset: str | None = None, **overrides: float | None) -> CascadeLossWeights:
    """The weights of `preset` (default `DEFAULT_PRESET`) with any non-None `overrides` (field names of
    `CascadeLossWeights`) applied.

    Raises:
        ValueError: for an unknown preset or override name, or invalid weights.
    """
    preset = DEFAULT_PRESET if preset is None else preset
    if preset not in LOSS_PRESETS:
        raise ValueError(f"Unknown cascade loss preset {preset!r}; valid presets are {sorted(LOSS_PRESETS)}.")
    base = LOSS_PRESETS[preset]
    fields = {name: getattr(base, name) for name in (*CASES, "kd_weight", "kd_temperature")}
    for name, value in overrides.items():
        if name not in fields:
            raise ValueError(f"Unknown cascade loss setting {name!r}; valid settings are {sorted(fields)}.")
        if value is not None:
            fields[name] = float(value)
    return CascadeLossWeights(**fields)


def _shift_labels(labels: torch.LongTensor, ignore_index: int) -> torch.LongTensor:
    """Targets aligned with the logits positions (position t predicts token t+1), as transformers' causal LM loss."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def token_cases(
    small_predictions: torch.LongTensor, large_predictions: torch.LongTensor, targets: torch.LongTensor
) -> torch.LongTensor:
    """Index into `CASES` per token: 0 both right, 1 small only, 2 large only, 3 both wrong."""
    small_wrong = (small_predictions != targets).long()
    large_wrong = (large_predictions != targets).long()
    return 2 * small_wrong + large_wrong


def _fused_cascade_loss(
    hidden_states, lm_head_weight, labels, large_predictions, weights, num_items_in_batch, ignore_index
):
    """`cascade_aware_loss` without distillation, through the fused linear cross-entropy (no logits tensor)."""
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1]).to(lm_head_weight.dtype)
    targets = _shift_labels(labels, ignore_index).reshape(-1).to(hidden.device)
    if weights.needs_large_predictions:
        if large_predictions is None:
            raise ValueError("These cascade loss weights differ per case, so `large_predictions` is required.")
        cases = token_cases(
            linear_argmax(hidden, lm_head_weight), large_predictions.reshape(-1).to(hidden.device), targets
        )
        token_weight = torch.tensor(weights.case_weights, device=hidden.device)[cases]
    else:
        token_weight = torch.full(targets.shape, weights.both_right, device=hidden.device)
    valid = targets != ignore_index
    denominator = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(hidden.device)
    loss = fused_linear_cross_entropy(
        hidden, lm_head_weight, targets[:, None], token_weight[:, None], ignore_index=ignore_index, reduction="sum"
    )
    return loss / denominator


def cascade_aware_loss(
    logits: torch.Tensor | None,
    labels: torch.LongTensor,
    large_predictions: torch.LongTensor | None,
    weights: CascadeLossWeights,
    *,
    hidden_states: torch.Tensor | None = None,
    lm_head_weight: torch.Tensor | None = None,
    large_logits: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cascade-aware loss of the small model on a causal-LM batch.

    Args:
        logits (`torch.Tensor` of shape `(batch, seq, vocab)`, *optional*): the small model's logits; or pass
            `hidden_states` `(batch, seq, hidden)` and `lm_head_weight` `(vocab, hidden)` instead (without
            distillation the loss then runs through `fused_linear_cross_entropy`, never materialising the logits).
        labels (`torch.LongTensor` of shape `(batch, seq)`): unshifted labels, `ignore_index` where not trained
            (the same convention as `model(input_ids, labels=labels)`).
        large_predictions (`torch.LongTensor` of shape `(batch, seq)`, *optional*): the large model's greedy
            prediction at every position (the token it predicts next); needed unless all case weights are equal.
        weights (`CascadeLossWeights`): case weights and distillation settings.
        large_logits (`torch.Tensor` of shape `(batch, seq, vocab)`, *optional*): needed when `weights.kd_weight > 0`.
        num_items_in_batch (*optional*): divisor of the summed loss (the Trainer's count of trained tokens over the
            gradient-accumulation batch); default: the number of trained tokens in this batch.

    Returns:
        Scalar loss: (sum over trained tokens of case weight x CE + kd_weight x T^2 x KL) / number of trained tokens.
        Dropped tokens count in the divisor, so every kept token has the gradient scale of plain cross-entropy.
        With the `"standard"` weights this is exactly transformers' causal-LM loss (same reduction, bit for bit).
    """
    if logits is None:
        if hidden_states is None or lm_head_weight is None:
            raise ValueError("cascade_aware_loss needs `logits`, or both `hidden_states` and `lm_head_weight`.")
        if weights.kd_weight == 0:
            return _fused_cascade_loss(
                hidden_states, lm_head_weight, labels, large_predictions, weights, num_items_in_batch, ignore_index
            )
        logits = hidden_states @ lm_head_weight.t()
    vocab = logits.shape[-1]
    logits = logits.float().reshape(-1, vocab)
    targets = _shift_labels(labels, ignore_index).reshape(-1).to(logits.device)

    if not weights.needs_large_predictions and weights.kd_weight == 0:
        # All cases weighted alike: transformers' own reduction (sum / num_items_in_batch, or mean), then the scale.
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
        if num_items_in_batch is not None:
            loss = loss / (
                num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            )
        return loss if weights.both_right == 1.0 else loss * weights.both_right

    valid = targets != ignore_index
    denominator = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(logits.device)
    token_ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if weights.needs_large_predictions:
        if large_predictions is None:
            raise ValueError("These cascade loss weights differ per case, so `large_predictions` is required.")
        large_predictions = large_predictions.reshape(-1).to(logits.device)
        cases = token_cases(logits.argmax(-1), large_predictions, targets)
        token_weight = torch.tensor(weights.case_weights, device=logits.device, dtype=logits.dtype)[cases]
    else:
        token_weight = torch.full_like(token_ce, weights.both_right)
    loss = (token_ce * token_weight * valid).sum() / denominator
    if weights.kd_weight > 0:
        if large_logits is None:
            raise ValueError(f"kd_weight={weights.kd_weight} needs the large model's `large_logits`.")
        t = weights.kd_temperature
        teacher = torch.log_softmax(large_logits.float().reshape(-1, vocab) / t, dim=-1)
        student = torch.log_softmax(logits / t, dim=-1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
        loss = loss + weights.kd_weight * t * t * (kl * valid).sum() / denominator
    return loss


__all__ = [
    "CASES",
    "CascadeLossWeights",
    "DEFAULT_PRESET",
    "LOSS_PRESETS",
    "cascade_aware_loss",
    "resolve_loss_weights",
    "token_cases",
]
