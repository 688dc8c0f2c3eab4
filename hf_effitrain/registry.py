"""Registers the package's own model classes with transformers' AutoClasses when `hf_effitrain` is imported."""

from __future__ import annotations

import importlib

from transformers import AutoConfig, AutoModelForCausalLM

# (module, config class, module, model class); each hub model file adds its line here.
_AUTO_CLASSES: tuple[tuple[str, str, str, str], ...] = (
    ("hf_effitrain.hub.configuration_ode_shared", "OdeSharedConfig", "hf_effitrain.hub.modeling_ode_shared", "OdeSharedForCausalLM"),
    ("hf_effitrain.hub.configuration_cascade", "CascadeConfig", "hf_effitrain.hub.modeling_cascade", "CascadeForCausalLM"),
)


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know our model types (idempotent)."""
    for config_module, config_name, model_module, model_name in _AUTO_CLASSES:
        config_cls = getattr(importlib.import_module(config_module), config_name)
        model_cls = getattr(importlib.import_module(model_module), model_name)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        config_cls.register_for_auto_class()
        model_cls.register_for_auto_class("AutoModelForCausalLM")
