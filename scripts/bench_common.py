"""What every benchmark script under `scripts/` shares: its common options and the record of the run.

Options (`add_common_arguments`): `--size` (the benchmark size: the script's CPU sizes and `gpu`), `--output` (the
JSON path, or the path prefix of the JSON and PNGs; either form is accepted, see `output_stem`) and, for scripts that
can choose, `--device`. Multi-word options are spelled with dashes (`--max-files`); the old underscore spellings keep
working as aliases (`option_names`).

Record (`run_record`): device, UTC date, command line, versions, git commit and whether the tree had uncommitted
changes, and a digest of the sources. Where the checkout came without git metadata (a GPU machine fed a copy of the
tree), the commit is read from `wheelhouse/SOURCE.json` if that file was written for the same sources.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# recorded when installed, after python / torch / transformers (always recorded)
OPTIONAL_PACKAGES = ("trl", "peft", "datasets", "accelerate", "tokenizers", "hf-effitrain")
SOURCE_FOLDERS = ("hf_effitrain", "kernels", "scripts")
SOURCE_SUFFIXES = (".py", ".toml", ".md")


def option_names(name: str, *aliases: str) -> list[str]:
    """The option strings of `name`: the dashed spelling first (it names `dest`), then the underscore one if it
    differs, then `aliases`.

    Args:
        name (`str`): the option without leading dashes, in either spelling (`max_files` or `max-files`).
        *aliases (`str`): further option strings, with their dashes (e.g. `"--out"`).

    Returns:
        `list[str]`: e.g. `["--max-files", "--max_files"]` for `max_files`.
    """
    dashed = "--" + name.replace("_", "-")
    underscored = "--" + name.replace("-", "_")
    return [dashed, *([underscored] if underscored != dashed else []), *aliases]


def _size_type(sizes: Sequence[str]):
    """`--size` values in either spelling (`cpu_small` / `cpu-small`) mapped to the script's own name."""

    def convert(value: str) -> str:
        for candidate in (value, value.replace("-", "_"), value.replace("_", "-")):
            if candidate in sizes:
                return candidate
        return value  # argparse's `choices` check then names the allowed sizes

    return convert


def add_common_arguments(
    parser: argparse.ArgumentParser,
    sizes: Iterable[str] | None = None,
    default_size: str | None = None,
    default_output: str | None = None,
    *,
    output_help: str = "path prefix of the JSON and PNGs (a trailing .json is accepted)",
    size_aliases: Sequence[str] = (),
    output_aliases: Sequence[str] = (),
    device_default: str | None = None,
    device_choices: Sequence[str] | None = None,
    device_help: str = "torch device to run on",
) -> None:
    """Add `--size`, `--output` and (when `device_default` is given) `--device` to a benchmark's parser.

    Args:
        parser (`argparse.ArgumentParser`): the script's parser.
        sizes (`Iterable[str]`, *optional*): the script's benchmark sizes; `None`: no `--size` (the script has one
            size).
        default_size (`str`, *optional*): the size without `--size`; must be one of `sizes`.
        default_output (`str`, *optional*): `--output` without the option (`None`: the script derives it, e.g. from
            the size).
        output_help (`str`): what `--output` names for this script.
        size_aliases (`Sequence[str]`): older option strings of `--size` (e.g. `"--preset"`).
        output_aliases (`Sequence[str]`): older option strings of `--output` (e.g. `"--out"`).
        device_default (`str`, *optional*): default of `--device`; `None`: no `--device`.
        device_choices (`Sequence[str]`, *optional*): allowed `--device` values (default: any torch device string).
        device_help (`str`): what `--device` chooses for this script.

    Raises:
        ValueError: `default_size` is not one of `sizes`.
    """
    if sizes is not None:
        sizes = sorted(sizes)
        if default_size not in sizes:
            raise ValueError(f"default_size {default_size!r} is not one of the sizes {sizes}")
        parser.add_argument(
            "--size",
            *size_aliases,
            choices=sizes,
            default=default_size,
            type=_size_type(sizes),
            help=f"benchmark size (default {default_size}; `-` and `_` are interchangeable)",
        )
    parser.add_argument("--output", *output_aliases, default=default_output, help=output_help)
    if device_default is not None:
        parser.add_argument("--device", choices=device_choices, default=device_default, help=device_help)


def output_stem(output: str | os.PathLike) -> Path:
    """The path prefix of a run's files: `--output` without a trailing `.json`.

    The JSON is `<stem>.json`, the PNGs `<stem><suffix>.png` next to it, so `--output results/x` and
    `--output results/x.json` write the same files, and a dot inside the name (`patch_cpu_long_4.8M`) is kept.
    """
    path = Path(output)
    return path.with_name(path.name.removesuffix(".json"))


def with_suffix(stem: Path, suffix: str) -> Path:
    """`stem` with `suffix` appended to its name (unlike `Path.with_suffix`, a dot inside the name is kept)."""
    return stem.with_name(stem.name + suffix)


def describe_device(device: str) -> str:
    """A readable name of `device`: the GPU's name, or the CPU model with the threads torch uses.

    Args:
        device (`str`): a torch device string, `cpu` or `cuda[:index]`.

    Raises:
        ValueError: another device type.
    """
    import torch

    kind = torch.device(device)
    if kind.type == "cuda":
        return torch.cuda.get_device_name(kind.index or 0)
    if kind.type == "cpu":
        return f"CPU ({_cpu_model()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores)"
    raise ValueError(f"device {device!r}: only cpu and cuda[:index] are described")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Versions of python, torch and transformers, and of `OPTIONAL_PACKAGES` and `extra` where installed."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", *OPTIONAL_PACKAGES, *extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in ("torch", "transformers"):
                raise
    return versions


def source_digest() -> str:
    """sha256 over the package, kernel and script sources: identifies the code when no git metadata travels, and
    a dirty tree beyond its commit."""
    digest = hashlib.sha256()
    files = [
        p
        for folder in SOURCE_FOLDERS
        for p in sorted((REPO / folder).rglob("*"))
        if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
    ]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_state() -> dict:
    """`git_commit` (full sha, `None` outside a git checkout) and `git_dirty` (tracked files differ from it)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or None, "git_dirty": None if status is None else bool(status)}


def provenance() -> dict:
    """The commit of the code and the source digest: from git, or, where the tree came without git, from the
    wheelhouse's SOURCE.json when its source digest matches (the tree is the one the wheelhouse was made from)."""
    info = {**git_state(), "source_digest": source_digest()}
    if info["git_commit"] is None:
        source = REPO / "wheelhouse" / "SOURCE.json"
        if not source.is_file():
            info["commit_from"] = "unknown: no git metadata and no wheelhouse/SOURCE.json"
        elif (recorded := json.loads(source.read_text())).get("source_digest") == info["source_digest"]:
            info.update(
                git_commit=recorded.get("git_commit"),
                git_dirty=recorded.get("git_dirty"),
                commit_from="wheelhouse/SOURCE.json (same source digest)",
            )
        else:
            info["commit_from"] = "unknown: the sources differ from those wheelhouse/SOURCE.json was written for"
    return info


def run_record(device: str, extra_packages: Sequence[str] = ()) -> dict:
    """The record every benchmark JSON starts with.

    Args:
        device (`str`): the torch device the benchmark ran on (`cpu`, `cuda`, `cuda:1`).
        extra_packages (`Sequence[str]`): distributions to record besides the usual ones (e.g. `triton`).

    Returns:
        `dict`: `device` (GPU name, or CPU model and threads), `date` (UTC, ISO 8601), `command` (the interpreter
        and `sys.argv`, shell-quoted), `versions`, `platform`, `cpu_threads` (torch's), `git_commit`, `git_dirty`,
        `source_digest` (and `commit_from` where the commit did not come from git).

    Raises:
        ValueError: `device` is neither cpu nor cuda.
    """
    import torch

    return {
        "device": describe_device(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "versions": package_versions(extra_packages),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        **provenance(),
    }


def no_activation_checkpointing() -> dict[str, bool]:
    """Training-argument keywords that turn activation checkpointing off, under the name this transformers reads.

    trl's `SFTConfig` turns it on by default (`gradient_checkpointing=True`), which only slows a small CPU model down.
    transformers 5.24 renamed the field to `activation_checkpointing` and warns on the old name; 5.20 knows only the
    old one.
    """
    import dataclasses

    import transformers

    names = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}
