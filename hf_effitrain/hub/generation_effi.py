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

# name -> fn(model, inputs=None, generation_config=None, **generate_kwargs) returning what `model.generate` returns.
STRATEGIES: dict[str, Callable[..., Any]] = {
    "jacobi": jacobi_generate,
    "tr_jacobi": tr_jacobi_generate,
    "cascade": cascade_generate,
}


def resolve_strategy(name: str) -> Callable[..., Any]:
    """Return the strategy function for `name`, or raise a ValueError that lists the valid names."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown decoding strategy {name!r}; valid strategies are {sorted(STRATEGIES)} or None (plain generate).")
    return STRATEGIES[name]


def generate(model, inputs=None, strategy: str | None = None, generation_config=None, **kwargs):
    """Decode with `strategy` on any causal LM of transformers (the package's public `hf_effitrain.generate`).

    Args:
        model (`PreTrainedModel`): any model with a language-modeling head and `GenerationMixin`.
        inputs (`torch.LongTensor` of shape `(batch, seq)`, *optional*): prompt ids.
        strategy (`str`, *optional*): one of `STRATEGIES`; `None` falls back to the generation config's
            `strategy` entry, then to plain `model.generate`.
        generation_config (`GenerationConfig`, *optional*): as for `model.generate`.
    Returns:
        What `model.generate` returns: the sequences tensor, or a `GenerateOutput` with `return_dict_in_generate=True`.
    """
    if strategy is None:
        config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
        strategy = getattr(config, "strategy", None)
    if strategy is None:
        return model.generate(inputs, generation_config=generation_config, **kwargs)
    return resolve_strategy(strategy)(model, inputs, generation_config=generation_config, **kwargs)


class EffiGenerationMixin:
    """Adds `generate(..., strategy=...)` in front of a transformers `GenerationMixin` model."""

    def generate(self, inputs=None, generation_config=None, strategy: str | None = None, **kwargs):
        if strategy is None:
            config = generation_config if generation_config is not None else getattr(self, "generation_config", None)
            strategy = getattr(config, "strategy", None)
        if strategy is None or kwargs.get("custom_generate") is not None:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        return resolve_strategy(strategy)(self, inputs, generation_config=generation_config, **kwargs)
