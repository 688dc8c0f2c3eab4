"""Static draft trees for Jacobi / TR-Jacobi decoding, precomputed once per `generate` call as index tensors.

A tree is a list of nodes, each named by the candidate columns along its path from the root: node `(c1, ..., cd)` sits
at depth `d` and carries the token in column `cd` of row `d - 1` of the step's candidate table. A node's token
therefore depends only on its depth and column (as in Medusa and the MSN paper's TR-Jacobi), which lets the whole
tree be filled with one gather. Plain Jacobi is the special case of a single chain `(0,), (0, 0), ...` over a table of
width 1 (the previous step's greedy predictions).

This file ships inside checkpoints (`hub/`): it imports only the standard library and torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DEFAULT_TREE", "DraftTree", "SuffixIndex", "chain_nodes", "tr_jacobi_nodes"]

# The TR-Jacobi template: 63 top-k nodes shaped like the MSN paper's (depth histogram of the top-k part
# {1: 10, 2: 28, 3: 23, 4: 2}); with the 5-node retrieval chain added it has 68 draft nodes + the root = 69 tokens.
_DEPTH1 = [(c,) for c in range(10)]
_DEPTH2 = [(p, c) for p, width in ((0, 10), (1, 6), (2, 4), (3, 3), (4, 2), (5, 1), (6, 1), (7, 1)) for c in range(width)]
_DEPTH3 = [
    (*p, c)
    for p, width in (((0, 0), 8), ((0, 1), 4), ((1, 0), 4), ((0, 2), 2), ((2, 0), 2), ((1, 1), 1), ((0, 3), 1), ((3, 0), 1))
    for c in range(width)
]
_DEPTH4 = [(0, 0, 0, 0), (0, 0, 0, 1)]
DEFAULT_TREE: tuple[tuple[int, ...], ...] = tuple(_DEPTH1 + _DEPTH2 + _DEPTH3 + _DEPTH4)


def chain_nodes(length: int, column: int = 0) -> list[tuple[int, ...]]:
    """A single chain of `length` nodes all reading `column` (Jacobi drafts, or the retrieval branch)."""
    return [(column,) * depth for depth in range(1, length + 1)]


def tr_jacobi_nodes(depth: int, top_k: int, retrieval_length: int) -> list[tuple[int, ...]]:
    """The default TR-Jacobi tree cut to `depth` levels and `top_k` columns, plus a retrieval chain in column `top_k`."""
    nodes = [node for node in DEFAULT_TREE if len(node) <= depth and max(node) < top_k]
    return nodes + chain_nodes(min(retrieval_length, depth), column=top_k)


@dataclass
class DraftTree:
    """Index tensors of a static tree (root = node 0), sorted by depth so every prefix of nodes is itself a tree.

    Attributes:
        nodes: the draft nodes as column paths (the root is implicit).
        depth: `(N,)` depth of each node, 0 for the root (positions are `root_position + depth`).
        rows, columns: `(N - 1,)` candidate-table cell of each draft node.
        paths: `(P, max_depth + 1)` node indices of every root-to-leaf path, padded with 0 where `valid` is False
            (`path_lists`: the same paths, unpadded, on the host).
        valid: `(P, max_depth + 1)` which path slots hold a node (padding never counts as a match: exact).
        bias: `(N, N)` additive attention bias, 0 where a node sees an ancestor or itself, `min` elsewhere.
        ancestors: for each node, the draft nodes on its path (root excluded), used only by logits processors.
    """

    nodes: list[tuple[int, ...]]
    device: torch.device
    dtype: torch.dtype
    depth: torch.Tensor = field(init=False)
    rows: torch.Tensor = field(init=False)
    columns: torch.Tensor = field(init=False)
    paths: torch.Tensor = field(init=False)
    valid: torch.Tensor = field(init=False)
    bias: torch.Tensor = field(init=False)
    ancestors: list[list[int]] = field(init=False)
    path_lists: list[list[int]] = field(init=False)
    max_depth: int = field(init=False)
    is_chain: bool = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = sorted(dict.fromkeys(self.nodes), key=len)
        index = {(): 0, **{node: i + 1 for i, node in enumerate(self.nodes)}}
        for node in self.nodes:
            if node[:-1] not in index:
                raise ValueError(f"Draft tree node {node} has no parent {node[:-1]} in the tree.")
        n = len(index)
        self.max_depth = max((len(node) for node in self.nodes), default=0)
        self.ancestors = [[]] + [[index[node[:d]] for d in range(1, len(node) + 1)] for node in self.nodes]
        visible = torch.zeros(n, n, dtype=torch.bool)
        for i, anc in enumerate(self.ancestors):
            visible[i, [0, *anc]] = True
        parents = {node[:-1] for node in self.nodes}
        leaves = [node for node in self.nodes if node not in parents] or [()]
        paths = [[0] + [index[leaf[:d]] for d in range(1, len(leaf) + 1)] for leaf in leaves]
        width = self.max_depth + 1
        self.is_chain = len(paths) == 1 and len(paths[0]) == n
        kw = {"device": self.device}
        self.depth = torch.tensor([0] + [len(node) for node in self.nodes], dtype=torch.long, **kw)
        self.rows = torch.tensor([len(node) - 1 for node in self.nodes], dtype=torch.long, **kw)
        self.columns = torch.tensor([node[-1] for node in self.nodes], dtype=torch.long, **kw)
        self.paths = torch.tensor([p + [0] * (width - len(p)) for p in paths], dtype=torch.long, **kw)
        self.valid = torch.tensor([[True] * len(p) + [False] * (width - len(p)) for p in paths], **kw)
        self.path_lists = paths
        bias = torch.zeros(n, n, dtype=self.dtype)
        bias.masked_fill_(~visible, torch.finfo(self.dtype).min)
        self.bias = bias.to(self.device)

    @property
    def size(self) -> int:
        return len(self.nodes) + 1

    def cut(self, depth: int) -> "DraftTree":
        """The same tree without the nodes deeper than `depth` (used when few tokens remain before `max_length`)."""
        return DraftTree([node for node in self.nodes if len(node) <= depth], self.device, self.dtype)


class SuffixIndex:
    """Host-side n-gram index of the verified text for the retrieval chain (prompt-lookup style, no datastore).

    `lookup` returns the tokens that followed the EARLIEST earlier occurrence of the longest suffix (up to
    `max_ngram` tokens) of the text. Every n-gram is indexed once, when the token after it is known, so a step
    costs a few dict operations on the tokens the acceptance sync already brought to the host: no device work.
    """

    def __init__(self, tokens: list[int], max_ngram: int):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.first: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its first occurrence
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        start = max(len(self.tokens) - 1, 0)
        self.tokens.extend(tokens)
        for end in range(start, len(self.tokens) - 1):  # n-grams ending at `end` now have a continuation
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self.first.setdefault(tuple(self.tokens[end - n + 1 : end + 1]), end + 1)

    def lookup(self, length: int) -> list[int]:
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            position = self.first.get(tuple(self.tokens[-n:]))
            if position is not None:
                return self.tokens[position : position + length]
        return []
