"""Start an ODE-shared model from a pre-trained Llama (Relaxed Recursive Transformers' average initialisation).

The first `num_pre_layers` and last `num_post_layers` Llama layers are copied as the unshared layers. The middle
layers are cut into `num_shared_blocks` contiguous chunks; layer `j` of shared block `b` is the parameter-wise mean
of the chunk's layers `j, j + m, j + 2m, ...` (`m = shared_block_layers`), as Bae et al. (2024) average the layers
that one looped layer replaces. Each block then integrates `chunk / m` unit steps by default, so where the
averaged layers were equal the new model computes exactly what the Llama did. Embeddings, final norm and LM head
are copied. A step-aware model (`step_aware=True`) keeps its zero-initialised step conditioning, so it starts
from the same function. Continue training afterwards to recover what averaging lost.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaForCausalLM

from hf_effitrain.hub.configuration_ode_shared import OdeSharedConfig
from hf_effitrain.hub.modeling_ode_shared import OdeSharedForCausalLM

__all__ = ["check_conversion_overrides", "ode_shared_config_from_llama", "ode_shared_from_llama"]

# Llama config fields that mean the same in OdeSharedConfig.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
)


def ode_shared_config_from_llama(
    llama_config,
    *,
    num_pre_layers: int = 0,
    num_post_layers: int = 0,
    shared_block_layers: int = 1,
    num_shared_blocks: int = 1,
    **overrides: Any,
) -> OdeSharedConfig:
    """An `OdeSharedConfig` with the Llama's sizes whose shared blocks stand in for its middle layers at step 1.

    Raises:
        ValueError: when the middle layers do not split into `num_shared_blocks` chunks of a multiple of
            `shared_block_layers` layers, or a Llama config field the ODE model cannot express is set.
    """
    if getattr(llama_config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"pretraining_tp={llama_config.pretraining_tp} is not supported; only 1.")
    middle = llama_config.num_hidden_layers - num_pre_layers - num_post_layers
    chunk, remainder = divmod(middle, num_shared_blocks) if num_shared_blocks > 0 else (0, 1)
    if middle < 1 or remainder or chunk % shared_block_layers:
        raise ValueError(
            f"A Llama with {llama_config.num_hidden_layers} layers minus num_pre_layers={num_pre_layers} and "
            f"num_post_layers={num_post_layers} leaves {middle} middle layers, which do not split into "
            f"num_shared_blocks={num_shared_blocks} chunks of a multiple of shared_block_layers={shared_block_layers}."
        )
    steps = [chunk // shared_block_layers] * num_shared_blocks
    kwargs = {name: getattr(llama_config, name) for name in _SHARED_FIELDS}
    kwargs.update(
        num_pre_layers=num_pre_layers,
        num_post_layers=num_post_layers,
        shared_block_layers=shared_block_layers,
        num_shared_blocks=num_shared_blocks,
        num_steps=sum(steps) if num_shared_blocks == 1 else steps,
        ode_interval=float(sum(steps)) if num_shared_blocks == 1 else [float(s) for s in steps],
    )
    kwargs.update(overrides)
    return OdeSharedConfig(**kwargs)


_LAYOUT_FIELDS = ("num_pre_layers", "num_post_layers", "shared_block_layers", "num_shared_blocks")


def check_conversion_overrides(overrides: dict[str, Any]) -> None:
    """Refuse keyword arguments of `ode_shared_from_llama` that are neither a layout field nor an `OdeSharedConfig`
    field (a typo would otherwise fail only after the model is loaded).

    Raises:
        ValueError: naming the unknown keys and the allowed ones.
    """
    allowed = set(_LAYOUT_FIELDS) | set(OdeSharedConfig().to_dict())
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"Unknown ODE conversion setting(s) {unknown}: use {list(_LAYOUT_FIELDS)} or OdeSharedConfig fields "
            "(e.g. num_steps, solver)."
        )


@torch.no_grad()
def ode_shared_from_llama(llama_model: LlamaForCausalLM, **config_kwargs: Any) -> OdeSharedForCausalLM:
    """Build an `OdeSharedForCausalLM` initialised from `llama_model` (see the module docstring for the mapping).

    Args:
        llama_model (`LlamaForCausalLM`): the pre-trained model; it is not modified.
        **config_kwargs: `num_pre_layers`, `num_post_layers`, `shared_block_layers`, `num_shared_blocks` and any
            `OdeSharedConfig` field to override (e.g. `num_steps`, `solver`, `train_step_schedule`).
    Returns:
        The new model, in the Llama's dtype and device, in the Llama's train/eval mode.

    >>> ode = ode_shared_from_llama(llama, num_pre_layers=1, num_post_layers=1)  # doctest: +SKIP
    """
    if not isinstance(llama_model, LlamaForCausalLM):
        raise TypeError(f"ode_shared_from_llama needs a LlamaForCausalLM, got {type(llama_model).__name__}.")
    config = ode_shared_config_from_llama(llama_model.config, **config_kwargs)
    model = OdeSharedForCausalLM(config).to(device=llama_model.device, dtype=llama_model.dtype)
    source_layers = list(llama_model.model.layers)
    pre, post = config.num_pre_layers, config.num_post_layers
    for target, source in zip(model.model.pre_layers, source_layers[:pre]):
        target.load_state_dict(source.state_dict())
    if post:
        for target, source in zip(model.model.post_layers, source_layers[-post:]):
            target.load_state_dict(source.state_dict())
    middle = source_layers[pre : len(source_layers) - post]
    chunk = len(middle) // config.num_shared_blocks
    for b, block in enumerate(model.model.shared_blocks):
        members = middle[b * chunk : (b + 1) * chunk]
        for j, target in enumerate(block):
            _load_layer(target, _mean_state_dict(members[j :: config.shared_block_layers]))
    model.model.embed_tokens.load_state_dict(llama_model.model.embed_tokens.state_dict())
    model.model.norm.load_state_dict(llama_model.model.norm.state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(llama_model.lm_head.state_dict())
    model.train(llama_model.training)
    return model


def _load_layer(target, state: dict[str, torch.Tensor]) -> None:
    """Load a Llama layer's weights; only the step conditioning of a step-aware layer may stay as initialised."""
    result = target.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith("step_conditioning.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Llama layer weights do not fit the ODE layer: missing {missing}, unexpected {result.unexpected_keys}."
        )


def _mean_state_dict(layers) -> dict[str, torch.Tensor]:
    states = [layer.state_dict() for layer in layers]
    return {
        name: torch.stack([state[name].float() for state in states]).mean(0).to(states[0][name].dtype)
        for name in states[0]
    }
