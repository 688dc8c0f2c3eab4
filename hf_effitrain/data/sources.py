"""Where corpus documents come from: the interpreter's own Python files, or local text / Python / JSON(L) files.

Each source is listed as `SourceFile`s (a stable key, the path, its size and mtime) before anything is read, so a
corpus can be fingerprinted from the listing alone and loaded from the cache without reading a file. The key is the
path relative to its root (prefixed with `stdlib/` or `site/` for the interpreter's files): it names the document in
the `path` column and decides its split, so the same environment always gets the same split.
"""

from __future__ import annotations

import json
import os
import re
import site
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "LOCAL_SUFFIXES",
    "PYTHON_SCOPES",
    "SkippedFile",
    "SourceFile",
    "local_source_files",
    "python_source_files",
    "python_source_roots",
    "read_local_documents",
    "read_text_file",
]

PYTHON_SCOPES = ("stdlib", "site", "all")
LOCAL_SUFFIXES = (".txt", ".py", ".jsonl", ".json")
# folders that never hold corpus text: bytecode caches, VCS / tool folders (".git", ".tox"), and, under the stdlib,
# the interpreter's own package folders (they belong to the `site` scope)
_SITE_DIR_NAMES = frozenset({"site-packages", "dist-packages"})
_PARAGRAPH_BREAK = re.compile(r"\r?\n[ \t\r\f\v]*\n")  # a blank line, with Windows line ends too


class SourceFile(NamedTuple):
    key: str
    path: Path
    size: int
    mtime_ns: int


class SkippedFile(Exception):
    """A file that cannot be used as text; `reason` is one of "not UTF-8", "unreadable"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def python_source_roots(scope: str) -> list[tuple[str, Path]]:
    """The (label, folder) roots of the running interpreter's Python source for `scope` ("stdlib", "site", "all")."""
    if scope not in PYTHON_SCOPES:
        raise ValueError(f"unknown Python corpus scope {scope!r}; choose one of {', '.join(PYTHON_SCOPES)}")
    roots: list[tuple[str, Path]] = []
    if scope in ("stdlib", "all"):
        roots.append(("stdlib", Path(sysconfig.get_paths()["stdlib"])))
    if scope in ("site", "all"):
        paths = sysconfig.get_paths()
        candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
        seen: set[Path] = set()
        for candidate in candidates:
            resolved = Path(candidate).resolve()
            if resolved not in seen and resolved.is_dir():
                seen.add(resolved)
                roots.append(("site", Path(candidate)))
    return roots


def _walk(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str]) -> Iterator[tuple[str, os.DirEntry]]:
    """(path relative to `root` with "/" separators, entry) for every file ending in `suffixes`, sorted."""
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in skip_dirs:
                    subfolders.append((Path(entry.path), f"{prefix}{entry.name}/"))
            elif entry.name.endswith(suffixes) and entry.is_file():
                yield f"{prefix}{entry.name}", entry
        stack.extend(reversed(subfolders))


def _source_file(key: str, entry: os.DirEntry | Path) -> SourceFile:
    stat = entry.stat()
    path = Path(entry.path if isinstance(entry, os.DirEntry) else entry)
    return SourceFile(key, path, stat.st_size, stat.st_mtime_ns)


def python_source_files(scope: str) -> list[SourceFile]:
    """Every `.py` file of `scope`, keyed `stdlib/<relative path>` or `site/<relative path>`.

    A file present under two site roots (e.g. purelib and a distro's dist-packages) is kept from the first root only,
    as `import` would pick it.
    """
    files: dict[str, SourceFile] = {}
    for label, root in python_source_roots(scope):
        skip = _SITE_DIR_NAMES if label == "stdlib" else frozenset()
        for rel, entry in _walk(root, (".py",), skip):
            key = f"{label}/{rel}"
            if key not in files:
                files[key] = _source_file(key, entry)
    return list(files.values())


def local_source_files(path: str | os.PathLike) -> tuple[list[SourceFile], bool]:
    """The text files of a local source and whether it is a single file (rows are then keyed by index)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"corpus path {str(root)!r} does not exist")
    if root.is_file():
        if not root.name.endswith(LOCAL_SUFFIXES):
            allowed = ", ".join(LOCAL_SUFFIXES)
            raise ValueError(f"corpus file {str(root)!r} has an unsupported suffix; use one of {allowed}")
        return [_source_file(root.name, root)], True
    files = [_source_file(rel, entry) for rel, entry in _walk(root, LOCAL_SUFFIXES, frozenset())]
    if not files:
        raise ValueError(f"corpus folder {str(root)!r} holds no {', '.join(LOCAL_SUFFIXES)} files, so no text")
    return files, False


def read_text_file(path: Path) -> str:
    """The UTF-8 text of `path` (a byte-order mark dropped); raises `SkippedFile` for unreadable or non-UTF-8 files."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SkippedFile("unreadable") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SkippedFile("not UTF-8") from error


def _records(file: SourceFile, text: str) -> list[dict]:
    if file.path.name.endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{file.path}:{number} is not valid JSON: {error.msg}") from error
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file.path} is not valid JSON: {error}") from error
    if not isinstance(data, list):
        raise TypeError(f"{file.path} must hold a JSON list of records, got a {type(data).__name__}")
    return data


def _record_text(record: object, text_column: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise TypeError(f"{where} is a {type(record).__name__}, expected a JSON object with a {text_column!r} key")
    if text_column not in record:
        raise ValueError(f"{where} has no text column {text_column!r}; its columns are {sorted(record)}")
    value = record[text_column]
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{where}: column {text_column!r} holds a {type(value).__name__}, expected a string")
    return value


def read_local_documents(file: SourceFile, *, text_column: str, single_file: bool) -> list[tuple[str, str]]:
    """(key, text) documents of one local file.

    A `.txt` / `.py` file in a folder is one document. JSON(L) files give one document per record (`text_column`),
    keyed `<file>#<index>`. A single `.txt` / `.py` corpus file is cut into paragraphs at blank lines, keyed the same
    way, so that it can still be split into train / validation / test.
    """
    text = read_text_file(file.path)
    if file.path.name.endswith((".jsonl", ".json")):
        records = _records(file, text)
        texts = [_record_text(row, text_column, f"{file.path} record {i}") for i, row in enumerate(records)]
    elif single_file:
        texts = _PARAGRAPH_BREAK.split(text)
    else:
        return [(file.key, text)]
    return [(f"{file.key}#{i}", doc) for i, doc in enumerate(texts) if doc is not None]
