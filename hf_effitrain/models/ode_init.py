"""Old home of the dense -> ODE-shared conversion, now `hf_effitrain.methods.ode.conversion` (names forwarded with
a `FutureWarning`)."""

from __future__ import annotations

from typing import Any

from hf_effitrain._moved import forward_moved_name

_NAMES = ("ode_shared_config_from_llama", "ode_shared_from_llama")


def __getattr__(name: str) -> Any:
    return forward_moved_name(__name__, name, dict.fromkeys(_NAMES, "hf_effitrain.methods.ode.conversion"))
