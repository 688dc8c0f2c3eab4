"""`PatchTrainingArguments`: `TrainingArguments` plus the three knobs of patch-level training (Shao et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real

from transformers import TrainingArguments

__all__ = ["PatchTrainingArguments", "validate_patch_options"]


def validate_patch_options(patch_size: int, patch_fraction: float) -> None:
    """Raise a `TypeError`/`ValueError` naming the bad value when K or lambda is not allowed."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, Integral):
        raise TypeError(f"patch_size must be an int >= 1, got {patch_size!r} ({type(patch_size).__name__}).")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1 (1 = plain token-level training), got {patch_size}.")
    if isinstance(patch_fraction, bool) or not isinstance(patch_fraction, Real):
        raise TypeError(f"patch_fraction must be a float in [0, 1], got {patch_fraction!r}.")
    if not 0.0 <= float(patch_fraction) <= 1.0:
        raise ValueError(f"patch_fraction must be in [0, 1] (the share of training tokens seen at patch level), got {patch_fraction}.")
    if patch_size == 1 and patch_fraction > 0:
        raise ValueError(
            f"patch_fraction={patch_fraction} > 0 needs patch_size >= 2: with patch_size=1 a patch is a token and "
            "there is no patch stage. Set patch_size (the paper uses 4) or patch_fraction=0."
        )


@dataclass
class PatchTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` for [`PatchTrainer`]: the first `patch_fraction` of the training tokens are consumed at patch
    level (K tokens averaged into one input position, the next K tokens predicted from it), the rest at token level,
    inside one `train()` call.

    The defaults (`patch_size=1`, `patch_fraction=0`) mean plain token-level training: `PatchTrainer` then behaves like
    the stock `Trainer`.

    Args:
        patch_size (`int`, *optional*, defaults to 1):
            K, the number of consecutive tokens averaged into one patch. 1 disables patch-level training.
        patch_fraction (`float`, *optional*, defaults to 0.0):
            lambda in [0, 1], the share of the token budget consumed at patch level. The budget is what the
            token-level run would consume: `max_steps` (or `num_train_epochs` passes over the data) x global batch x
            block size. K=4, lambda=2/3 costs 0.5x the compute of token-level training (lambda/K + 1 - lambda).
        patch_reset_optimizer (`bool`, *optional*, defaults to `True`):
            Restart the optimizer state and the learning-rate schedule (with its warmup) at the switch to token
            level, as the paper does; each stage then gets its own schedule over its own steps. `False` keeps one
            optimizer and one schedule over the whole run. No effect without a patch stage.
        use_fused_loss (`bool`, *optional*):
            Compute the training loss with `hf_effitrain.ops.fused_linear_cross_entropy`, which never materialises
            the (tokens, vocab) logits: the patch-level loss and, in the token stage, the causal-LM loss. `None`
            (default): on when training on CUDA (Triton kernel). `True`: always (on CPU its chunked torch
            reference). `False`: never. No effect when the LM head has a bias or the model soft-caps its logits.

    Example:

    >>> args = PatchTrainingArguments(output_dir="runs/p", patch_size=4, patch_fraction=2 / 3, max_steps=300)
    >>> args.patch_size, round(args.patch_fraction, 3)
    (4, 0.667)
    """

    patch_size: int = field(
        default=1,
        metadata={"help": "K, consecutive tokens averaged into one patch (1 = plain token-level training; paper: 4)."},
    )
    patch_fraction: float = field(
        default=0.0,
        metadata={"help": "lambda in [0, 1]: share of the token budget trained at patch level (paper: 2/3)."},
    )
    patch_reset_optimizer: bool = field(
        default=True,
        metadata={"help": "Restart optimizer state and LR schedule (with warmup) at the switch to token level, as the paper."},
    )
    use_fused_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Fused linear cross-entropy for the training loss (no (tokens, vocab) logits): unset = on when "
            "training on CUDA, true = always (on CPU its chunked torch reference), false = never."
        },
    )

    def __post_init__(self) -> None:
        validate_patch_options(self.patch_size, self.patch_fraction)
        super().__post_init__()
        if self.patch_training_enabled:
            by_epoch = [name for name in ("eval_strategy", "save_strategy", "logging_strategy") if getattr(self, name) == "epoch"]
            if by_epoch:
                raise ValueError(
                    f"{', '.join(f'{name}=epoch' for name in by_epoch)} is not supported with patch-level training "
                    f"(patch_size={self.patch_size}, patch_fraction={self.patch_fraction}): the run is one staged pass "
                    "whose steps do not follow epochs of the data, so 'epoch' would fire only at the end. Use 'steps' "
                    "with eval_steps / save_steps / logging_steps (they count real optimizer steps)."
                )

    @property
    def patch_training_enabled(self) -> bool:
        """Whether a patch stage runs at all (K >= 2 and lambda > 0)."""
        return self.patch_size > 1 and self.patch_fraction > 0
