"""Layer name -> kernel repo for `kernels.kernelize`, and a helper that kernelizes a model with that mapping.

Layers of the package's models opt in with `@use_kernel_forward_from_hub("<LayerName>")` (today:
`OdeStepRMSNorm` as `"EffiOdeStepRMSNorm"`). The mapping points each name at its kernel repo, loaded from the
same source as the package's ops (`hf_effitrain.ops.set_kernel_source`): the local `kernels/` folder by default,
a Hub repo when one is named. `DISABLE_KERNEL_MAPPING=1` turns mappings off, as `kernels` documents.
"""

from __future__ import annotations

import logging
import os

import torch
from kernels import (
    KernelizeFallback,
    LayerRepository,
    LocalLayerRepository,
    Mode,
    kernelize,
    use_kernel_mapping,
)

from hf_effitrain.ops.kernel_loading import KernelLoadError, kernel_source, load_kernel_module, local_kernel_repo

__all__ = [
    "LAYER_KERNELS",
    "effi_kernel_mapping",
    "kernelize_model",
    "restore_eager_forwards",
]

logger = logging.getLogger(__name__)

# hub layer name -> (kernel repo name, layer class inside that repo's `layers`)
LAYER_KERNELS: dict[str, tuple[str, str]] = {"EffiOdeStepRMSNorm": ("effi_ode_step", "EffiOdeStepRMSNorm")}
# Triton kernels run on CUDA; "cpu" is accepted for tests that run them through TRITON_INTERPRET=1
_DEFAULT_DEVICES = ("cuda",)


def _layer_repository(layer_name: str) -> LayerRepository | LocalLayerRepository:
    kernel_name, class_name = LAYER_KERNELS[layer_name]
    source = kernel_source(kernel_name)
    if source.repo_id is None:
        return LocalLayerRepository(local_kernel_repo(kernel_name), layer_name=class_name)
    return LayerRepository(
        source.repo_id,
        layer_name=class_name,
        version=source.version,
        revision=source.revision,
        trust_remote_code=source.trust_remote_code,
    )


def effi_kernel_mapping(devices: tuple[str, ...] = _DEFAULT_DEVICES) -> dict:
    """The `kernels` mapping of every layer in `LAYER_KERNELS`, for each device type in `devices`."""
    unknown = set(devices) - {"cuda", "rocm", "cpu"}
    if unknown:
        raise ValueError(f"devices must be among ('cuda', 'rocm', 'cpu'), got {sorted(unknown)}")
    return {name: {device: _layer_repository(name) for device in devices} for name in LAYER_KERNELS}


def restore_eager_forwards(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `kernelize` on every hub-kernel layer: drop the instance `forward`, so the class's eager one runs."""
    for module in model.modules():
        if getattr(type(module), "kernel_layer_name", None) is not None:
            module.__dict__.pop("forward", None)
    return model


def _model_kernel_names(model: torch.nn.Module) -> list[str]:
    """The package's kernel repos that the hub-kernel layers of `model` map to (sorted, each once)."""
    layer_names = {getattr(type(module), "kernel_layer_name", None) for module in model.modules()}
    return sorted({LAYER_KERNELS[name][0] for name in layer_names if name in LAYER_KERNELS})


def _no_kernel_reason(device: str) -> str | None:
    if device not in ("cuda", "rocm", "cpu"):
        return f"there is no kernel for device {device!r}"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels run on CPU only under TRITON_INTERPRET=1"
    return None


def kernelize_model(
    model: torch.nn.Module,
    *,
    mode: Mode | None = None,
    device: str | None = None,
    use_fallback: bool | KernelizeFallback = True,
) -> torch.nn.Module:
    """`kernels.kernelize` with the package's mapping; returns the model (its layers' forwards swapped in place).

    Args:
        model (`torch.nn.Module`): a model whose layers carry `use_kernel_forward_from_hub` names.
        mode (`kernels.Mode`, *optional*): defaults to `Mode.TRAINING` if `model.training` else `Mode.INFERENCE`.
        device (`str`, *optional*): device type to kernelize for; defaults to the model's parameters' device.
        use_fallback (`bool` or `KernelizeFallback`, *optional*, defaults to `True`): as in `kernels.kernelize`
            (keep the eager forward where no mapping fits). A kernel repo of the package that does not load
            (`KernelLoadError`: a wheel install without local kernel repos, an unreachable Hub repo, a broken
            build) logs a warning and keeps the eager forwards, unless `use_fallback=False` (then it raises).

    `kernelize` swaps instance forwards and leaves the classes untouched; on a device without kernels (CPU
    without `TRITON_INTERPRET=1`, MPS, ...) this logs why and restores the eager forwards
    (`restore_eager_forwards`), so moving a kernelized model to the CPU and calling it again is safe.
    """
    if mode is None:
        mode = Mode.TRAINING if model.training else Mode.INFERENCE
    if device is None:
        device = next(model.parameters()).device.type
    reason = _no_kernel_reason(device)
    if reason is not None:
        logger.info("kernelize_model: the eager forwards are used because %s", reason)
        return restore_eager_forwards(model)
    try:
        mapping = effi_kernel_mapping((device,))
        # load the model's kernel repos first (cached), so a repo that does not load is one clear, caught error
        for kernel_name in _model_kernel_names(model):
            load_kernel_module(kernel_name)
    except KernelLoadError as error:
        if use_fallback is False or use_fallback == KernelizeFallback.NONE:
            raise
        logger.warning("kernelize_model: the eager forwards are used because %s", error)
        return restore_eager_forwards(model)
    with use_kernel_mapping(mapping, inherit_mapping=True):
        return kernelize(model, mode=mode, device=device, use_fallback=use_fallback)
