"""On-disk cache for built corpora and trained tokenizers.

Everything the data layer builds is keyed by a content fingerprint, so a second call with the same inputs loads the
result instead of rebuilding it. The root is `cache_dir` when a caller passes one, else `$HF_EFFITRAIN_CACHE`, else
`~/.cache/hf_effitrain` (tests point the environment variable at a temporary directory).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "cache_root", "fingerprint", "write_atomically"]

CACHE_ENV_VAR = "HF_EFFITRAIN_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir`, else `$HF_EFFITRAIN_CACHE`, else `~/.cache/hf_effitrain`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_effitrain"


def fingerprint(parts: Iterable[object]) -> str:
    """A hex digest of `parts` (strings, numbers, tuples...), separated so that ("ab", "c") != ("a", "bc")."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else repr(part).encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` then rename `tmp_dir` to `target`, so readers never see a half-written cache entry.

    Two processes building the same entry at once both succeed: the second rename loses and its copy is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
