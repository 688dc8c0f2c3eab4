"""`PatchTrainingArguments`: `TrainingArguments` plus the knobs of patch-level training (Shao et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real

from transformers import TrainingArguments

from .schedule import EQUAL_POSITIONS, EQUAL_TOKENS

__all__ = [
    "EQUAL_POSITIONS",
    "EQUAL_TOKENS",
    "PATCH_BATCHINGS",
    "PatchTrainingArguments",
    "validate_patch_batching",
    "validate_patch_options",
]

PATCH_BATCHINGS = (EQUAL_TOKENS, EQUAL_POSITIONS)


def validate_patch_options(patch_size: int, patch_fraction: float) -> None:
    """Raise a `TypeError`/`ValueError` naming the bad value when K or lambda is not allowed."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, Integral):
        raise TypeError(f"patch_size must be an int >= 1, got {patch_size!r} ({type(patch_size).__name__}).")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1 (1 = plain token-level training), got {patch_size}.")
    if isinstance(patch_fraction, bool) or not isinstance(patch_fraction, Real):
        raise TypeError(f"patch_fraction must be a float in [0, 1], got {patch_fraction!r}.")
    if not 0.0 <= float(patch_fraction) <= 1.0:
        raise ValueError(
            f"patch_fraction must be in [0, 1] (the share of training tokens seen at patch level), got {patch_fraction}."
        )
    if patch_size == 1 and patch_fraction > 0:
        raise ValueError(
            f"patch_fraction={patch_fraction} > 0 needs patch_size >= 2: with patch_size=1 a patch is a token and "
            "there is no patch stage. Set patch_size (the paper uses 4) or patch_fraction=0."
        )


def validate_patch_batching(
    patch_batching: str, patch_size: int, per_device_train_batch_size: int, enabled: bool
) -> None:
    """Raise a `ValueError` naming the bad value when `patch_batching` is unknown or does not fit the batch size.

    Args:
        patch_batching (`str`): one of `PATCH_BATCHINGS`.
        patch_size (`int`): K.
        per_device_train_batch_size (`int`): sequences per device per token-stage micro-batch.
        enabled (`bool`): whether a patch stage runs (the batch-size condition only applies then).

    Raises:
        ValueError: for an unknown name, or `"equal_tokens"` with a per-device batch that is not a multiple of K.
    """
    if patch_batching not in PATCH_BATCHINGS:
        raise ValueError(f"patch_batching must be one of {list(PATCH_BATCHINGS)}, got {patch_batching!r}.")
    if enabled and patch_batching == EQUAL_TOKENS and per_device_train_batch_size % patch_size:
        raise ValueError(
            f"patch_batching='equal_tokens' needs per_device_train_batch_size ({per_device_train_batch_size}) to be a "
            f"multiple of patch_size ({patch_size}): a patch-stage micro-batch holds per_device_train_batch_size / "
            f"patch_size sequences of patch_size x block_size tokens. Use a per-device batch of "
            f"{patch_size}, {2 * patch_size}, ... or patch_batching='equal_positions'."
        )


@dataclass
class PatchTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` for [`PatchTrainer`]: the first `patch_fraction` of the training tokens are consumed at patch
    level (K tokens averaged into one input position, the next K tokens predicted from it), the rest at token level,
    inside one `train()` call.

    With the default `patch_batching="equal_tokens"` (the authors' recipe) every optimizer step consumes the same
    `global_batch x block_size` tokens in both stages, so `max_steps` counts the optimizer steps of the whole run and a
    patch-stage step processes 1/K of the positions of a token-stage step. The accumulation stays the same; a
    patch-stage micro-batch holds `per_device_train_batch_size / K` sequences of K x block_size tokens, i.e. the
    same tokens and 1/K of the positions of a token-stage micro-batch, so peak memory is set by the token stage and
    never grows (the authors instead keep the micro-batch's positions and divide the accumulation by K, which fills
    the device better but needs a per-stage accumulation the stock training loop does not have).

    The defaults (`patch_size=1`, `patch_fraction=0`) mean plain token-level training: `PatchTrainer` then behaves like
    the stock `Trainer`.

    Args:
        patch_size (`int`, *optional*, defaults to 1):
            K, the number of consecutive tokens averaged into one patch. 1 disables patch-level training.
        patch_fraction (`float`, *optional*, defaults to 0.0):
            lambda in [0, 1], the share of the token budget consumed at patch level. The budget is what the
            token-level run would consume: `max_steps` (or `num_train_epochs` passes over the data) x global batch x
            block size. K=4, lambda=2/3 costs 0.5x the compute of token-level training (lambda/K + 1 - lambda).
        patch_batching (`str`, *optional*, defaults to `"equal_tokens"`):
            `"equal_tokens"`: every optimizer step consumes `global_batch x block_size` tokens in both stages (the
            authors' batching; `max_steps` = patch steps + token steps; needs `per_device_train_batch_size` to be a
            multiple of K). `"equal_positions"`: a patch-stage step processes as many positions as a token-stage
            step, i.e. K times the tokens (`max_steps` is the token budget in token-level steps; the run takes
            `max_steps - (K - 1) x patch_steps` optimizer steps).
        patch_reset_optimizer (`bool`, *optional*, defaults to `True`):
            Restart the optimizer state and the learning-rate schedule (with its warmup) at the switch to token
            level, as the paper does: the patch stage's schedule decays to its minimum at the end of the patch stage
            and the token stage starts a new one over its own steps. `False` keeps one optimizer and one schedule
            over the whole run. No effect without a patch stage.
        warmup_steps (`float`):
            As in `TrainingArguments`; with a patch stage, `< 1` is a share of each schedule's steps (each stage's
            with `patch_reset_optimizer`), `>= 1` counts token-level steps' worth of tokens: with `"equal_tokens"`
            that is the same number of steps in each stage (the authors: 2000 in both), with `"equal_positions"`
            the patch stage warms up over `ceil(warmup_steps / K)` steps (the same tokens), not a K times larger share.
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
    patch_batching: str = field(
        default=EQUAL_TOKENS,
        metadata={
            "help": "equal_tokens (default, the authors' batching): every optimizer step consumes the same tokens in both "
            "stages, max_steps counts the steps of both stages, a patch-stage micro-batch holds "
            "per_device_train_batch_size / K sequences of K x block_size tokens (same tokens, 1/K of the positions: "
            "memory never above the token stage's). equal_positions: a patch step processes as many positions as a "
            "token step (K times the tokens; max_steps is the token budget in token-level steps).",
            "choices": list(PATCH_BATCHINGS),
        },
    )
    patch_reset_optimizer: bool = field(
        default=True,
        metadata={
            "help": "Restart optimizer state and LR schedule (with warmup) at the switch to token level, as the paper: "
            "the patch stage's schedule decays to its minimum at the switch, the token stage starts a new one."
        },
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
        validate_patch_batching(
            self.patch_batching, self.patch_size, self.per_device_train_batch_size, self.patch_training_enabled
        )
        super().__post_init__()
        if self.patch_training_enabled:
            by_epoch = [
                name
                for name in ("eval_strategy", "save_strategy", "logging_strategy")
                if getattr(self, name) == "epoch"
            ]
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
