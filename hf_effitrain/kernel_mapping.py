"""Old home of the kernel layer mapping, now `hf_effitrain.integrations.kernel_mapping` (names forwarded with a
`FutureWarning`)."""

from __future__ import annotations

from typing import Any

from hf_effitrain._moved import forward_moved_name

_NAMES = ("LAYER_KERNELS", "effi_kernel_mapping", "kernelize_model", "restore_eager_forwards")


def __getattr__(name: str) -> Any:
    return forward_moved_name(__name__, name, dict.fromkeys(_NAMES, "hf_effitrain.integrations.kernel_mapping"))
