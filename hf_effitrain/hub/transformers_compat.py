"""The few transformers internals that checkpoint code relies on, each feature-detected in one place.

Code in `hub/` ships inside checkpoints and runs on whatever transformers the checkpoint's user has installed, not on
the version the package was tested with. Everything version-dependent goes through this module:

- the KV cache's name: `past_key_values` up to transformers 5.23, `cache` from 5.24 on (model inputs, model outputs,
  `generate`'s model kwargs and the mask helpers), detected from signatures and output fields, not from the version;
- the private `GenerationMixin` helpers the decoding strategies reuse so that their prefill equals greedy `generate`'s
  (`_prefill`, `_update_model_kwargs_for_generation`, `_supports_logits_to_keep`, `_pad_token_tensor`).

Where a future release removes or reshapes one of them, the call fails with `UnsupportedTransformersError`, which
names the missing piece, the installed version and the versions this code was tested with.

This file imports only the standard library, torch and transformers (it ships inside checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import torch
import transformers
from transformers.integrations import use_kernel_forward_from_hub
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

__all__ = [
    "TESTED_TRANSFORMERS",
    "UnsupportedTransformersError",
    "cache_from_model_kwargs",
    "merge_cache_arguments",
    "cache_output_field",
    "cache_param_name",
    "keep_stock_weight_loading",
    "kernel_layer",
    "model_cache_kwarg",
    "output_cache",
    "pad_token_tensor",
    "prefill",
    "slice_logits_to_keep",
    "supports_logits_to_keep",
    "update_model_kwargs_after_prefill",
]

logger = logging.get_logger(__name__)

# The transformers releases this checkpoint code was tested on (oldest and newest); named in every compatibility error.
TESTED_TRANSFORMERS = ("5.20.2", "5.24.0")
_CACHE_NAMES = ("cache", "past_key_values")


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers lacks (or changed) an internal that this checkpoint's decoding code needs."""


def unsupported(what: str) -> UnsupportedTransformersError:
    """The error to raise when `what` is missing from the installed transformers."""
    return UnsupportedTransformersError(
        f"{what} is not available in the installed transformers {transformers.__version__}; this checkpoint's decoding "
        f"code was tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}. Install a version in "
        "that range, or use strategy='plain' (stock `generate`)."
    )


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_param_name(fn: Callable) -> str:
    """`"cache"` if `fn` (a forward, `create_causal_mask`, ...) takes the cache under its new name, else `"past_key_values"`.

    transformers 5.24 renamed the argument and keeps the old name as a deprecated alias on its own functions; a
    function that takes neither (only `**kwargs`) gets the old name, which every release's `**kwargs` path accepts.
    """
    return "cache" if "cache" in _parameters(fn) else "past_key_values"


def model_cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which `model.forward` takes its KV cache (see `cache_param_name`)."""
    return cache_param_name(type(model).forward)


@functools.lru_cache(maxsize=None)
def cache_output_field(output_class: type = CausalLMOutputWithPast) -> str:
    """Name of the cache field of a transformers output dataclass (`cache` from 5.24 on, else `past_key_values`)."""
    fields = {field.name for field in dataclasses.fields(output_class)}
    for name in _CACHE_NAMES:
        if name in fields:
            return name
    raise unsupported(f"A cache field on `{output_class.__name__}`")


def merge_cache_arguments(past_key_values: Any, cache: Any) -> Any:
    """The one KV cache of a forward that accepts both spellings (`past_key_values`, and `cache` from 5.24 on)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("Pass the KV cache once: got both `past_key_values` and `cache` (they are the same argument).")
    return cache if cache is not None else past_key_values


def output_cache(outputs: Any) -> Any:
    """The cache a model returned, whichever name its output class gives it (None when it returned none)."""
    for name in _CACHE_NAMES:
        value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def cache_from_model_kwargs(model_kwargs: dict[str, Any]) -> Any:
    """The cache `generate` prepared in the model kwargs it hands to a decoding loop (None when there is none)."""
    for name in _CACHE_NAMES:
        if model_kwargs.get(name) is not None:
            return model_kwargs[name]
    return None


def _require(model: Any, name: str) -> Callable:
    method = getattr(model, name, None)
    if not callable(method):
        raise unsupported(f"`GenerationMixin.{name}`")
    return method


def prefill(model, input_ids: torch.LongTensor, generation_config, model_kwargs: dict[str, Any]):
    """Run `generate`'s own prefill forward (so the first token, the cache and the masks equal greedy decoding's)."""
    return _require(model, "_prefill")(input_ids, generation_config, model_kwargs)


def update_model_kwargs_after_prefill(model, outputs, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate`'s own model-kwargs update after a forward (cache, attention mask, position ids)."""
    return _require(model, "_update_model_kwargs_for_generation")(outputs, model_kwargs)


def supports_logits_to_keep(model) -> bool:
    """Whether `model.forward` can compute only the last positions' logits (`logits_to_keep`)."""
    method = getattr(model, "_supports_logits_to_keep", None)
    if callable(method):
        return bool(method())
    return "logits_to_keep" in _parameters(type(model).forward)


def pad_token_tensor(generation_config, device: torch.device) -> torch.Tensor | None:
    """The pad token `generate` resolved for this call (falls back to the config's `pad_token_id`, then its EOS)."""
    if hasattr(generation_config, "_pad_token_tensor"):
        return generation_config._pad_token_tensor
    logger.warning_once(
        "generate did not resolve `_pad_token_tensor` on the generation config; using its pad / EOS token ids "
        f"(transformers {transformers.__version__})."
    )
    pad = generation_config.pad_token_id
    if pad is None:
        eos = generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return None if pad is None else torch.tensor(pad, device=device)


def kernel_layer(layer_name: str) -> Callable[[type], type]:
    """transformers' `use_kernel_forward_from_hub(layer_name)`, plus the class attribute `kernels.kernelize` looks for.

    transformers >= 5.23 turns that decorator into a no-op stub unless `kernels` >= 0.18.2 is installed, so a layer
    would be invisible to `kernels.kernelize` called directly; the name is set here in that case. The eager forward
    stays the reference either way.
    """

    def decorate(cls: type) -> type:
        cls = use_kernel_forward_from_hub(layer_name)(cls)
        if getattr(cls, "kernel_layer_name", None) is None:
            cls.kernel_layer_name = layer_name
        return cls

    return decorate


def keep_stock_weight_loading(base: type) -> Callable[[type], type]:
    """Class decorator: a remote-code subclass of the stock class `base` loads its weights exactly as `base` does.

    transformers treats a class loaded with `trust_remote_code=True` as custom code (`is_custom_code()`): it skips
    the checkpoint conversion mappings of its `model_type` (fused MoE experts, renamed keys), looks class-specific
    mappings up under the subclass's own name (e.g. the `GPTNeoXForCausalLM` one, whose absence leaves `lm_head`
    random) and initialises only modules with uninitialised parameters (non-persistent buffers stay empty). The
    subclass adds decoding only, so it takes `base`'s answer and `base`'s class-specific mapping. Both hooks are
    feature-detected: a release without them has nothing to keep.
    """

    def decorate(cls: type) -> type:
        if callable(getattr(base, "is_custom_code", None)):
            cls.is_custom_code = classmethod(lambda _cls: base.is_custom_code())
        try:
            from transformers import conversion_mapping
        except ImportError:
            return cls
        get = getattr(conversion_mapping, "get_checkpoint_conversion_mapping", None)
        register = getattr(conversion_mapping, "register_checkpoint_conversion_mapping", None)
        if callable(get) and callable(register):
            mapping = get(base.__name__)
            if mapping is not None and get(cls.__name__) is None:
                register(cls.__name__, mapping)
        return cls

    return decorate


def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions whose logits a causal LM computes: the last `logits_to_keep` (0: all), or the given indices.

    transformers' own helper of the same name exists only from 5.21 on; this is its documented behaviour.
    """
    indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, indices, :]
