"""A memory of earlier outputs that drafts for later generate calls (SuffixDecoding's global suffix structure).

SuffixDecoding (Oliaro et al. 2024) keeps two suffix structures: one over the current request (prompt + generated
text, `suffix_drafter.py`) and one over the outputs of earlier requests, because a model repeats its own phrasing
from one answer to the next (the same idioms, the same boilerplate, the same closing lines). `DraftMemory` is the
second one: the n-gram continuation counts of the last outputs, looked up with the current text's suffix, proposing
frequency-ranked branches to the auto tree (kind `memory`, calibrated like every other kind).

Bounded: once more than `max_tokens` are held, the oldest outputs are dropped until half of that is left and the
index is rebuilt from the rest (amortised: a rebuild per `max_tokens / 2` new tokens). Drafts only: the output of a
call never depends on what the memory holds, only its speed does. Thread-safe: lookups and additions take one lock.

This file ships inside checkpoints (`hub/`): it imports only the standard library and a single-dot sibling.
"""

from __future__ import annotations

import threading
from collections import deque

from .suffix_drafter import SuffixDrafter

__all__ = ["DraftMemory"]


class DraftMemory:
    """Outputs of earlier calls, as a suffix structure that proposes drafts to later calls.

    Args:
        max_tokens (`int`): most tokens held (the oldest outputs are dropped first).
        max_ngram (`int`): longest context looked up.
        learn (`bool`): whether a generate call that drafts from this memory adds its own output to it. A benchmark
            that must keep a prompt's own output out of its drafts passes `learn=False` and calls `add` itself.
    """

    def __init__(self, max_tokens: int = 32768, max_ngram: int = 3, learn: bool = True):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"`max_tokens` must be a positive int, got {max_tokens!r}.")
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
            raise ValueError(f"`max_ngram` must be a positive int, got {max_ngram!r}.")
        self.max_tokens, self.max_ngram, self.learn = max_tokens, max_ngram, learn
        self._documents: deque[list[int]] = deque()
        self._held = 0
        self._index = SuffixDrafter([], max_ngram)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._held

    def add(self, tokens: list[int]) -> None:
        """Remember one output (a list of token ids; longer than `max_tokens`, only its end is kept)."""
        tokens = list(tokens)[-self.max_tokens :]
        if len(tokens) < 2:
            return
        with self._lock:
            self._documents.append(tokens)
            self._held += len(tokens)
            if self._held <= self.max_tokens:
                self._index.add_document(tokens)
                return
            while self._held > self.max_tokens // 2 and len(self._documents) > 1:
                self._held -= len(self._documents.popleft())
            self._index = SuffixDrafter([], self.max_ngram)
            for document in self._documents:
                self._index.add_document(document)

    def propose(self, text: list[int], branches: int, length: int) -> list[tuple[list[int], list[float]]]:
        """Up to `branches` continuations of `text` seen in earlier outputs: `(tokens, confidences)`."""
        with self._lock:
            return self._index.propose(branches, length, text=text)

    def clear(self) -> None:
        with self._lock:
            self._documents.clear()
            self._held = 0
            self._index = SuffixDrafter([], self.max_ngram)
