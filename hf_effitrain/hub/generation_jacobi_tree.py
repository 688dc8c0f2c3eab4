"""Static draft trees for Jacobi / TR-Jacobi decoding (`tree="msn"`, and `jacobi`'s chain).

A tree is a list of nodes, each named by the candidate columns along its path from the root: node `(c1, ..., cd)` sits
at depth `d` and carries the token in column `cd` of row `d - 1` of the step's candidate rows. A node's token
therefore depends only on its depth and column (as in Medusa and the MSN paper's TR-Jacobi). Plain Jacobi is the
special case of a single chain `(0,), (0, 0), ...` over rows of width 1 (the previous step's greedy predictions).
`draft_tree_auto.static_step_tree` turns a node list into the loop's `StepTree`.

This file ships inside checkpoints (`hub/`): it imports only the standard library.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TREE", "chain_nodes", "tr_jacobi_nodes"]

# The TR-Jacobi template: 63 top-k nodes shaped like the MSN paper's (depth histogram of the top-k part
# {1: 10, 2: 28, 3: 23, 4: 2}); with the 5-node retrieval chain added it has 68 draft nodes + the root = 69 tokens.
_DEPTH1 = [(c,) for c in range(10)]
_DEPTH2 = [
    (p, c) for p, width in ((0, 10), (1, 6), (2, 4), (3, 3), (4, 2), (5, 1), (6, 1), (7, 1)) for c in range(width)
]
_DEPTH3 = [
    (*p, c)
    for p, width in (
        ((0, 0), 8),
        ((0, 1), 4),
        ((1, 0), 4),
        ((0, 2), 2),
        ((2, 0), 2),
        ((1, 1), 1),
        ((0, 3), 1),
        ((3, 0), 1),
    )
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
