"""Entry point of the `custom_generate/` folder that `export_pretrained` writes into every checkpoint.

The export copies this file to `custom_generate/generate.py`, next to copies of `generation_effi.py` and the
siblings it imports, so that a STOCK model (loaded without remote code) can still use the package's strategies:

    model = LlamaForCausalLM.from_pretrained(path)
    model.generate(ids, custom_generate=path, trust_remote_code=True, strategy="tr_jacobi", max_new_tokens=64)

transformers reaches this function in two ways, and both shape its signature:
- `generate(custom_generate=path)` calls `generate(model=model, inputs=..., generation_config=..., <every other
  generate() argument, mostly None>, **kwargs)`;
- `from_pretrained(path, trust_remote_code=True)` binds `functools.partial(generate, model=model)` as the
  instance's `generate`, so `model.generate(ids)` arrives here as `generate(ids, model=model)`. `model` is
  therefore keyword-friendly and not the first positional parameter.

Like every file in `hub/`, this imports only single-dot siblings.
"""

from __future__ import annotations

from typing import Any

from .generation_effi import select_strategy

__all__ = ["generate"]


def _has_effi_dispatch(model) -> bool:
    # The model's own remote code (e.g. `EffiLlamaForCausalLM`) holds a separate copy of `generation_effi`, loaded
    # as another module; match the mixin by name so that one strategy table, the model's, serves both entry points.
    return any(cls.__name__ == "EffiGenerationMixin" for cls in type(model).__mro__)


def generate(*args: Any, model=None, strategy: str | None = None, **kwargs: Any):
    """Dispatch `model.generate` to a decoding strategy of the checkpoint (`strategy=None`: plain `generate`).

    Args:
        *args: the prompt ids (and any further positional `generate` arguments); when `model` is not given as a
            keyword, the first positional argument is the model.
        model (`PreTrainedModel`): the model to decode with.
        strategy (`str`, *optional*): a strategy name of `generation_effi.STRATEGIES`; `None` falls back to the
            passed generation config's `strategy` entry, then to the model's, then to the model class's own
            `generate` (`generation_effi.select_strategy`).
        **kwargs: `generate` arguments (`generation_config`, `max_new_tokens`, `attention_mask`, ...).
    Returns:
        What `model.generate` returns.
    Raises:
        ValueError: for an unknown strategy, listing the valid ones.
    """
    if model is None:
        if not args:
            raise TypeError("custom_generate's generate() needs the model, as `model=` or as its first argument.")
        model, args = args[0], args[1:]
    # `generate(custom_generate=...)` forwards all of its named arguments, unset ones as None; every one of them
    # defaults to None, so dropping them changes nothing and keeps strategies' signatures simple.
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    model_class_generate = type(model).generate  # never `model.generate`: it may be the partial bound to this function
    if _has_effi_dispatch(model):
        return model_class_generate(model, *args, strategy=strategy, **kwargs)
    chosen = select_strategy(model, strategy, kwargs.get("generation_config"), kwargs.get("custom_generate"))
    if chosen is None:
        return model_class_generate(model, *args, **kwargs)
    return chosen(model, *args, **kwargs)
