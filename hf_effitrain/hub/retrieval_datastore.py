"""A REST-style retrieval datastore: continuations of the current text's suffix looked up in a token corpus.

REST (He et al. 2024) drafts from an exact-match index over a large corpus. Here the corpus is one token stream (the
documents joined by EOS) with a suffix-array-like index: every position sorted by the `key_tokens` tokens that start
there (packed into one int64 key), so all occurrences of an n-gram (n <= `key_tokens`) form one contiguous range,
found with two `searchsorted` calls. A lookup takes the longest suffix of the text (up to `key_tokens`) that occurs,
samples up to `max_matches` of its occurrences evenly over the range, and ranks their continuations by frequency into
`branches` drafts, each token with its frequency share as confidence. Drafts only: exactness never depends on it.

On disk (no pickle): `datastore.json` (format, vocabulary size and hash, key length, document count, source) and two
`.npy` arrays, `tokens.npy` (int32) and `order.npy` (int64, the sorted positions). `hf_effitrain.data.datastore`
builds and saves one from any corpus the package loads; this module loads it with the standard library and torch
only (it ships inside checkpoints), and checks it against the model's tokenizer by the vocabulary hash.
"""

from __future__ import annotations

import ast
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch

__all__ = ["DATASTORE_FORMAT", "RetrievalDatastore", "vocabulary_hash"]

DATASTORE_FORMAT = "hf_effitrain-retrieval-datastore-1"
_NPY_DTYPES = {"<i4": torch.int32, "<i8": torch.int64}


def vocabulary_hash(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's token -> id mapping (what a datastore's ids mean)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read_npy(path: Path) -> torch.Tensor:
    """A 1-D little-endian int32 / int64 `.npy` file as a tensor, read without numpy."""
    data = path.read_bytes()
    if data[:6] != b"\x93NUMPY":
        raise ValueError(f"{path} is not a .npy file.")
    major = data[6]
    header_len, start = (
        (struct.unpack("<H", data[8:10])[0], 10) if major == 1 else (struct.unpack("<I", data[8:12])[0], 12)
    )
    header = ast.literal_eval(data[start : start + header_len].decode("latin1"))
    dtype = _NPY_DTYPES.get(header["descr"])
    if dtype is None or header["fortran_order"] or len(header["shape"]) != 1:
        raise ValueError(f"{path}: expected a 1-D int32/int64 array, got {header}.")
    return torch.frombuffer(bytearray(data[start + header_len :]), dtype=dtype)


def _key_bits(vocab_size: int) -> int:
    return max(1, vocab_size.bit_length())  # ids are stored +1 (0 = past the end), so up to vocab_size


class RetrievalDatastore:
    """Token corpus + sorted n-gram index for retrieval drafts.

    Args:
        tokens (`torch.Tensor` of shape `(T,)`): the corpus as one token stream.
        vocab_size (`int`): size of the vocabulary the ids belong to (every id must be below it).
        vocab_hash (`str`): `vocabulary_hash` of the tokenizer that produced the ids.
        order (`torch.Tensor` of shape `(T,)`, *optional*): positions sorted by their key (computed when omitted).
        metadata (`dict`, *optional*): free-form description (source corpus, document count), saved as is.
    Raises:
        ValueError: for ids outside `[0, vocab_size)` or an `order` of the wrong length.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        vocab_size: int,
        vocab_hash: str,
        order: torch.Tensor | None = None,
        metadata: dict | None = None,
    ):
        tokens = torch.as_tensor(tokens).reshape(-1).to(torch.int64)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(
                f"Datastore token ids must lie in [0, {vocab_size}); got {int(tokens.min())}..{int(tokens.max())}."
            )
        self.vocab_size, self.vocab_hash, self.metadata = vocab_size, vocab_hash, dict(metadata or {})
        self.bits = _key_bits(vocab_size)
        self.key_tokens = max(1, 63 // self.bits)
        self.tokens = tokens
        self.keys = self._keys(tokens)
        if order is None:
            self.keys, order = torch.sort(self.keys, stable=True)
        else:
            order = torch.as_tensor(order).to(torch.int64)
            if order.numel() != tokens.numel():
                raise ValueError(f"Datastore order has {order.numel()} positions for {tokens.numel()} tokens.")
            self.keys = self.keys[order]
        self.order = order
        self._tokens_list: list[int] | None = None

    def _keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per position, the next `key_tokens` tokens packed big-endian (first token in the high bits; 0-padded)."""
        padded = torch.cat([tokens + 1, tokens.new_zeros(self.key_tokens)])  # +1: 0 means "past the end"
        keys = torch.zeros_like(tokens)
        for i in range(self.key_tokens):
            keys = (keys << self.bits) | padded[i : i + tokens.numel()]
        return keys

    def __len__(self) -> int:
        return self.tokens.numel()

    # ------------------------------------------------------------------ disk
    @classmethod
    def load(cls, path: str | Path, tokenizer: Any | None = None) -> "RetrievalDatastore":
        """Load a datastore folder written by `hf_effitrain.data.datastore.save_datastore`.

        Args:
            path (`str` or `Path`): the folder holding `datastore.json`, `tokens.npy` and `order.npy`.
            tokenizer (*optional*): when given, its vocabulary hash must equal the datastore's.
        Raises:
            ValueError: for a folder that is not a datastore, or a tokenizer other than the datastore's.
        """
        path = Path(path)
        meta_path = path / "datastore.json"
        if not meta_path.is_file():
            raise ValueError(f"{path} is not a retrieval datastore folder (no datastore.json).")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != DATASTORE_FORMAT:
            raise ValueError(
                f"{meta_path}: unknown datastore format {meta.get('format')!r}; expected {DATASTORE_FORMAT!r}."
            )
        store = cls(
            _read_npy(path / "tokens.npy"),
            meta["vocab_size"],
            meta["vocab_hash"],
            _read_npy(path / "order.npy"),
            meta.get("metadata"),
        )
        if tokenizer is not None:
            store.check_tokenizer(tokenizer)
        return store

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise a ValueError unless `tokenizer` is the one the datastore was built with (vocabulary hash)."""
        theirs = vocabulary_hash(tokenizer)
        if theirs != self.vocab_hash:
            raise ValueError(
                f"The retrieval datastore was built with another tokenizer: its vocabulary hash is {self.vocab_hash[:16]}... "
                f"(vocab size {self.vocab_size}), this tokenizer's is {theirs[:16]}... (vocab size {len(tokenizer)}). "
                "Build the datastore with the model's own tokenizer."
            )

    def check_model(self, vocab_size: int) -> None:
        """Raise a ValueError if the datastore's ids can fall outside the model's vocabulary."""
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"The retrieval datastore's vocabulary ({self.vocab_size} ids) is larger than the model's ({vocab_size}): "
                "it was built with another tokenizer."
            )

    # ------------------------------------------------------------------ lookup
    def _range(self, context: list[int]) -> tuple[int, int]:
        n = len(context)
        low = 0
        for token in context:
            low = (low << self.bits) | (token + 1)
        shift = self.bits * (self.key_tokens - n)
        low, high = low << shift, ((low + 1) << shift)
        bounds = torch.searchsorted(self.keys, torch.tensor([low, high]))
        return int(bounds[0]), int(bounds[1])

    def propose(
        self, text: list[int], branches: int, length: int, max_matches: int = 64, min_ngram: int = 2
    ) -> list[tuple[list[int], list[float]]]:
        """Up to `branches` continuations (most frequent first) of the longest suffix of `text` found in the corpus.

        Returns:
            `list[tuple[list[int], list[float]]]`: per branch its tokens and each token's frequency share.
        """
        if branches < 1 or length < 1 or not len(self):
            return []
        for n in range(min(self.key_tokens, len(text)), min_ngram - 1, -1):
            context = text[-n:]
            if any(t >= self.vocab_size or t < 0 for t in context):
                return []
            low, high = self._range(context)
            if high > low:
                break
        else:
            return []
        step = max(1, (high - low) // max_matches)
        starts = self.order[low:high:step][:max_matches] + n
        offsets = starts[:, None] + torch.arange(length)
        continuations = self.tokens[offsets.clamp(max=len(self) - 1)].tolist()
        return _rank_branches(continuations, branches, length)


def _rank_branches(rows: list[list[int]], branches: int, length: int) -> list[tuple[list[int], list[float]]]:
    """Most frequent first tokens, each extended by the most frequent next token among the rows that agree so far."""
    counts: dict[int, list[list[int]]] = {}
    for row in rows:
        counts.setdefault(row[0], []).append(row)
    total = len(rows)
    proposals = []
    for first, group in sorted(counts.items(), key=lambda item: -len(item[1]))[:branches]:
        chain, confidences = [first], [len(group) / (total + 1)]
        for depth in range(1, length):
            nexts: dict[int, list[list[int]]] = {}
            for row in group:
                nexts.setdefault(row[depth], []).append(row)
            token, agreeing = max(nexts.items(), key=lambda item: len(item[1]))
            chain.append(token)
            confidences.append(len(agreeing) / (len(group) + 1))
            group = agreeing
        proposals.append((chain, confidences))
    return proposals
