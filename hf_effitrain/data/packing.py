"""`pack_dataset`: tokenize documents and cut the EOS-separated token stream into blocks of exactly `block_size`.

Packing wastes no compute on padding: every position of every block is a real token. Both steps are `datasets.map`
calls, so they run in `num_proc` processes and are cached next to a corpus loaded from disk (a second run with the
same tokenizer and block size only reads the cache).
"""

from __future__ import annotations

import itertools
import logging

from datasets import Dataset, DatasetDict

from .cache import fingerprint
from .encoding import encode_texts

__all__ = ["pack_dataset"]

logger = logging.getLogger(__name__)

# documents per packing batch: the tail of each batch shorter than a block is dropped, which costs at most
# block_size - 1 tokens per this many documents (under 0.1% for source files of a few thousand tokens)
_GROUP_BATCH_SIZE = 1000
# bump when tokenizing or grouping changes, so that cached blocks of the old recipe are not reused
_PACK_FORMAT = "pack-v1"


def _tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what decides token ids: the Rust tokenizer's full JSON state, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return fingerprint([type(tokenizer).__name__, state, tokenizer.eos_token_id])


def _tokenize(batch: dict, tokenizer, text_column: str, eos_token_id: int) -> dict:
    ids = encode_texts(tokenizer, [text or "" for text in batch[text_column]])
    return {"input_ids": [document + [eos_token_id] for document in ids]}


def _group(batch: dict, block_size: int) -> dict:
    stream = list(itertools.chain.from_iterable(batch["input_ids"]))
    usable = len(stream) - len(stream) % block_size
    return {"input_ids": [stream[start : start + block_size] for start in range(0, usable, block_size)]}


def _pack_split(dataset: Dataset, tokenizer, block_size: int, num_proc, text_column: str, name: str) -> Dataset:
    if text_column not in dataset.column_names:
        raise ValueError(f"no text column {text_column!r}; the dataset's columns are {dataset.column_names}")
    num_proc = num_proc if num_proc and num_proc > 1 and len(dataset) >= num_proc else None
    # datasets hashes `fn_kwargs` to name its cache files, but a tokenizer does not hash the same in two processes,
    # so every new run (and every rank of a distributed run) re-tokenized; name the cache from what decides the ids
    tokenize_fp = fingerprint([_PACK_FORMAT, dataset._fingerprint, _tokenizer_fingerprint(tokenizer), text_column])
    tokenized = dataset.map(
        _tokenize,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "eos_token_id": tokenizer.eos_token_id},
        desc=f"Tokenizing {name}",
        new_fingerprint=tokenize_fp,
    )
    packed = tokenized.map(
        _group,
        batched=True,
        batch_size=_GROUP_BATCH_SIZE,
        num_proc=num_proc,
        fn_kwargs={"block_size": block_size},
        desc=f"Packing {name} into blocks of {block_size}",
        new_fingerprint=fingerprint([_PACK_FORMAT, tokenize_fp, block_size, _GROUP_BATCH_SIZE]),
    )
    if len(packed) == 0:
        logger.warning("split %r holds fewer than %d tokens: it packs to no block", name, block_size)
    return packed


def pack_dataset(
    dataset: Dataset | DatasetDict,
    tokenizer,
    block_size: int,
    *,
    num_proc: int | None = None,
    text_column: str = "text",
) -> Dataset | DatasetDict:
    """Tokenize `dataset` and pack it into rows of exactly `block_size` token ids.

    Each document is followed by the tokenizer's EOS token, the documents are concatenated, and the stream is cut
    into `block_size` blocks; the remainder shorter than a block is dropped (per batch of 1000 documents). Labels
    are left to `DataCollatorForLanguageModeling(tokenizer, mlm=False)`.

    Args:
        dataset (`Dataset` or `DatasetDict`): documents in `text_column`; a `DatasetDict` is packed split by split.
        tokenizer (`PreTrainedTokenizerBase`): any tokenizer with an `eos_token_id`.
        block_size (`int`): tokens per row, at least 2 (a causal LM predicts token t+1 from tokens <= t).
        num_proc (`int`, *optional*): worker processes for `datasets.map`.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the documents.

    Returns:
        `Dataset` (or `DatasetDict`) with one column, `input_ids`, every row `block_size` long.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("pack_dataset needs a tokenizer with an eos_token (documents are separated by EOS)")
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1 or None, got {num_proc!r}")
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {
                name: _pack_split(split, tokenizer, block_size, num_proc, text_column, name)
                for name, split in dataset.items()
            }
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(f"pack_dataset needs a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")
    return _pack_split(dataset, tokenizer, block_size, num_proc, text_column, "dataset")
