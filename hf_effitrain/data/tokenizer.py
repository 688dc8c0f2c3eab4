"""`train_tokenizer`: a byte-level BPE trained with `tokenizers` on a corpus' train split, cached on disk.

Byte-level BPE (GPT-2's scheme) covers every string without an unknown token and decodes back to exactly the text
it encoded, which code needs (indentation and unicode must survive). No normalizer, no prefix space, no automatic
BOS/EOS: `tokenizer(text)` holds only the text's tokens and `pack_dataset` adds the EOS separators itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .cache import cache_root, fingerprint, write_atomically

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "load_tokenizer",
    "minimum_vocab_size",
    "train_tokenizer",
]

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN)
_BYTE_ALPHABET = 256
# bump when the tokenizer recipe changes, so old cache entries are not reused
_TOKENIZER_FORMAT = "bytelevel-bpe-v1"


def minimum_vocab_size() -> int:
    """The smallest vocabulary a byte-level BPE can have: the 256 byte symbols plus the special tokens."""
    return _BYTE_ALPHABET + len(SPECIAL_TOKENS)


def _sample_indices(lengths: np.ndarray, max_train_chars: int | None) -> np.ndarray | None:
    """Indices of whole documents in a fixed random order until `max_train_chars` (None: take everything).

    A spread-out, reproducible sample: the same corpus always trains the same tokenizer.
    """
    if max_train_chars is None or int(lengths.sum()) <= max_train_chars:
        return None
    order = np.random.default_rng(0).permutation(len(lengths))
    # keep documents while the characters before them are under the budget (the last one may cross it)
    before = np.cumsum(lengths[order]) - lengths[order]
    return order[before < max_train_chars]


def _train_texts(corpus_or_texts, text_column: str, max_train_chars: int | None) -> list[str]:
    if isinstance(corpus_or_texts, DatasetDict):
        if "train" not in corpus_or_texts:
            splits = list(corpus_or_texts)
            raise ValueError(f"the corpus has no 'train' split to train the tokenizer on; its splits are {splits}")
        corpus_or_texts = corpus_or_texts["train"]
    if isinstance(corpus_or_texts, Dataset):
        if text_column not in corpus_or_texts.column_names:
            columns = corpus_or_texts.column_names
            raise ValueError(f"no text column {text_column!r}; the dataset's columns are {columns}")
        column = corpus_or_texts.with_format("arrow")[text_column]
        lengths = pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)
        indices = _sample_indices(lengths, max_train_chars)
        subset = corpus_or_texts if indices is None else corpus_or_texts.select(indices)
        return [text for text in subset[text_column] if text is not None]
    if isinstance(corpus_or_texts, str) or not isinstance(corpus_or_texts, Iterable):
        raise TypeError(
            "train_tokenizer needs a DatasetDict, a Dataset or an iterable of strings, "
            f"got {type(corpus_or_texts).__name__}"
        )
    texts = list(corpus_or_texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"train_tokenizer texts must be strings, got a {type(bad).__name__}")
    indices = _sample_indices(np.array([len(t) for t in texts], dtype=np.int64), max_train_chars)
    return texts if indices is None else [texts[i] for i in indices]


def _batches(texts: list[str], size: int = 256) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


def _train_bpe(texts: list[str], vocab_size: int, min_frequency: int, show_progress: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # all 256 byte symbols, even those the sample lacks: any later text still encodes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer, length=len(texts))
    return tokenizer


def _wrap(tokenizer: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        # "a ." must not come back as "a." : decode(encode(text)) == text
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    corpus_or_texts: DatasetDict | Dataset | Iterable[str],
    vocab_size: int = 8192,
    *,
    text_column: str = "text",
    min_frequency: int = 2,
    max_train_chars: int | None = 20_000_000,
    model_max_length: int = 2048,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train (or load from the cache) a byte-level BPE tokenizer with `<|bos|>`, `<|endoftext|>` (EOS), `<|pad|>`.

    Args:
        corpus_or_texts (`DatasetDict`, `Dataset` or iterable of `str`):
            Training text; for a `DatasetDict` only its `train` split is used, so held-out text never shapes the
            vocabulary.
        vocab_size (`int`, *optional*, defaults to 8192):
            Target vocabulary size including the 256 byte symbols and 3 special tokens (at least 259). A small
            corpus can end below it when no pair reaches `min_frequency`.
        min_frequency (`int`, *optional*, defaults to 2): a pair is merged only if it occurs this often.
        max_train_chars (`int`, *optional*, defaults to 20,000,000):
            Train on whole documents drawn in a fixed random order up to this many characters (`None`: all). BPE
            training time and memory grow with the text; 20M characters take about a minute on 2 cores.
        model_max_length (`int`, *optional*, defaults to 2048): stored on the tokenizer (longest sequence the
            model it goes with is meant to take); packing cuts blocks itself and ignores it.
        cache_dir (`str`, *optional*):
            Cache root (default `$HF_EFFITRAIN_CACHE` or `~/.cache/hf_effitrain`); tokenizers are stored under
            `<root>/tokenizers/`, keyed by a fingerprint of the training text and every option above.
        use_cache (`bool`, *optional*, defaults to `True`): set `False` to always train.
        show_progress (`bool`, *optional*, defaults to `False`): show `tokenizers`' training progress bar.

    Returns:
        `PreTrainedTokenizerFast` with `bos_token`, `eos_token` and `pad_token` set; `len(tokenizer)` is the
        vocabulary size a model should be built with.
    """
    if not isinstance(vocab_size, int) or vocab_size < minimum_vocab_size():
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small for a byte-level BPE: the minimum is {minimum_vocab_size()} "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency!r}")
    texts = _train_texts(corpus_or_texts, text_column, max_train_chars)
    if not any(text.strip() for text in texts):
        raise ValueError("train_tokenizer got no text to train on (the train split is empty or blank)")
    key = fingerprint([_TOKENIZER_FORMAT, vocab_size, min_frequency, model_max_length, SPECIAL_TOKENS, *texts])
    target = cache_root(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}"
    if use_cache and target.is_dir():
        logger.info("loading cached tokenizer from %s", target)
        return PreTrainedTokenizerFast.from_pretrained(str(target))
    logger.info(
        "training a byte-level BPE (vocab %d) on %d documents, %d characters",
        vocab_size,
        len(texts),
        sum(map(len, texts)),
    )
    tokenizer = _wrap(_train_bpe(texts, vocab_size, min_frequency, show_progress), model_max_length)
    if len(tokenizer) < vocab_size:
        logger.info(
            "the tokenizer has %d tokens (< %d asked): no more pairs reach min_frequency=%d",
            len(tokenizer),
            vocab_size,
            min_frequency,
        )
    if use_cache:
        write_atomically(target, lambda tmp: tokenizer.save_pretrained(str(tmp)))
        logger.info("saved the tokenizer to %s", target)
    return tokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer exactly as saved.

    Our checkpoints carry a `tokenizer.json` trained by `hf_effitrain.data.train_tokenizer`. `AutoTokenizer` in
    transformers 5 picks the class from the config's `model_type` for some types (qwen2) and rebuilds that class's
    own pre-tokenizer, which encodes differently; `PreTrainedTokenizerFast` reads `tokenizer.json` as it is.
    Folders without one (a Hub tokenizer) go through `AutoTokenizer`.
    """
    if Path(path, "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
