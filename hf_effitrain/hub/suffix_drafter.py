"""Model-free drafts from the text itself: frequency-ranked continuations of its longest recurring suffix.

SuffixDecoding-style (Oliaro et al. 2024): every n-gram (n <= `max_ngram`) of prompt + generated text counts the
tokens that followed it. A step's proposals start from the longest suffix of the text that occurred before: its
`branches` most frequent next tokens each open a branch, extended greedily by the most frequent (then most recent)
next token of the longest matching context. Each proposed token carries a confidence, the share of the context's
occurrences that it followed (`count / (total + 1)`: one occurrence gives 0.5, not certainty), raised when the text
before the branch's most recent occurrence matches the current text for longer than the context (`m` tokens,
`m > max_ngram`): the confidence's distance to 1 shrinks by `max_ngram / m`. A stretch repeated verbatim (a copied
line, a loop the model fell into) usually goes on repeating, and the auto tree, which calibrates acceptance per
confidence bin, then verifies such chains deeper (SuffixDecoding scores candidates by match length for the same
reason).

Grown incrementally: a new token costs `max_ngram` dict updates; a proposal costs a few dict lookups per token, all on
the host (the acceptance sync already brought the tokens there). Used for drafts only: exactness never depends on it.

This file ships inside checkpoints (`hub/`): it imports only the standard library.
"""

from __future__ import annotations

import bisect
import heapq

__all__ = ["SuffixDrafter"]

_MAX_MATCH = 32  # longest match counted behind a proposal's source occurrence


class SuffixDrafter:
    """N-gram continuation counts over a growing token list.

    Args:
        tokens (`list[int]`): the text so far (prompt + first token).
        max_ngram (`int`): longest context looked up.
    """

    def __init__(self, tokens: list[int], max_ngram: int):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.document_starts = [0]  # contexts and matches never reach back past the start of their document
        # context -> {next token: [count, last position]}, and context -> (total count, best next token)
        self.next: dict[tuple[int, ...], dict[int, list[int]]] = {}
        self.best: dict[tuple[int, ...], tuple[int, int]] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        start = max(len(self.tokens), 1)
        self.tokens.extend(tokens)
        t = self.tokens
        first = self.document_starts[-1]
        for end in range(max(start, first + 1), len(t)):  # t[end] follows the n-grams that end at end - 1
            token = t[end]
            for n in range(1, min(self.max_ngram, end - first) + 1):
                context = tuple(t[end - n : end])
                successors = self.next.setdefault(context, {})
                entry = successors.setdefault(token, [0, end])
                entry[0] += 1
                entry[1] = end
                total, best = self.best.get(context, (0, token))
                if entry[0] >= successors[best][0]:  # ties go to the most recent (code repeats locally)
                    best = token
                self.best[context] = (total + 1, best)

    def add_document(self, tokens: list[int]) -> None:
        """Append `tokens` as a new document: no context spans the boundary with the text before it."""
        if self.tokens:
            self.document_starts.append(len(self.tokens))
        self.extend(tokens)

    def _context(self, text: list[int]) -> tuple[int, ...] | None:
        for n in range(min(self.max_ngram, len(text)), 0, -1):
            context = tuple(text[-n:])
            if context in self.best:
                return context
        return None

    def propose(self, branches: int, length: int, text: list[int] | None = None) -> list[tuple[list[int], list[float]]]:
        """Up to `branches` continuations of up to `length` tokens, most frequent first: `(tokens, confidences)`.

        They continue `text` (default: the indexed tokens themselves, i.e. the text being generated); another text
        looks its suffix up in this index (a memory of earlier outputs)."""
        if branches < 1 or length < 1:
            return []
        text = self.tokens if text is None else text
        context = self._context(text)
        if context is None:
            return []
        successors = self.next[context]
        total = self.best[context][0]
        firsts = heapq.nlargest(branches, successors.items(), key=lambda item: (item[1][0], item[1][1]))
        proposals = []
        tail = text[-self.max_ngram :]
        for token, (count, last) in firsts:
            chain, confidences = [token], [count / (total + 1)]
            extended = tail + chain
            while len(chain) < length:
                context = self._context(extended)
                if context is None:
                    break
                total_next, best = self.best[context]
                chain.append(best)
                confidences.append(self.next[context][best][0] / (total_next + 1))
                extended.append(best)
            match = self._match_length(last, text)
            if match > self.max_ngram:  # the text repeats a longer stretch than the context: likely a copy
                shrink = self.max_ngram / match
                confidences = [1.0 - (1.0 - c) * shrink for c in confidences]
            proposals.append((chain, confidences))
        return proposals

    def _match_length(self, position: int, text: list[int]) -> int:
        """How many tokens before `position` equal `text`'s last tokens (at most `_MAX_MATCH`)."""
        t, end = self.tokens, len(text)
        floor = self.document_starts[bisect.bisect_right(self.document_starts, position) - 1]
        n, room = 0, min(_MAX_MATCH, end)
        while n < room and position - 1 - n >= floor and t[position - 1 - n] == text[end - 1 - n]:
            n += 1
        return n
