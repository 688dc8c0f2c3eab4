"""hf_effitrain: patch-level training, MSN + (TR-)Jacobi decoding, ODE-shared models and cascade-aware training
for the Hugging Face stack.

Importing the package registers its model classes with `AutoConfig` / `AutoModelForCausalLM`; everything else is
loaded lazily on first access so that `import hf_effitrain` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import register_auto_classes

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_EXPORTS: dict[str, str] = {
    # foundation
    "load_corpus": "hf_effitrain.data",
    "corpus_stats": "hf_effitrain.data",
    "train_tokenizer": "hf_effitrain.data",
    "pack_dataset": "hf_effitrain.data",
    "build_code_sft_dataset": "hf_effitrain.data",
    "build_model": "hf_effitrain.models.presets",
    "PRESETS": "hf_effitrain.models.presets",
    "export_pretrained": "hf_effitrain.export",
    "push_checkpoint": "hf_effitrain.push",
    # decoding
    "generate": "hf_effitrain.hub.generation_effi",
    "EffiGenerationMixin": "hf_effitrain.hub.generation_effi",
    "DraftMemory": "hf_effitrain.hub.draft_memory",
    # patch-level training
    "PatchTrainer": "hf_effitrain.methods.patch.trainer",
    "PatchTrainingArguments": "hf_effitrain.methods.patch.config",
    "patch_level_loss": "hf_effitrain.methods.patch.loss",
    # MSN
    "NoisySFTConfig": "hf_effitrain.methods.msn.config",
    "NoisySFTTrainer": "hf_effitrain.methods.msn.trainer",
    "MSNNoiseCollator": "hf_effitrain.methods.msn.collator",
    # ODE-shared
    "OdeSharedConfig": "hf_effitrain.hub.configuration_ode_shared",
    "OdeSharedForCausalLM": "hf_effitrain.hub.modeling_ode_shared",
    # cascades
    "CascadeConfig": "hf_effitrain.hub.configuration_cascade",
    "CascadeForCausalLM": "hf_effitrain.hub.modeling_cascade",
    "CascadeAwareTrainer": "hf_effitrain.methods.cascade.trainer",
    "CascadeAwareTrainingArguments": "hf_effitrain.methods.cascade.config",
    # kernels
    "fused_linear_cross_entropy": "hf_effitrain.ops.linear_cross_entropy",
    "kernelize_model": "hf_effitrain.integrations.kernel_mapping",
}

__all__ = sorted(_LAZY_EXPORTS) + ["register_auto_classes", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_effitrain' has no attribute {name!r}")


register_auto_classes()
