"""Build, save and load the retrieval datastore that `tr_jacobi` can draft from (`generate(..., datastore=...)`).

The datastore is one token stream: the documents of a corpus split (by default `train`, so held-out prompts never
retrieve their own continuations) tokenized with the model's tokenizer and joined by EOS, plus the sorted n-gram
index of `hf_effitrain.hub.retrieval_datastore.RetrievalDatastore`. On disk it is a folder of `datastore.json` and two
`.npy` arrays (no pickle); the checkpoint-side loader reads them with the standard library and torch only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from hf_effitrain.hub.retrieval_datastore import DATASTORE_FORMAT, RetrievalDatastore, vocabulary_hash

from .encoding import encode_texts

__all__ = ["build_datastore", "load_datastore", "save_datastore"]


def build_datastore(
    corpus: DatasetDict | Dataset,
    tokenizer: Any,
    *,
    split: str = "train",
    text_column: str = "text",
    max_tokens: int | None = None,
    batch_size: int = 256,
) -> RetrievalDatastore:
    """Tokenize a corpus split into a `RetrievalDatastore`.

    Args:
        corpus (`DatasetDict` or `Dataset`): e.g. `load_corpus("python", scope="site")`; of a `DatasetDict` only
            `split` is used.
        tokenizer: the model's tokenizer (its vocabulary hash is stored and checked when decoding).
        split (`str`, *optional*, defaults to `"train"`): the split to index.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the text.
        max_tokens (`int`, *optional*): stop after about this many tokens (whole documents; `None`: all).
        batch_size (`int`, *optional*, defaults to 256): documents tokenized per call.
    Returns:
        `RetrievalDatastore`.
    Raises:
        ValueError: for a missing split or column, a non-positive `max_tokens`, or a tokenizer without EOS.
    """
    if isinstance(corpus, DatasetDict):
        if split not in corpus:
            raise ValueError(f"The corpus has no {split!r} split; its splits are {list(corpus)}.")
        corpus = corpus[split]
    if text_column not in corpus.column_names:
        raise ValueError(f"No text column {text_column!r}; the dataset's columns are {corpus.column_names}.")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token to separate the datastore's documents.")
    chunks: list[np.ndarray] = []
    total = documents = 0
    for start in range(0, len(corpus), batch_size):
        texts = [t for t in corpus[start : start + batch_size][text_column] if t]
        for ids in encode_texts(tokenizer, texts):
            chunks.append(np.asarray(ids + [eos], dtype=np.int32))
            total += len(ids) + 1
            documents += 1
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    tokens = torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32))
    metadata = {"documents": documents, "tokens": int(tokens.numel()), "split": split}
    return RetrievalDatastore(tokens, len(tokenizer), vocabulary_hash(tokenizer), metadata=metadata)


def save_datastore(datastore: RetrievalDatastore, path: str | os.PathLike) -> Path:
    """Write `datastore` to the folder `path` (`datastore.json`, `tokens.npy`, `order.npy`); returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "tokens.npy", datastore.tokens.to(torch.int32).numpy(), allow_pickle=False)
    np.save(path / "order.npy", datastore.order.to(torch.int64).numpy(), allow_pickle=False)
    meta = {
        "format": DATASTORE_FORMAT,
        "vocab_size": datastore.vocab_size,
        "vocab_hash": datastore.vocab_hash,
        "key_tokens": datastore.key_tokens,
        "metadata": datastore.metadata,
    }
    (path / "datastore.json").write_text(json.dumps(meta, indent=1))
    return path


def load_datastore(path: str | os.PathLike, tokenizer: Any | None = None) -> RetrievalDatastore:
    """Load a saved datastore; with `tokenizer`, refuse one built with another vocabulary (ValueError)."""
    return RetrievalDatastore.load(path, tokenizer=tokenizer)
