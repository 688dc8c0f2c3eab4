"""`load_corpus`: one function for the three corpus sources (the interpreter's Python files, local files, `datasets`).

Documents are de-duplicated by content and split into train / validation / test by a hash of their key (the path
relative to its root), never by position, so the split depends only on which files exist: the same environment
always gets the same split, whatever order the file system lists them in, and a file held out of pre-training is
also held out of every dataset derived from the corpus (see `build_code_sft_dataset`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from .cache import cache_root, fingerprint, write_atomically
from .sources import (
    LOCAL_SUFFIXES,
    PYTHON_SCOPES,
    SkippedFile,
    SourceFile,
    local_source_files,
    python_source_files,
    read_local_documents,
    read_text_file,
)

__all__ = ["SPLITS", "load_corpus", "split_of"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# bump when the way a cached corpus is built changes, so old cache entries are not reused
_CORPUS_FORMAT = "corpus-v1"


def _unit_hash(text: str, salt: str) -> float:
    """A uniform number in [0, 1) that depends only on `text` (and the salt)."""
    digest = hashlib.blake2b(f"{salt}:{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(key: str, validation_fraction: float = 0.01, test_fraction: float = 0.01) -> str:
    """The split ("train", "validation" or "test") that the document `key` belongs to.

    A fixed hash of the key falls in [0, validation_fraction) for validation, in the next `test_fraction` for test.
    """
    u = _unit_hash(key, "split")
    if u < validation_fraction:
        return "validation"
    return "test" if u < validation_fraction + test_fraction else "train"


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must be < 1 to leave a train split, got "
            f"{validation_fraction} + {test_fraction}"
        )


def _unique_documents(documents: Iterable[tuple[str, str]], max_documents: int | None, counts: Counter) -> list:
    """Keep the first document of each content and stop after `max_documents`; empty documents are dropped."""
    seen: set[bytes] = set()
    kept: list[tuple[str, str]] = []
    for key, text in documents:
        if max_documents is not None and len(kept) >= max_documents:
            break
        if not text.strip():
            counts["empty"] += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in seen:
            counts["duplicate"] += 1
            continue
        seen.add(digest)
        kept.append((key, text))
    return kept


def _split_documents(documents: list[tuple[str, str]], validation_fraction: float, test_fraction: float) -> dict:
    """Documents per split, each sorted by key; a held-out split that hashing left empty gets one train document."""
    splits: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLITS}
    for key, text in sorted(documents):
        splits[split_of(key, validation_fraction, test_fraction)].append((key, text))
    for name, fraction in (("validation", validation_fraction), ("test", test_fraction)):
        # small corpora (tests, `max_files`) can hash no document into a split; an empty evaluation split would
        # break training scripts, so move the train document whose hash lies closest to the split's range
        if fraction > 0 and not splits[name] and len(splits["train"]) >= 3:
            moved = min(splits["train"], key=lambda doc: _unit_hash(doc[0], "split"))
            splits["train"].remove(moved)
            splits[name].append(moved)
            logger.info("corpus split %r was empty after hashing; moved %s from train to it", name, moved[0])
    return splits


def _to_dataset_dict(splits: dict[str, list[tuple[str, str]]]) -> DatasetDict:
    features = datasets.Features({"text": datasets.Value("string"), "path": datasets.Value("string")})
    return DatasetDict(
        {
            name: Dataset.from_dict({"text": [t for _, t in docs], "path": [k for k, _ in docs]}, features=features)
            for name, docs in splits.items()
        }
    )


def _order(key: str) -> float:
    """Documents are visited in this (hash) order, so `max_files` picks the same spread-out subset every time."""
    return _unit_hash(key, "order")


def _python_documents(files: list[SourceFile], counts: Counter) -> Iterator[tuple[str, str]]:
    for file in sorted(files, key=lambda f: _order(f.key)):
        try:
            yield file.key, read_text_file(file.path)
        except SkippedFile as skipped:
            counts[skipped.reason] += 1


def _local_documents(files: list[SourceFile], text_column: str, single_file: bool, counts: Counter) -> list:
    documents = []
    for file in files:
        try:
            documents.extend(read_local_documents(file, text_column=text_column, single_file=single_file))
        except SkippedFile as skipped:
            counts[skipped.reason] += 1
    return sorted(documents, key=lambda doc: _order(doc[0]))


def _build_from_files(
    description: str,
    documents: Callable[[Counter], Iterable[tuple[str, str]]],
    max_files: int | None,
    validation_fraction: float,
    test_fraction: float,
) -> DatasetDict:
    counts: Counter = Counter()
    kept = _unique_documents(documents(counts), max_files, counts)
    skipped = {reason: counts[reason] for reason in ("not UTF-8", "unreadable") if counts[reason]}
    if skipped:
        logger.warning("%s: skipped %s files", description, ", ".join(f"{n} {why}" for why, n in skipped.items()))
    if not kept:
        raise ValueError(f"{description} holds no text (every document is empty, unreadable or not UTF-8)")
    splits = _split_documents(kept, validation_fraction, test_fraction)
    logger.info(
        "%s: %d documents (train %d, validation %d, test %d); dropped %d duplicates, %d empty",
        description,
        len(kept),
        *(len(splits[name]) for name in SPLITS),
        counts["duplicate"],
        counts["empty"],
    )
    return _to_dataset_dict(splits)


def _save_quietly(corpus: DatasetDict, path: Path) -> None:
    """`save_to_disk` without its three progress bars per split (the build already logged a summary line)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        corpus.save_to_disk(str(path))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _cached(name: str, key_parts: Iterable[object], build: Callable[[], DatasetDict], cache_dir, use_cache: bool):
    """Load the corpus `name` from the cache when its fingerprint matches, else build and store it."""
    if not use_cache:
        return build()
    target = cache_root(cache_dir) / "corpus" / f"{name}-{fingerprint([_CORPUS_FORMAT, *key_parts])}"
    if target.is_dir():
        logger.info("loading cached corpus %s from %s", name, target)
        return datasets.load_from_disk(str(target))
    corpus = build()
    if any(len(split) == 0 for split in corpus.values()):
        # datasets 5.2 saves a zero-row split but cannot load it back (IndexError in concat_tables): keep in memory
        logger.info("corpus %s has an empty split (a fraction is 0): not cached", name)
        return corpus
    write_atomically(target, lambda tmp: _save_quietly(corpus, tmp))
    # reload from disk: the memory-mapped copy has cache files, so later `datasets.map` calls are cached too
    return datasets.load_from_disk(str(target))


def _listing_key(files: list[SourceFile]) -> list[tuple]:
    return [(f.key, str(f.path), f.size, f.mtime_ns) for f in files]


def _load_hub_dataset(name: str, text_column: str, max_files, validation_fraction, test_fraction, **kwargs):
    try:
        loaded = datasets.load_dataset(name, **kwargs)
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFound...)
        raise ValueError(
            f"could not load {name!r}: it is not a local path, not a Python scope source ('python'), and "
            f"datasets.load_dataset failed ({type(error).__name__}: {error}). Without network access a Hub dataset "
            f"loads only from the local datasets cache (HF_DATASETS_OFFLINE=1 after a first online load)."
        ) from error
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    if not isinstance(loaded, DatasetDict):
        kind = type(loaded).__name__
        raise TypeError(f"datasets.load_dataset({name!r}) returned a {kind}; streaming is not supported")
    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no 'train' split; its splits are {list(loaded)}")
    base = loaded["train"]
    if text_column not in base.column_names:
        raise ValueError(f"dataset {name!r} has no text column {text_column!r}; its columns are {base.column_names}")
    out = {}
    for split, dataset in loaded.items():
        dataset = dataset.select_columns([text_column])
        if text_column != "text":
            dataset = dataset.rename_column(text_column, "text")
        out[split] = dataset.select(range(min(max_files, len(dataset)))) if max_files is not None else dataset
    train = out["train"]
    missing = [s for s in ("validation", "test") if s not in out]
    if missing:
        # carve the missing held-out splits out of train by a hash of the row index, as for local files
        logger.info("dataset %r has no %s split; carving it from train by row hash", name, " / ".join(missing))
        fractions = {"validation": validation_fraction if "validation" in missing else 0.0}
        fractions["test"] = test_fraction if "test" in missing else 0.0
        assignment = [split_of(f"{name}#{i}", fractions["validation"], fractions["test"]) for i in range(len(train))]
        for split in [*missing, "train"]:
            out[split] = train.select([i for i, s in enumerate(assignment) if s == split])
    return DatasetDict({split: out[split] for split in SPLITS})


def _looks_local(source: str | os.PathLike) -> bool:
    """A path that exists, has a corpus file suffix, or is spelled as a path (`./x`, `/x`, `~/x`); `org/name` is not."""
    text = str(source)
    return (
        isinstance(source, os.PathLike)
        or os.path.exists(text)
        or text.endswith(LOCAL_SUFFIXES)
        or text.startswith(("/", ".", "~"))
    )


def load_corpus(
    source: str | os.PathLike = "python",
    *,
    scope: str = "stdlib",
    text_column: str = "text",
    validation_fraction: float = 0.01,
    test_fraction: float = 0.01,
    max_files: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    **load_dataset_kwargs,
) -> DatasetDict:
    """Load a text corpus as a `DatasetDict` with `train`, `validation` and `test` splits and a `text` column.

    Args:
        source (`str` or `os.PathLike`, *optional*, defaults to `"python"`):
            `"python"`: the running interpreter's own `.py` files (always available, no download). A local path: a
            `.txt` / `.py` / `.jsonl` / `.json` file or a folder of them. Anything else: a `datasets` dataset name,
            loaded with `datasets.load_dataset(source, **load_dataset_kwargs)` (offline only from its cache).
        scope (`str`, *optional*, defaults to `"stdlib"`):
            For `source="python"`: `"stdlib"` (the standard library, about 30 MB here), `"site"` (every installed
            package under site-packages, about 250 MB here) or `"all"`.
        text_column (`str`, *optional*, defaults to `"text"`):
            The column of JSON(L) records / dataset rows that holds the text; it is renamed to `text`.
        validation_fraction, test_fraction (`float`, *optional*, default to 0.01):
            Expected share of documents hashed into each held-out split.
        max_files (`int`, *optional*):
            Keep at most this many documents (files, or records of a single file), chosen by a fixed hash of their
            key so the subset is spread over the whole corpus and identical on every call. For a `datasets`
            dataset: the first `max_files` rows of each split.
        cache_dir (`str`, *optional*):
            Cache root (default `$HF_EFFITRAIN_CACHE` or `~/.cache/hf_effitrain`). Python and local corpora are
            stored under `<root>/corpus/`, keyed by a fingerprint of the file list, sizes and mtimes.
        use_cache (`bool`, *optional*, defaults to `True`): set `False` to always rebuild in memory.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test`; columns `text` and, for Python and local
        sources, `path` (the key the split was decided by: the path relative to its root, `#<index>` for records).

    Files are de-duplicated by content (the first in hash order is kept), empty files dropped, unreadable or non-UTF-8
    files skipped with one warning that counts them.
    """
    _check_fractions(validation_fraction, test_fraction)
    if max_files is not None and (not isinstance(max_files, int) or max_files < 1):
        raise ValueError(f"max_files must be a positive integer or None, got {max_files!r}")
    options = (validation_fraction, test_fraction, max_files, text_column)
    if str(source) == "python":
        files = python_source_files(scope)
        description = f"Python {scope} corpus"
        build = lambda: _build_from_files(  # noqa: E731
            description, lambda counts: _python_documents(files, counts), max_files, validation_fraction, test_fraction
        )
        return _cached(f"python-{scope}", [*options, *_listing_key(files)], build, cache_dir, use_cache)
    if scope not in PYTHON_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(PYTHON_SCOPES)}")
    if _looks_local(source):
        files, single_file = local_source_files(source)
        description = f"corpus {str(source)!r}"
        build = lambda: _build_from_files(  # noqa: E731
            description,
            lambda counts: _local_documents(files, text_column, single_file, counts),
            max_files,
            validation_fraction,
            test_fraction,
        )
        name = f"local-{Path(source).name or 'root'}"
        return _cached(name, [str(Path(source).resolve()), *options, *_listing_key(files)], build, cache_dir, use_cache)
    return _load_hub_dataset(
        str(source), text_column, max_files, validation_fraction, test_fraction, **load_dataset_kwargs
    )
