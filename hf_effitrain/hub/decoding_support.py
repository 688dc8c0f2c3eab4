"""Which architectures the exact decoding strategies can run, and a clear refusal naming why for the others.

Jacobi and TR-Jacobi verify drafts in one forward and then roll the KV cache back to the accepted prefix
(`DynamicCache.crop`), so they need a cache whose every layer holds per-position keys/values. They cannot run:

- stateful models (Mamba, RWKV, RecurrentGemma, xLSTM, and the hybrids Jamba, Zamba, Qwen3-Next, LFM2-style
  ones...): their recurrent / convolution / linear-attention state summarises every position seen, so a rejected
  draft cannot be removed from it. Found by feature: the model's `_is_stateful` flag (transformers up to 5.24) or a
  linear-attention layer in the cache it builds (`LinearAttentionCacheLayerMixin`, the only sign from 5.25 on);
- models that keep no cache at all (OpenAI GPT, XLM, ...): each verification would recompute the whole text;
- models whose cache is their own class rather than a `DynamicCache` (Reformer, XLNet, the original MiniMax);
- the few types listed in `UNSUPPORTED_TYPES`, whose forward breaks a premise of the strategies.

A refusal says what the architecture lacks and that `strategy="plain"` (stock `generate`) works; it never blames a
setting the user did not choose. This file ships inside checkpoints: it imports only stdlib, torch, transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers.cache_utils as cache_utils
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["UNSUPPORTED_TYPES", "check_cascade_member", "check_decoding_support", "decoding_refusal"]

# model_type -> why the strategies cannot run it (found by the architecture sweep; see tests/sweep).
UNSUPPORTED_TYPES: dict[str, str] = {
    "cpmant": "its forward prepends prompt tokens of its own and takes no position ids or attention mask",
    "prophetnet": "its causal LM predicts n-gram streams and its decoder caches only one new token per step",
    "xlm": "its `cache` argument is its own dict of per-layer states, not a KV cache that can be cropped",
}
_ROLLBACK_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past", "mems")
# Cache layers that hold recurrent / convolution state (absent from releases that predate them: nothing to detect)
_RECURRENT_LAYERS = tuple(
    kind for kind in (getattr(cache_utils, "LinearAttentionCacheLayerMixin", None),) if isinstance(kind, type)
)


def _model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _takes_a_cache(model) -> bool:
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return True
    return any(name in parameters for name in _CACHE_ARGUMENTS)


def _supports_dynamic_cache(model) -> bool:
    check = getattr(type(model), "_supports_default_dynamic_cache", None)
    return bool(check()) if callable(check) else True


def _config_cache_layers(model) -> list:
    """The layers of the `DynamicCache` that `generate` would build for `model` (none when it cannot be built)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return []
    try:
        return list(DynamicCache(config=config.get_text_config(decoder=True)).layers)
    except Exception as error:  # the real cache's layers are still checked once `generate` has built it
        logger.warning_once(
            f"Could not build a DynamicCache from the {type(config).__name__} to look for recurrent layers ({error!r}); "
            "the cache that generate builds is checked instead."
        )
        return []


def _is_stateful(model, cache: Any = None) -> bool:
    """Whether `model` keeps recurrent state: its own flag where transformers has one (up to 5.24, authoritative),
    else a recurrent layer in its cache (`cache` when given, else the one its config builds)."""
    flag = getattr(model, "_is_stateful", None)
    if flag is not None or not _RECURRENT_LAYERS:
        return bool(flag)
    layers = cache.layers if isinstance(cache, DynamicCache) else _config_cache_layers(model)
    return any(isinstance(layer, _RECURRENT_LAYERS) for layer in layers)


def decoding_refusal(model, cache: Any = None) -> str | None:
    """Why Jacobi-style decoding (draft, verify, roll back) cannot run `model`, or None when it can.

    Args:
        model (`PreTrainedModel`): the model to decode with.
        cache (`Cache`, *optional*): the cache `generate` prepared; its layers are checked when given.
    Returns:
        A sentence naming what the architecture lacks, or None.
    """
    name = f"{type(model).__name__} (model_type {_model_type(model)!r})"
    if _model_type(model) in UNSUPPORTED_TYPES:
        return f"{name} cannot run it: {UNSUPPORTED_TYPES[_model_type(model)]}"
    if _is_stateful(model, cache):
        return (
            f"{name} keeps recurrent state (state-space, convolution or linear-attention layers) that summarises every "
            "position it has seen, so rejected drafts cannot be rolled back out of it"
        )
    if not _takes_a_cache(model):
        return f"{name} keeps no KV cache (its forward takes none), so drafts cannot be verified incrementally"
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", None) is False and hasattr(config, "add_cross_attention"):
        return f"{name} has an encoder config (is_decoder=False) and caches keys/values only as a decoder (is_decoder=True)"
    if not _supports_dynamic_cache(model):
        return f"{name} uses its own cache class instead of a DynamicCache, which cannot be cropped back to a position"
    if cache is not None and isinstance(cache, DynamicCache):
        for layer in cache.layers:
            if type(layer) not in _ROLLBACK_LAYERS:  # subclasses keep more than keys/values (indexer states, ...)
                return (
                    f"{name} has cache layers of type {type(layer).__name__}, which keep more than per-position keys "
                    "and values and cannot be cropped back to a position"
                )
    return None


def check_decoding_support(model, strategy: str, cache: Any = None) -> None:
    """Raise a ValueError naming why `strategy` cannot decode `model` (see `decoding_refusal`); return otherwise.

    Raises:
        ValueError: the architecture cannot be decoded with `strategy`; `strategy="plain"` can.
    """
    reason = decoding_refusal(model, cache)
    if reason is not None:
        raise ValueError(
            f"Strategy {strategy!r} verifies drafts and rolls the KV cache back, which this architecture does not "
            f"allow: {reason}. Use strategy='plain' (stock `generate`, same greedy output)."
        )


# model_type -> why its cache cannot be caught up lazily (it is not a `Cache`)
_OWN_CACHE_TYPES = {"xlm": "takes its own dict of per-layer states as `cache`, not a transformers Cache"}


def _cascade_member_refusal(model) -> str | None:
    if _model_type(model) in _OWN_CACHE_TYPES:
        return _OWN_CACHE_TYPES[_model_type(model)]
    stateful = _is_stateful(model)
    if not _takes_a_cache(model):
        return (
            "keeps its recurrent state in a cache of its own, not a DynamicCache"
            if stateful
            else "keeps no KV cache (its forward takes none)"
        )
    if not _supports_dynamic_cache(model):
        return "uses its own cache class instead of a DynamicCache"
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        layers = DynamicCache(config=config.get_text_config(decoder=True)).layers
        if layers and not any(isinstance(layer, _ROLLBACK_LAYERS) for layer in layers):
            return "has no attention layer in its cache, whose length tells which tokens it has not seen yet"
    return None


def check_cascade_member(model, role: str) -> None:
    """Refuse a token-level cascade member whose cache cannot be caught up lazily through a `DynamicCache`.

    Token-level deferral never rolls a cache back, so stateful hybrids (with at least one attention layer) are fine;
    members that keep no cache, only their own cache class, or no attention layer at all are refused.

    Raises:
        ValueError: naming the member (`role`: "small" or "large") and why; `deferral="sequence"` works for it.
    """
    reason = _cascade_member_refusal(model)
    if reason is not None:
        raise ValueError(
            f"Token-level cascade deferral feeds each member the tokens it has not seen through a DynamicCache; the "
            f"{role} model {type(model).__name__} (model_type {_model_type(model)!r}) {reason}. Use "
            "deferral='sequence', which calls its own `generate`."
        )
