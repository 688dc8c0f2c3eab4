"""Decoding-strategy dispatch that travels with every exported checkpoint.

`EffiGenerationMixin` adds a `strategy=` argument to `generate`. It sits before the transformers model class in
the MRO (e.g. `class EffiLlamaForCausalLM(EffiGenerationMixin, LlamaForCausalLM)`), so a model reloaded with
`trust_remote_code=True` gains our strategies while `strategy=None` keeps stock `generate` untouched.

This module, like every file in `hub/`, imports only torch, transformers and single-dot siblings: that is what
`save_pretrained` copies next to the weights and what remote-code loading accepts.
"""

from __future__ import annotations

from typing import Any, Callable

from .generation_cascade import cascade_generate
from .generation_jacobi import jacobi_generate, tr_jacobi_generate
from .generation_speculative_cascade import speculative_cascade_generate

# name -> fn(model, inputs=None, generation_config=None, **generate_kwargs) returning what `model.generate` returns.
STRATEGIES: dict[str, Callable[..., Any]] = {
    "jacobi": jacobi_generate,
    "tr_jacobi": tr_jacobi_generate,
    "cascade": cascade_generate,
    "speculative_cascade": speculative_cascade_generate,
}
# The strategy name that asks for the model class's own `generate` even where the checkpoint names a default strategy
# (`strategy=None` falls back to that default): e.g. sampling from a checkpoint whose default is "tr_jacobi".
PLAIN = "plain"


def resolve_strategy(name: str) -> Callable[..., Any]:
    """Return the strategy function for `name`, or raise a ValueError that lists the valid names."""
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown decoding strategy {name!r}; valid strategies are {sorted(STRATEGIES)}, {PLAIN!r} (plain generate) "
            "or None (the generation config's strategy, else plain generate)."
        )
    return STRATEGIES[name]


def select_strategy(
    model, strategy: str | None = None, generation_config=None, custom_generate=None
) -> Callable[..., Any] | None:
    """The one rule every entry point follows to pick a decoding strategy: its function, or None for plain `generate`.

    In order: an explicit `strategy`; else the `strategy` entry of the passed `generation_config`; else that of the
    model's own `generation_config` (the checkpoint's default, e.g. `"cascade"` for a `CascadeForCausalLM`), just as
    transformers fills a passed config's unset fields from the model's. None (plain `generate`) when none is set,
    when the chosen name is `"plain"` (how a call opts out of a checkpoint's default strategy), or when a
    `custom_generate` is given (that call is the custom loop's: a strategy's own inner `generate`).

    Raises:
        ValueError: for an unknown strategy name, listing the valid ones.
    """
    if custom_generate is not None:
        return None
    if strategy is None:
        strategy = getattr(generation_config, "strategy", None)
    if strategy is None:
        strategy = getattr(getattr(model, "generation_config", None), "strategy", None)
    return None if strategy in (None, PLAIN) else resolve_strategy(strategy)


def generate(model, inputs=None, strategy: str | None = None, generation_config=None, **kwargs):
    """Decode with `strategy` on any causal LM of transformers (the package's public `hf_effitrain.generate`).

    Args:
        model (`PreTrainedModel`): any model with a language-modeling head and `GenerationMixin`.
        inputs (`torch.LongTensor` of shape `(batch, seq)`, *optional*): prompt ids.
        strategy (`str`, *optional*): one of `STRATEGIES`; `None` falls back to the passed generation config's
            `strategy` entry, then to the model's generation config's, then to plain `model.generate`
            (see `select_strategy`).
        generation_config (`GenerationConfig`, *optional*): as for `model.generate`.
    Returns:
        What `model.generate` returns: the sequences tensor, or a `GenerateOutput` with `return_dict_in_generate=True`.
    """
    chosen = select_strategy(model, strategy, generation_config, kwargs.get("custom_generate"))
    if chosen is None:
        return model.generate(inputs, generation_config=generation_config, **kwargs)
    return chosen(model, inputs, generation_config=generation_config, **kwargs)


class EffiGenerationMixin:
    """Adds `generate(..., strategy=...)` in front of a transformers `GenerationMixin` model (see `select_strategy`)."""

    def generate(self, inputs=None, generation_config=None, strategy: str | None = None, **kwargs):
        chosen = select_strategy(self, strategy, generation_config, kwargs.get("custom_generate"))
        if chosen is None:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        return chosen(self, inputs, generation_config=generation_config, **kwargs)
