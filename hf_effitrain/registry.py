"""Registers the package's own model types with transformers' AutoClasses when `hf_effitrain` is imported.

The config classes are registered at import (their modules import only transformers' config code, ~0.06 s); each
model class is registered as a stand-in that imports the real class on first use, because a modeling module imports
`PreTrainedModel`, which costs ~2 s that `import hf_effitrain` would otherwise add to every script. Measured on a
2-core CPU: `import hf_effitrain` adds ~0.3 s to `import torch, transformers` with transformers 5.24; with 5.20 it
adds ~1.8 s, because there `AutoModelForCausalLM` itself imports transformers' generation utils.

Model types are namespaced (`effi_ode_shared`, `effi_cascade`) so that they cannot collide with another package's
registration. Checkpoints saved with the earlier types (`ode_shared`, `cascade`) still load: those names are
registered too, unless another package already owns them (then loading such a checkpoint needs
`trust_remote_code=True`, and that is logged).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

logger = logging.getLogger(__name__)

__all__ = ["MODEL_TYPES", "ModelType", "register_auto_classes"]


@dataclass(frozen=True)
class ModelType:
    """One of the package's model types: where its config and model classes live, and its earlier name."""

    config_module: str
    config_name: str
    model_module: str
    model_name: str
    legacy_model_type: str | None = None

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.config_module), self.config_name)

    def model_class(self) -> type:
        return getattr(importlib.import_module(self.model_module), self.model_name)


# each hub model file adds its line here
MODEL_TYPES: tuple[ModelType, ...] = (
    ModelType(
        "hf_effitrain.hub.configuration_ode_shared",
        "OdeSharedConfig",
        "hf_effitrain.hub.modeling_ode_shared",
        "OdeSharedForCausalLM",
        legacy_model_type="ode_shared",
    ),
    ModelType(
        "hf_effitrain.hub.configuration_cascade",
        "CascadeConfig",
        "hf_effitrain.hub.modeling_cascade",
        "CascadeForCausalLM",
        legacy_model_type="cascade",
    ),
)


class _DeferredModelClass(type):
    """Metaclass of a model-class stand-in: every attribute it lacks (`from_pretrained`, `_from_config`, ...) and
    every call is answered by the real class, imported on first use."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls.resolve(), name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.resolve()(*args, **kwargs)


def _deferred_model_class(entry: ModelType, config_class: type) -> type:
    """A stand-in for `entry`'s model class that AutoModelForCausalLM can hold without importing it."""
    return _DeferredModelClass(
        entry.model_name,
        (),
        {
            "__module__": entry.model_module,
            "__doc__": f"Stand-in for `{entry.model_module}.{entry.model_name}`, imported on first use.",
            "config_class": config_class,
            "resolve": staticmethod(entry.model_class),
        },
    )


def _legacy_config_class(config_class: type, legacy_model_type: str) -> type:
    """`config_class` under its earlier model type; saving writes the current type, so a re-saved checkpoint
    moves to it."""

    def to_dict(self) -> dict[str, Any]:
        output = config_class.to_dict(self)
        output["model_type"] = config_class.model_type
        return output

    # the same class name: AutoModelForCausalLM.register checks that a model's config_class has the config's name
    return type(
        config_class.__name__,
        (config_class,),
        {
            "__module__": config_class.__module__,
            "__doc__": f"`{config_class.__name__}` read from a checkpoint saved with model_type={legacy_model_type!r}.",
            "model_type": legacy_model_type,
            "to_dict": to_dict,
        },
    )


def _register(model_type: str, config_class: type, model_class: type) -> None:
    AutoConfig.register(model_type, config_class)
    AutoModelForCausalLM.register(config_class, model_class)


def _registered_elsewhere(model_type: str, module: str) -> bool:
    return model_type in CONFIG_MAPPING and CONFIG_MAPPING[model_type].__module__ != module


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the package's model types (idempotent).

    Raises:
        ValueError: when another package registered one of the namespaced types (`effi_*`) with its own class.
    """
    for entry in MODEL_TYPES:
        config_class = entry.config_class()
        if config_class.model_type in CONFIG_MAPPING:
            if _registered_elsewhere(config_class.model_type, entry.config_module):
                owner = CONFIG_MAPPING[config_class.model_type]
                raise ValueError(
                    f"model_type {config_class.model_type!r} is already registered by {owner.__module__}.{owner.__name__}; "
                    f"hf_effitrain needs it for {entry.config_name}."
                )
            continue  # registered by an earlier call
        _register(config_class.model_type, config_class, _deferred_model_class(entry, config_class))
        legacy = entry.legacy_model_type
        if legacy is None:
            continue
        if legacy in CONFIG_MAPPING:
            logger.info(
                "model_type %r is registered by another package: checkpoints saved with it load only through their "
                "own code (trust_remote_code=True).",
                legacy,
            )
            continue
        legacy_config = _legacy_config_class(config_class, legacy)
        _register(legacy, legacy_config, _deferred_model_class(entry, legacy_config))
