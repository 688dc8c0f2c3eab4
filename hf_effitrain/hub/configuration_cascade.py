"""Configuration of a two-model cascade: a small causal LM that answers first and a large one it defers to.

The two members are stored as sub-configs (like `EncoderDecoderConfig` holds an encoder and a decoder), so a
reloaded checkpoint rebuilds each with `AutoModelForCausalLM.from_config` from its own stock `model_type`: the
members may be any causal-LM architecture of transformers, and they may differ from each other.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

DEFERRAL_LEVELS = ("sequence", "token")
DEFERRAL_RULES = ("chow_sum", "chow_average", "chow_quantile")
# Deferral rules of `strategy="speculative_cascade"` (Narasimhan et al. 2025) over the two next-token distributions.
SPECULATIVE_RULES = ("chow", "diff", "opt")
# Its GenerationConfig entries (a call's keyword argument wins), written into every cascade's generation config.
SPECULATIVE_DEFAULTS: dict[str, str | float | int] = {
    "speculative_rule": "opt",
    "speculative_alpha": 0.1,
    "cascade_draft_len": 4,
}


def check_deferral_settings(deferral: str, rule: str, threshold: float, quantile: float) -> None:
    """Raise a ValueError naming the bad setting and what is allowed.

    Every score the cascade thresholds (Chow-Sum / -Average / -Quantile of the small model's token log-probs at
    sequence level, the greedy token's log-prob at token level) lies in `[-inf, 0]`, so a threshold must be
    `<= 0`; `+inf` is also accepted and means "defer everything". NaN is never allowed.
    """
    if deferral not in DEFERRAL_LEVELS:
        raise ValueError(f"deferral must be one of {DEFERRAL_LEVELS}, got {deferral!r}.")
    if rule not in DEFERRAL_RULES:
        raise ValueError(f"rule must be one of {DEFERRAL_RULES}, got {rule!r}.")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
        raise ValueError(f"threshold must be a float, got {threshold!r}.")
    if threshold > 0 and not math.isinf(threshold):
        raise ValueError(
            f"threshold={threshold} is outside the range of the {rule!r} rule: scores are log-probabilities in "
            "[-inf, 0], so use a threshold <= 0, float('inf') to defer everything or float('-inf') to defer nothing."
        )
    if not isinstance(quantile, (int, float)) or isinstance(quantile, bool) or not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be a float in [0, 1] (0 = the least confident token), got {quantile!r}.")


def check_speculative_settings(rule: str, alpha: float, draft_len: int) -> None:
    """Raise a ValueError (TypeError for a non-int draft length) naming the bad speculative-cascade setting.

    `alpha` is a probability margin in `[0, 1]`: `"chow"` trusts the small model iff `max p_S >= 1 - alpha`,
    `"diff"` iff `max p_S >= max p_L - alpha`, `"opt"` iff `max p_S >= max p_L - alpha * TV(p_S, p_L)`.
    """
    if rule not in SPECULATIVE_RULES:
        raise ValueError(f"speculative_rule must be one of {SPECULATIVE_RULES}, got {rule!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"speculative_alpha must be a float in [0, 1], got {alpha!r}.")
    if isinstance(draft_len, bool) or not isinstance(draft_len, int):
        raise TypeError(f"cascade_draft_len must be an int, got {draft_len!r} ({type(draft_len).__name__}).")
    if draft_len < 1:
        raise ValueError(
            f"cascade_draft_len must be a positive int (small-model drafts per large forward), got {draft_len}."
        )


def add_speculative_defaults(generation_config):
    """Write the missing `SPECULATIVE_DEFAULTS` entries into `generation_config` (saved in generation_config.json)."""
    for name, value in SPECULATIVE_DEFAULTS.items():
        if getattr(generation_config, name, None) is None:
            setattr(generation_config, name, value)
    return generation_config


class CascadeConfig(PreTrainedConfig):
    r"""
    Configuration of [`CascadeForCausalLM`]: the two member configs and the deferral rule.

    Args:
        small (`PreTrainedConfig` or `dict`, *optional*):
            Config of the small (first, cheap) model; any causal-LM config of transformers.
        large (`PreTrainedConfig` or `dict`, *optional*):
            Config of the large model the cascade defers to; must share the small model's vocabulary.
        deferral (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"`: the small model answers, and the whole answer is redone by the large model when its score
            is below `threshold`. `"token"`: per generated token, the large model produces the token whenever the
            small model's log-prob of its own greedy token is below `threshold`.
        rule (`str`, *optional*, defaults to `"chow_average"`):
            Sequence score over the small model's token log-probs (Gupta et al. 2024): `"chow_sum"` (sum; favours
            short answers), `"chow_average"` (mean) or `"chow_quantile"` (the `quantile`-quantile).
        threshold (`float`, *optional*, defaults to `-1.0`):
            Defer when the score is below it. Must be `<= 0` or `+inf`; `+inf` defers everything, `-inf` nothing.
        quantile (`float`, *optional*, defaults to `0.0`):
            Quantile used by `"chow_quantile"`; 0 is the least confident token of the answer.

    ```python
    >>> config = CascadeConfig(small=LlamaConfig(hidden_size=64), large=LlamaConfig(hidden_size=256), rule="chow_sum")
    >>> config.small.model_type
    'llama'
    ```"""

    model_type = "effi_cascade"  # namespaced: a checkpoint saved as "cascade" still loads (see hf_effitrain.registry)
    sub_configs_defaults = {
        "small": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "large": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    small: PreTrainedConfig | dict | None = None
    large: PreTrainedConfig | dict | None = None
    deferral: str = "sequence"
    rule: str = "chow_average"
    threshold: float = -1.0
    quantile: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_deferral_settings(self.deferral, self.rule, float(self.threshold), float(self.quantile))
        self.threshold = float(self.threshold)
        self.quantile = float(self.quantile)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The small model's config: the cascade reads and writes tokens through it (vocabulary, cache layout)."""
        return self.small


# `save_pretrained` records the class in `auto_map`, so a checkpoint loads with `trust_remote_code=True`.
CascadeConfig.register_for_auto_class()

__all__ = [
    "CascadeConfig",
    "DEFERRAL_LEVELS",
    "DEFERRAL_RULES",
    "SPECULATIVE_DEFAULTS",
    "SPECULATIVE_RULES",
    "add_speculative_defaults",
    "check_deferral_settings",
    "check_speculative_settings",
]
