"""Old import paths of names that moved to another module: they keep working, with one `FutureWarning` each."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["forward_moved_name"]


def forward_moved_name(module: str, name: str, moved: dict[str, str]) -> Any:
    """The object `name` of `module` that now lives in `moved[name]`; `AttributeError` for any other name.

    Meant for a module's `__getattr__`, so that `from <module> import <name>` still works after a move.
    """
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {moved[name]}.{name}; the old path will be removed in a future release.",
        FutureWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(moved[name]), name)
