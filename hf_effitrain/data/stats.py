"""`corpus_stats`: documents, characters and (with a tokenizer) tokens per split, plus a one-line summary to log."""

from __future__ import annotations

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from .encoding import encode_texts

__all__ = ["corpus_stats", "format_corpus_stats"]


def _split_stats(dataset: Dataset, tokenizer, text_column: str, batch_size: int) -> dict:
    if text_column not in dataset.column_names:
        raise ValueError(f"no text column {text_column!r}; the dataset's columns are {dataset.column_names}")
    stats = {"documents": len(dataset), "characters": 0}
    if tokenizer is not None:
        stats["tokens"] = 0
    # arrow batches: characters are counted in arrow, without building Python strings
    for batch in dataset.select_columns([text_column]).with_format("arrow").iter(batch_size=batch_size):
        column = batch[text_column]
        stats["characters"] += pc.sum(pc.utf8_length(column)).as_py() or 0
        if tokenizer is not None:
            stats["tokens"] += sum(map(len, encode_texts(tokenizer, [text or "" for text in column.to_pylist()])))
    return stats


def corpus_stats(
    corpus: DatasetDict | Dataset, tokenizer=None, *, text_column: str = "text", batch_size: int = 1000
) -> dict:
    """Size of a corpus per split: `documents`, `characters` and, when `tokenizer` is given, `tokens`.

    Tokens are counted without special tokens (packing adds one EOS per document on top). Returns
    `{"splits": {name: {...}}, "total": {...}}`; `format_corpus_stats` turns it into one line for a log.
    """
    if isinstance(corpus, Dataset):
        corpus = DatasetDict({"train": corpus})
    if not isinstance(corpus, DatasetDict):
        raise TypeError(f"corpus_stats needs a DatasetDict or Dataset, got {type(corpus).__name__}")
    splits = {name: _split_stats(dataset, tokenizer, text_column, batch_size) for name, dataset in corpus.items()}
    total = {key: sum(split[key] for split in splits.values()) for key in next(iter(splits.values()), {})}
    return {"splits": splits, "total": total}


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_corpus_stats(stats: dict) -> str:
    """One line such as `train 1720 docs 30.1M chars 9.2M tokens | validation ... | total ...`."""
    parts = []
    for name, split in [*stats["splits"].items(), ("total", stats["total"])]:
        fields = [f"{split['documents']} docs", f"{_human(split['characters'])} chars"]
        if "tokens" in split:
            fields.append(f"{_human(split['tokens'])} tokens")
        parts.append(f"{name} " + " ".join(fields))
    return " | ".join(parts)
