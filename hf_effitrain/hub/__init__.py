"""Code that ships inside checkpoints (flat sibling modules; siblings never import this file).

The generation names below load on first access: importing a config module (as `import hf_effitrain` does to
register the model types) must not import `transformers.generation` (~1.5 s).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["STRATEGIES", "EffiGenerationMixin", "generate", "resolve_strategy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".generation_effi", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
