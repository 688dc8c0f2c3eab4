"""`TrainingArguments` for cascade-aware training of a cascade's small model (see `CascadeAwareTrainer`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .loss import DEFAULT_PRESET, LOSS_PRESETS, CascadeLossWeights, resolve_loss_weights


@dataclass
class CascadeAwareTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] plus the cascade-aware loss: a preset and optional per-case overrides.

    Args:
        cascade_preset (`str`, *optional*, defaults to `DEFAULT_PRESET`):
            `"standard"` (plain cross-entropy, the baseline), `"paper"` (drop tokens neither model predicts),
            `"defer_aware"` (also halve tokens only the large model predicts), `"paper_kd"` (`"paper"` plus
            distillation). The default is the preset that measured best in `scripts/bench_cascade.py`.
        weight_both_right, weight_small_only, weight_large_only, weight_both_wrong (`float`, *optional*):
            Override the preset's weight of each token case (small / large greedy prediction right or wrong).
        kd_weight, kd_temperature (`float`, *optional*):
            Override the preset's distillation term towards the large model's softened distribution.
        precompute_large_predictions (`bool`, *optional*, defaults to `False`):
            Compute the large model's greedy predictions once with `datasets.map` (cached with the dataset) instead
            of running it on every batch; saves the large forward over several epochs. Each row's predictions are
            placed on the batch's attended positions (its `attention_mask`), whatever side the collator pads on. Not
            usable with distillation, which needs the large model's full distribution.
        large_batch_size (`int`, *optional*, defaults to 16):
            Batch size of that precomputation.
        use_fused_loss (`bool`, *optional*):
            Compute the training loss with `hf_effitrain.ops.fused_linear_cross_entropy` from the small model's
            final hidden states, never materialising its (tokens, vocab) logits. `None` (default): on when training
            on CUDA (Triton kernel). `True`: always (on CPU its chunked torch reference). `False`: never. No effect
            with distillation (`kd_weight > 0` needs the full distribution), label smoothing, a custom loss, an LM
            head with a bias or logit soft-capping.
    """

    cascade_preset: str = field(
        default=DEFAULT_PRESET, metadata={"help": f"Loss preset: one of {sorted(LOSS_PRESETS)}."}
    )
    weight_both_right: float | None = field(
        default=None, metadata={"help": "Weight of tokens both models predict (overrides the preset)."}
    )
    weight_small_only: float | None = field(
        default=None, metadata={"help": "Weight of tokens only the small model predicts."}
    )
    weight_large_only: float | None = field(
        default=None, metadata={"help": "Weight of tokens only the large model predicts."}
    )
    weight_both_wrong: float | None = field(default=None, metadata={"help": "Weight of tokens neither model predicts."})
    kd_weight: float | None = field(
        default=None, metadata={"help": "Weight of the distillation (KL) term towards the large model."}
    )
    kd_temperature: float | None = field(default=None, metadata={"help": "Temperature of the distillation term."})
    precompute_large_predictions: bool = field(
        default=False,
        metadata={
            "help": "Cache the large model's greedy predictions with datasets.map instead of computing them per batch."
        },
    )
    large_batch_size: int = field(default=16, metadata={"help": "Batch size of the large-model precomputation."})
    use_fused_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Fused linear cross-entropy for the training loss (no (tokens, vocab) logits): unset = on when "
            "training on CUDA, true = always (on CPU its chunked torch reference), false = never."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        weights = self.cascade_loss_weights  # validates preset and weights
        if self.precompute_large_predictions and weights.needs_large_logits:
            raise ValueError(
                f"precompute_large_predictions caches only greedy predictions, but kd_weight={weights.kd_weight} needs "
                "the large model's full distribution on every batch; set kd_weight=0 or precompute_large_predictions=False."
            )
        if self.large_batch_size < 1:
            raise ValueError(f"large_batch_size must be >= 1, got {self.large_batch_size}.")

    @property
    def cascade_loss_weights(self) -> CascadeLossWeights:
        return resolve_loss_weights(
            self.cascade_preset,
            both_right=self.weight_both_right,
            small_only=self.weight_small_only,
            large_only=self.weight_large_only,
            both_wrong=self.weight_both_wrong,
            kd_weight=self.kd_weight,
            kd_temperature=self.kd_temperature,
        )


__all__ = ["CascadeAwareTrainingArguments"]
