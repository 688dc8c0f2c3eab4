"""Draft trees sized for the device and for what is being accepted (`tree="auto"`).

Each step verifies the tree that maximises expected new tokens per second:

- **Cost** (`ForwardCost`): the model's forward time for 1..N new tokens over the cache with a tree mask, measured
  once on its device (a handful of forwards right after the first prefill, rolled back) and cached per model,
  device, dtype and thread count. On a GPU the curve is flat to ~64 tokens (many drafts are free); on a small CPU
  model it is not (here 4.7 / 5.6 / 9.2 ms for 1 / 16 / 69 tokens), so the same statistics give smaller trees.
- **Acceptance** (`AcceptanceStats`): every draft cell (a depth and a candidate) has a kind (`pred`: a top-k
  prediction from the previous step, `suffix` / `store`: a retrieval branch, `fill`: a token drawn from the history)
  and a confidence (the model's probability, or the retrieval frequency share). Hits and tries are counted per
  (kind, depth, confidence bin) at every depth whose true token the step revealed, and the calibrated probability is
  their ratio shrunk towards the raw confidence (EAGLE-2 uses the raw confidence; calibration makes it honest for
  models whose noisy-prefix predictions are over-confident).
- **Selection** (`select_tree`): best-first expansion by path probability (a node's probability is the product of
  its cells' along the path, so the best tree of n nodes is the n most probable nodes, Sequoia's observation under
  this positional model), then the size whose `(1 + sum of probabilities) / (cost(size) + overhead)` is largest.
  Size 0 is plain greedy's step; drafts are kept only where they pay.

This file ships inside checkpoints (`hub/`): it imports only the standard library and torch.
"""

from __future__ import annotations

import heapq
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

__all__ = ["AcceptanceStats", "Cell", "ForwardCost", "StepTree", "forward_cost", "select_tree", "static_step_tree"]

_KINDS = ("pred", "suffix", "store", "fill")
_PRIOR_WEIGHT = 4.0  # pseudo-tries that pull a bin's estimate towards its raw confidence
_FILL_PRIOR = 0.02
_BINS = 8
_MAX_DEPTH_BUCKET = 4
_PATIENCE = 6  # nodes added without a better rate before the expansion stops


class Cell(NamedTuple):
    """One draft candidate: its token, kind, raw confidence, and the retrieval branch it belongs to (-1: none).

    A named tuple, not a dataclass: a step builds up to ~100 of them, and a tuple is built about 2.5x faster.
    """

    token: int
    kind: str
    confidence: float
    branch: int = -1


class AcceptanceStats:
    """Running hit / try counts per (kind, depth bucket, confidence bin); calibrated acceptance probabilities."""

    def __init__(self):
        self.hits: dict[tuple, float] = {}
        self.tries: dict[tuple, float] = {}

    @staticmethod
    def _key(kind: str, depth: int, confidence: float) -> tuple:
        return kind, min(depth, _MAX_DEPTH_BUCKET), min(int(confidence * _BINS), _BINS - 1)

    def estimate(self, kind: str, depth: int, confidence: float) -> float:
        key = self._key(kind, depth, confidence)
        prior = _FILL_PRIOR if kind == "fill" else confidence
        return (self.hits.get(key, 0.0) + _PRIOR_WEIGHT * prior) / (self.tries.get(key, 0.0) + _PRIOR_WEIGHT)

    def estimate_row(self, row: list[Cell], depth: int) -> list[float]:
        """`estimate` of every cell of one row (one call per row: the tree selection runs it every step)."""
        bucket, hits, tries = min(depth, _MAX_DEPTH_BUCKET), self.hits, self.tries
        estimates = []
        for token, kind, confidence, _ in row:
            key = (kind, bucket, min(int(confidence * _BINS), _BINS - 1))
            prior = _FILL_PRIOR if kind == "fill" else confidence
            estimates.append((hits.get(key, 0.0) + _PRIOR_WEIGHT * prior) / (tries.get(key, 0.0) + _PRIOR_WEIGHT))
        return estimates

    def update(self, rows: list[list[Cell]], truth: list[int]) -> None:
        """Count every cell of the rows whose true token is known (`truth[d]` for row `d`)."""
        for depth, (row, token) in enumerate(zip(rows, truth), start=1):
            for cell in row:
                key = self._key(cell.kind, depth, cell.confidence)
                self.tries[key] = self.tries.get(key, 0.0) + 1.0
                if cell.token == token:
                    self.hits[key] = self.hits.get(key, 0.0) + 1.0


class ForwardCost:
    """Forward seconds of the model for `n` new tokens, interpolated from measured sizes.

    Args:
        sizes (`list[int]`): the measured token counts (ascending, starting at 1).
        seconds (`list[float]`): the measured times (made non-decreasing).
    """

    def __init__(self, sizes: list[int], seconds: list[float]):
        self.sizes = list(sizes)
        self._table: list[float] = []
        self.seconds = []
        for value in seconds:  # a timing blip must not make a bigger tree look cheaper
            self.seconds.append(max(value, self.seconds[-1]) if self.seconds else value)

    def __call__(self, n: int) -> float:
        table = self._table
        if n < len(table):
            return table[n]
        self._table = [self._interpolate(i) for i in range(max(2 * n, 16))]  # select_tree asks per node: a lookup
        return self._table[n]

    def observe(self, n: int, seconds: float) -> None:
        """Lower the cost of `n` tokens to a step's measured forward time when that was cheaper (a burst of load during
        the one-off measurement must not keep a size looking expensive)."""
        self(n)  # makes sure the table covers n
        if seconds < self._table[n]:
            self._table[n] = seconds

    def _interpolate(self, n: int) -> float:
        sizes, seconds = self.sizes, self.seconds
        if n <= sizes[0]:
            return seconds[0]
        for i in range(1, len(sizes)):
            if n <= sizes[i]:
                w = (n - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
                return seconds[i - 1] + w * (seconds[i] - seconds[i - 1])
        slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else 0.0
        return seconds[-1] + slope * (n - sizes[-1])

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "seconds": self.seconds}


_COSTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, ForwardCost]]" = weakref.WeakKeyDictionary()


def forward_cost(model: torch.nn.Module, max_tokens: int, run: Callable[[int], None], repeats: int = 3) -> ForwardCost:
    """The model's `ForwardCost` up to `max_tokens` tokens, measured with `run(n)` (one forward of n tokens) once.

    Cached per model, device, dtype and thread count (a later call with a larger `max_tokens` measures again).
    """
    param = next(model.parameters())
    key = (param.device.type, param.device.index, param.dtype, torch.get_num_threads())
    per_model = _COSTS.setdefault(model, {})
    cached = per_model.get(key)
    if cached is not None and cached.sizes[-1] >= max_tokens:
        return cached
    sizes = sorted({n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128) if n < max_tokens} | {max_tokens})
    run(sizes[-1])  # warm-up at the largest shape (allocator)
    seconds = [float("inf")] * len(sizes)
    for _ in range(repeats):  # rounds over all sizes, minimum per size: a burst of load hits one round, not one size
        for i, n in enumerate(sizes):
            if param.device.type == "cuda":
                torch.cuda.synchronize(param.device)
            start = time.perf_counter()
            run(n)
            if param.device.type == "cuda":
                torch.cuda.synchronize(param.device)
            seconds[i] = min(seconds[i], time.perf_counter() - start)
    per_model[key] = ForwardCost(sizes, seconds)
    return per_model[key]


@dataclass
class StepTree:
    """One step's tree: node 0 is the root (the current token), nodes are in topological order.

    Attributes:
        parents: parent index of each draft node (`parents[i]` for node `i + 1`).
        cells: `(row, column)` of each draft node in the step's candidate rows.
        depth: depth of every node (root 0).
        children: per node, its children's indices.
        chain: whether the tree is a single chain (then the model's own causal mask is the tree mask).
        visible_rows, visible_cols: node pairs (query, key) that see each other (ancestors and self).
        values: the probability each draft node was chosen with (auto trees; empty for static ones).
    """

    parents: list[int]
    cells: list[tuple[int, int]]
    values: list[float] = field(default_factory=list)
    depth: list[int] = field(init=False)
    children: list[list[int]] = field(init=False)
    chain: bool = field(init=False)
    visible_rows: list[int] = field(init=False)
    visible_cols: list[int] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.parents) + 1
        self.depth = [0] * n
        self.children = [[] for _ in range(n)]
        ancestors: list[list[int]] = [[0]]
        rows, cols = [0], [0]
        for i, parent in enumerate(self.parents, start=1):
            self.depth[i] = self.depth[parent] + 1
            self.children[parent].append(i)
            line = ancestors[parent] + [i]
            ancestors.append(line)
            rows.extend([i] * len(line))
            cols.extend(line)
        self.chain = all(parent == i for i, parent in enumerate(self.parents))
        self.visible_rows, self.visible_cols = rows, cols
        self.ancestors = ancestors

    @property
    def size(self) -> int:
        return len(self.parents) + 1

    def accept(self, tokens: list[int], predicted: list[int]) -> list[int]:
        """The longest root path whose every draft equals greedy's prediction at its parent (node indices)."""
        best = [0]

        def walk(node: int, path: list[int]) -> None:
            nonlocal best
            if len(path) > len(best):
                best = path
            want = predicted[node]
            for child in self.children[node]:
                if tokens[child] == want:
                    walk(child, path + [child])

        walk(0, [0])
        return best

    def continuation(self, node: int) -> list[int]:
        """The nodes below `node` along first children (the most probable continuation): the rejected drafts whose
        predictions seed the next step's candidates."""
        nodes = []
        while self.children[node]:
            node = self.children[node][0]
            nodes.append(node)
        return nodes


def static_step_tree(nodes: list[tuple[int, ...]]) -> StepTree:
    """A `StepTree` from column paths (node `(c1, ..., cd)` reads column `cd` of row `d - 1`), sorted by depth."""
    nodes = sorted(dict.fromkeys(nodes), key=len)
    index = {(): 0}
    parents, cells = [], []
    for i, node in enumerate(nodes, start=1):
        if node[:-1] not in index:
            raise ValueError(f"Draft tree node {node} has no parent {node[:-1]} in the tree.")
        index[node] = i
        parents.append(index[node[:-1]])
        cells.append((len(node) - 1, node[-1]))
    return StepTree(parents, cells)


def select_tree(
    rows: list[list[Cell]],
    stats: AcceptanceStats,
    cost: ForwardCost,
    overhead: float,
    budget: int,
    spine_bonus: float = 0.0,
) -> StepTree:
    """The tree of at most `budget` draft nodes that maximises expected new tokens per second.

    Args:
        rows (`list[list[Cell]]`): per depth (row 0 = depth 1) the step's candidates.
        stats (`AcceptanceStats`): calibrated acceptance per cell.
        cost (`ForwardCost`): forward seconds per tree size (root included).
        overhead (`float`): seconds a step costs besides the forward.
        budget (`int`): most draft nodes.
        spine_bonus (`float`): value added to a `pred` / `fill` node that opens the first-choice chain (its
            prediction seeds the next step's candidates), times its parent's probability.
    Returns:
        `StepTree`: possibly the root alone (a plain greedy step).
    """
    if budget < 1 or not rows:
        return StepTree([], [])
    # Per row, built when the expansion first reaches it (it usually stops a few rows deep): the calibrated
    # probabilities, the shared candidates sorted by them, and the cell of each retrieval branch.
    probs: list[list[float] | None] = [None] * len(rows)
    shared: list[list[int]] = [[]] * len(rows)
    by_branch: list[dict[int, int]] = [{}] * len(rows)

    def prepare(d: int) -> list[float]:
        p = probs[d]
        if p is None:
            row = rows[d]
            p = probs[d] = stats.estimate_row(row, d + 1)
            shared[d] = sorted((j for j, c in enumerate(row) if c.branch < 0), key=p.__getitem__, reverse=True)
            by_branch[d] = {c.branch: j for j, c in enumerate(row) if c.branch >= 0}
        return p

    def options(d: int, branch: int) -> list[int]:
        """Candidates of row `d` under a node of `branch` (-1: a shared node; retrieval only continues its own)."""
        if d >= len(rows):
            return []
        p = prepare(d)
        own = by_branch[d].get(branch) if branch >= 0 else None
        return shared[d] if own is None else sorted([own, *shared[d]], key=p.__getitem__, reverse=True)

    root_order = sorted(range(len(rows[0])), key=prepare(0).__getitem__, reverse=True)

    parents: list[int] = []
    cells: list[tuple[int, int]] = []
    values: list[float] = []
    seen: dict[tuple[int, int], int] = {}  # (parent, token) -> node: siblings never repeat a token
    heap: list[tuple[float, int, int, float, int, list[int], int]] = []
    counter = 0

    def push(parent: int, parent_prob: float, d: int, order: list[int], k: int) -> None:
        nonlocal counter
        if k < len(order):
            j = order[k]
            prob = parent_prob * probs[d][j]
            score = prob + (spine_bonus * parent_prob if k == 0 and rows[d][j].kind in ("pred", "fill") else 0.0)
            counter += 1
            heapq.heappush(heap, (-score, counter, parent, prob, d, order, k))

    node_prob = [1.0]
    push(0, 1.0, 0, root_order, 0)
    gain, best_rate, since_best = 1.0, 1.0 / (cost(1) + overhead), 0
    while heap and len(parents) < budget and since_best < _PATIENCE:
        neg_score, _, parent, prob, d, order, k = heapq.heappop(heap)
        push(parent, node_prob[parent], d, order, k + 1)  # the next sibling
        cell = rows[d][order[k]]
        twin = seen.get((parent, cell.token))
        if twin is not None:  # the same token already sits here: let a retrieval branch continue under it
            if cell.branch >= 0 and d + 1 < len(rows):
                prepare(d + 1)
                own = by_branch[d + 1].get(cell.branch)
                if own is not None:
                    push(twin, node_prob[twin], d + 1, [own], 0)
            continue
        seen[(parent, cell.token)] = len(parents) + 1
        parents.append(parent)
        cells.append((d, order[k]))
        values.append(-neg_score)
        gain += -neg_score
        rate = gain / (cost(len(values) + 1) + overhead)
        since_best = 0 if rate > best_rate else since_best + 1  # values only shrink: stop once growth stops paying
        best_rate = max(best_rate, rate)
        node_prob.append(prob)
        push(len(parents), prob, d + 1, options(d + 1, cell.branch), 0)
    # the size with the most expected tokens per second (0 drafts: greedy's step)
    best_n, best_rate, gain = 0, 1.0 / (cost(1) + overhead), 1.0
    for n, value in enumerate(values, start=1):
        gain += value
        rate = gain / (cost(n + 1) + overhead)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return StepTree(parents[:best_n], cells[:best_n], values[:best_n])
