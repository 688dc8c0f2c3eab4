"""Named model sizes for any supported architecture, built through `AutoConfig.for_model`.

Sizes are given in architecture-neutral terms (hidden size, layers, heads, MLP width) and translated per
architecture, so `tiny` / `small` / `base` mean comparable models whether the user picks llama, qwen2, mistral,
gpt2 or the package's own `ode_shared`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class ModelPreset:
    """Architecture-neutral size of a decoder-only model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    description: str


# Parameter counts below are for a 8192-token vocabulary with untied llama embeddings.
PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(32, 2, 4, 64, "about 0.5M params: tests"),
    "mini": ModelPreset(256, 4, 4, 688, "about 5M params: the CPU demo"),
    "small": ModelPreset(512, 6, 8, 1376, "about 28M params"),
    "base": ModelPreset(768, 12, 12, 3072, "about 126M params"),
}

# Architectures whose configs take llama-style field names.
_LLAMA_STYLE = ("llama", "qwen2", "mistral")
# architecture name users pass -> transformers model_type (the package's own types are namespaced)
_MODEL_TYPES: dict[str, str] = {**{name: name for name in (*_LLAMA_STYLE, "gpt2")}, "ode_shared": "effi_ode_shared"}


def _llama_style_kwargs(preset: ModelPreset, *, vocab_size: int, max_positions: int) -> dict[str, Any]:
    """Llama-style field names (llama, qwen2, mistral and the package's `ode_shared`), untied embeddings."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def _ode_shared_kwargs(preset: ModelPreset, *, vocab_size: int, max_positions: int) -> dict[str, Any]:
    """One shared Llama layer integrated over the preset's depth with one Euler step per layer: the same layer
    compute as the preset's Llama at default steps, with the parameters of a single layer."""
    kwargs = _llama_style_kwargs(preset, vocab_size=vocab_size, max_positions=max_positions)
    kwargs["num_steps"] = kwargs.pop("num_hidden_layers")
    return kwargs


def supported_architectures() -> list[str]:
    return list(_MODEL_TYPES)


def _architecture_kwargs(architecture: str, preset: ModelPreset, vocab_size: int, max_positions: int) -> dict[str, Any]:
    if architecture in _LLAMA_STYLE:
        return _llama_style_kwargs(preset, vocab_size=vocab_size, max_positions=max_positions)
    if architecture == "gpt2":
        return dict(
            vocab_size=vocab_size,
            n_embd=preset.hidden_size,
            n_layer=preset.num_layers,
            n_head=preset.num_heads,
            n_inner=preset.intermediate_size,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            # gpt2's defaults point at id 50256, outside our vocabularies; callers pass the tokenizer's ids.
            bos_token_id=None,
            eos_token_id=None,
        )
    return _ode_shared_kwargs(preset, vocab_size=vocab_size, max_positions=max_positions)


def build_config(
    preset: str = "tiny",
    architecture: str = "llama",
    *,
    vocab_size: int = 8192,
    max_position_embeddings: int = 1024,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **overrides: Any,
) -> PreTrainedConfig:
    """Config of the named `preset` size for `architecture`; `overrides` set any config field directly.

    Raises:
        ValueError: for an unknown preset or architecture, naming the valid ones; for an override that is not a field
            of the architecture's config (a typo would otherwise be stored silently) or a value of the wrong type.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; valid presets are {sorted(PRESETS)}.")
    if architecture not in supported_architectures():
        raise ValueError(f"Unknown architecture {architecture!r}; valid architectures are {supported_architectures()}.")
    kwargs = _architecture_kwargs(architecture, PRESETS[preset], vocab_size, max_position_embeddings)
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    kwargs.update({k: v for k, v in special.items() if v is not None})
    _check_config_fields(architecture, overrides)
    kwargs.update(overrides)
    try:
        return AutoConfig.for_model(_MODEL_TYPES[architecture], **kwargs)
    except (TypeError, ValueError, StrictDataclassError) as error:  # huggingface_hub validates each field's type
        raise ValueError(f"Bad config value for {architecture}: {' '.join(str(error).split())}") from error


def _check_config_fields(architecture: str, overrides: dict[str, Any]) -> None:
    """Refuse override keys that the architecture's config does not know, suggesting the closest known ones."""
    import difflib

    config = AutoConfig.for_model(_MODEL_TYPES[architecture])
    # init-only keywords that configs accept but do not serialise
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {})) | {"attn_implementation", "torch_dtype"}
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {close}?" if close else f"; known fields include {sorted(known)[:12]}..."
            raise ValueError(f"Unknown config field {key!r} for architecture {architecture!r}{hint}")


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """Parse `"a=1,b=x,c=0.5,d=true"` into typed values (int, float, bool, None or str).

    Not `PretrainedConfig.update_from_string`: that types each value by the field's current value, so it cannot set a
    field whose default is None (`ode_interval=8`, `train_num_steps=4`), needs the config to exist first (the ODE
    conversion and `generate` take these keys as keyword arguments), and skips the config's own validation, which
    `build_config` runs on the parsed values.

    Raises:
        ValueError: for an item that is not `key=value`.
    """
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Bad config override {item!r}: expected key=value, e.g. 'num_steps=4'.")
        overrides[key.strip()] = _parse_scalar(raw.strip())
    return overrides


def _parse_scalar(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def build_model(
    preset: str = "tiny", architecture: str = "llama", *, seed: int | None = None, **config_kwargs: Any
) -> PreTrainedModel:
    """A freshly initialised causal LM of the named size (see `build_config` for the arguments).

    >>> model = build_model("tiny", "qwen2", vocab_size=300)
    >>> model.config.model_type
    'qwen2'
    """
    config = build_config(preset, architecture, **config_kwargs)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
