"""Code that ships inside checkpoints (flat sibling modules; siblings never import this file)."""

from .generation_effi import STRATEGIES, EffiGenerationMixin, generate, resolve_strategy

__all__ = ["STRATEGIES", "EffiGenerationMixin", "generate", "resolve_strategy"]
