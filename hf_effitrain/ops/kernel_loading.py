"""Where the package's kernel repositories come from, and loading them through `kernels`.

By default a kernel repo is loaded from the local folder with `kernels.get_local_kernel`: the `kernels/` folder
of the source checkout (editable installs), or the folder named by `EFFI_KERNELS_DIR`. A wheel does not ship
`kernels/`, so wheel installs either set `EFFI_KERNELS_DIR` to a checkout's `kernels/` folder or name a Hub repo
with `set_kernel_source(name, repo_id=..., version=...)`, which loads with `kernels.get_kernel`; the library's
`LOCAL_KERNELS="org/repo=/abs/path"` then redirects that repo to a local folder as it documents.

Without `EFFI_KERNELS_DIR`, the default folder is used only if it really holds the package's kernel repos (in a
wheel install `<package>/../kernels` is `<site-packages>/kernels`, the `kernels` library itself); otherwise loading
raises a `KernelLoadError` that says how to point the package at its kernels. A failed load is remembered per
kernel (the same `KernelLoadError` is raised again without retrying, so a training loop does not retry a Hub
round-trip every step) until `set_kernel_source` or `load_kernel_module.cache_clear()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "KERNEL_NAMES",
    "KernelLoadError",
    "KernelSource",
    "kernel_source",
    "load_kernel_module",
    "local_kernel_repo",
    "local_kernels_dir",
    "set_kernel_source",
]

# kernel repo name (folder under kernels/, python package name) for each op of the package
KERNEL_NAMES = ("effi_linear_cross_entropy", "effi_ode_step")
_CHECKOUT_KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"


class KernelLoadError(RuntimeError):
    """A kernel repository could not be loaded; the message names the repo, the variant and the reason."""


@dataclass(frozen=True)
class KernelSource:
    """Where one kernel repo loads from: `repo_id=None` means the local folder shipped with the package."""

    repo_id: str | None = None
    version: int | None = None
    revision: str | None = None
    trust_remote_code: bool = False


_SOURCES: dict[str, KernelSource] = {}


def _holds_kernel_repos(folder: Path) -> bool:
    """Whether `folder` holds (at least one of) the package's kernel repos, not some other `kernels` folder."""
    return any((folder / name / "build.toml").is_file() for name in KERNEL_NAMES)


def local_kernels_dir() -> Path:
    """The folder holding one kernel repo per op: `$EFFI_KERNELS_DIR`, else the checkout's `kernels/`.

    Raises `KernelLoadError` when `EFFI_KERNELS_DIR` is unset and the installation has no local kernel repos (a
    wheel install: the default path would be the `kernels` library's own package folder).
    """
    override = os.environ.get("EFFI_KERNELS_DIR")
    if override:
        return Path(override)
    if not _holds_kernel_repos(_CHECKOUT_KERNELS_DIR):
        raise KernelLoadError(
            f"this installation has no local kernel repositories ({_CHECKOUT_KERNELS_DIR} does not hold "
            f"{', '.join(KERNEL_NAMES)}; a wheel does not ship `kernels/`): set EFFI_KERNELS_DIR to a checkout's "
            "`kernels/` folder or use `hf_effitrain.ops.set_kernel_source(name, repo_id, ...)` to load from the Hub"
        )
    return _CHECKOUT_KERNELS_DIR


def local_kernel_repo(name: str) -> Path:
    """Path of the local kernel repo `name` (its root, which holds `build/`)."""
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; choose from {KERNEL_NAMES}")
    return local_kernels_dir() / name


def set_kernel_source(
    name: str,
    repo_id: str | None = None,
    *,
    version: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Load kernel `name` from the Hub repo `repo_id` (at `version` or `revision`), or locally with `repo_id=None`."""
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; choose from {KERNEL_NAMES}")
    if repo_id is not None and (version is None) == (revision is None):
        raise ValueError(f"give exactly one of version= or revision= for the Hub kernel repo {repo_id!r}")
    _SOURCES[name] = KernelSource(repo_id, version, revision, trust_remote_code)
    load_kernel_module.cache_clear()


def kernel_source(name: str) -> KernelSource:
    """The source `load_kernel_module(name)` uses."""
    return _SOURCES.get(name, KernelSource())


def _expected_variant() -> str:
    backend = "cuda" if torch.version.cuda else "rocm" if torch.version.hip else "cpu"
    return f"torch-{backend}"


_LOADED: dict[str, ModuleType] = {}
_FAILED: dict[str, KernelLoadError] = {}


def _load_uncached(name: str) -> ModuleType:
    import kernels

    source = kernel_source(name)
    repo = local_kernel_repo(name) if source.repo_id is None else None  # KernelLoadError: no local repos
    where = source.repo_id or str(repo)
    try:
        if repo is not None:
            if not (repo / "build").is_dir():
                raise FileNotFoundError(
                    "no build/ folder; run `python scripts/build_kernels.py` in the checkout, or set EFFI_KERNELS_DIR"
                )
            return kernels.get_local_kernel(repo)
        return kernels.get_kernel(
            source.repo_id,
            version=source.version,
            revision=source.revision,
            trust_remote_code=source.trust_remote_code,
        )
    except Exception as error:  # every failure becomes one message naming repo, variant and reason
        raise KernelLoadError(
            f"could not load kernel repo {where!r} (variant {_expected_variant()}): {type(error).__name__}: {error}"
        ) from error


def load_kernel_module(name: str) -> ModuleType:
    """Import kernel repo `name` through `kernels` (cached); raise `KernelLoadError` saying what failed.

    A failure is cached too: later calls re-raise the same `KernelLoadError` without trying again, until
    `set_kernel_source` (or `load_kernel_module.cache_clear()`).
    """
    if name in _LOADED:
        return _LOADED[name]
    if name in _FAILED:
        raise _FAILED[name].with_traceback(None)  # drop the previous raise's frames; __cause__ keeps the reason
    try:
        module = _load_uncached(name)
    except KernelLoadError as error:
        _FAILED[name] = error
        raise
    _LOADED[name] = module
    return module


def _cache_clear() -> None:
    """Forget every loaded module and every cached failure (the next call loads again)."""
    _LOADED.clear()
    _FAILED.clear()


load_kernel_module.cache_clear = _cache_clear  # the `functools.lru_cache` spelling callers and tests use
