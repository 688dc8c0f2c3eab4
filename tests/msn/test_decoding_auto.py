"""`tree="auto"` (device- and acceptance-sized trees) and the retrieval datastore: exact, and sized as designed."""

from __future__ import annotations

import functools

import pytest
import torch

import hf_effitrain
from hf_effitrain.data import load_corpus, train_tokenizer
from hf_effitrain.data.datastore import build_datastore, load_datastore, save_datastore
from hf_effitrain.hub import generation_jacobi
from hf_effitrain.hub.draft_memory import DraftMemory
from hf_effitrain.hub.draft_tree_auto import AcceptanceStats, Cell, ForwardCost, select_tree
from hf_effitrain.hub.retrieval_datastore import RetrievalDatastore
from tests.testing_utils import ARCHITECTURES, tiny_model


@functools.lru_cache(maxsize=None)
def _model(architecture: str):
    return tiny_model(architecture)


def _greedy(model, ids, **kwargs):
    return model.generate(ids, do_sample=False, pad_token_id=0, **kwargs)


def _tr(model, ids, **kwargs):
    return hf_effitrain.generate(
        model, ids, strategy="tr_jacobi", pad_token_id=0, return_dict_in_generate=True, **kwargs
    )


def _store(tokens: list[int], vocab_size: int = 128) -> RetrievalDatastore:
    return RetrievalDatastore(torch.tensor(tokens), vocab_size, "test-vocab")


def _rows(confidence: float, depth: int = 4, width: int = 3) -> list[list[Cell]]:
    """Per depth a first choice of `confidence` and unlikely alternatives."""
    return [[Cell(10 * d + c, "pred", confidence if c == 0 else 0.02) for c in range(width)] for d in range(depth)]


def test_select_tree_follows_cost_and_confidence():
    stats = AcceptanceStats()
    flat, steep = ForwardCost([1, 64], [1.0, 1.0]), ForwardCost([1, 2, 64], [1.0, 2.0, 64.0])
    confident = select_tree(_rows(0.9), stats, flat, 0.0, budget=12)
    assert confident.size == 13  # free drafts: the whole budget (4 rows x 3 candidates)
    assert select_tree(_rows(0.9), stats, steep, 0.0, budget=12).size == 1  # each draft doubles the cost: greedy step
    assert select_tree(_rows(0.9), stats, flat, 0.0, budget=0).size == 1
    # with a mild slope only the likely drafts pay: the first-choice chain, not the unlikely siblings
    mild = ForwardCost([1, 64], [1.0, 1.0 + 63 * 0.05])
    chosen = select_tree(_rows(0.9), stats, mild, 0.0, budget=12)
    assert 1 < chosen.size < 13 and chosen.cells[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    # calibration: a bin whose drafts never hit stops being drafted even at high raw confidence
    for _ in range(200):
        stats.update(_rows(0.9, depth=1), [-1])
    assert stats.estimate("pred", 1, 0.9) < 0.05
    assert select_tree(_rows(0.9, depth=1), stats, mild, 0.0, budget=12).size == 1


def test_select_tree_retrieval_branch_continues_only_its_own_chain():
    rows = [[Cell(1, "pred", 0.5), Cell(7, "suffix", 0.9, 0)], [Cell(2, "pred", 0.5), Cell(8, "suffix", 0.9, 0)]]
    tree = select_tree(rows, AcceptanceStats(), ForwardCost([1, 64], [1.0, 1.0]), 0.0, budget=8)
    tokens = {cell: rows[cell[0]][cell[1]].token for cell in tree.cells}
    for i, (cell, parent) in enumerate(zip(tree.cells, tree.parents), start=1):
        if rows[cell[0]][cell[1]].kind == "suffix" and parent:
            assert tokens[tree.cells[parent - 1]] == 7  # the suffix token 8 only below its own branch's 7
    # a retrieval token equal to a shared sibling is merged into it and its branch continues below
    rows = [[Cell(7, "pred", 0.95), Cell(7, "suffix", 0.9, 0)], [Cell(2, "pred", 0.1), Cell(8, "suffix", 0.9, 0)]]
    tree = select_tree(rows, AcceptanceStats(), ForwardCost([1, 64], [1.0, 1.0]), 0.0, budget=8)
    assert [rows[r][c].token for r, c in tree.cells][:2] == [7, 8] and tree.parents[:2] == [0, 1]


@pytest.mark.parametrize("tree", ["auto", "msn"])
def test_one_sync_path_of_accelerators_exact_on_cpu(monkeypatch, tree):
    """The accelerator path (greedy tokens and every row's top-k in one read) gives the same output as the CPU one."""
    monkeypatch.setattr(generation_jacobi, "_SPLIT_SYNC_DEVICES", ())
    model = _model("qwen2")
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (1, 9))
    expected = _greedy(model, ids, max_new_tokens=30)
    assert torch.equal(_tr(model, ids, max_new_tokens=30, tree=tree).sequences, expected)


def test_forward_cost_interpolates_and_never_decreases():
    cost = ForwardCost([1, 4, 8], [2.0, 1.5, 4.0])
    assert cost.seconds == [2.0, 2.0, 4.0]
    assert cost(6) == pytest.approx(3.0) and cost(16) == pytest.approx(8.0) and cost(1) == 2.0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_auto_tree_and_datastore_exact(architecture, flat_forward_cost):
    model = _model(architecture)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 10))
    expected = _greedy(model, ids, max_new_tokens=40)
    # a datastore that holds the greedy continuation itself: retrieval drafts get accepted, output unchanged
    store = _store(torch.randint(0, 128, (300,)).tolist() + expected[0].tolist() + [5, 6, 7])
    for kwargs in ({}, {"tree_budget": 0}, {"tree_budget": 64, "retrieval_branches": 0}, {"datastore": store}):
        out = _tr(model, ids, max_new_tokens=40, **kwargs)
        assert torch.equal(out.sequences, expected), kwargs
        assert len(out.tree_sizes) == out.num_forwards - 1 and sum(out.accepted_lengths) == 40
        if kwargs.get("tree_budget") == 0:
            assert set(out.tree_sizes) == {1} and out.num_forwards == 40
        if "datastore" in kwargs:
            assert out.num_forwards <= 40 // 2  # the stored continuation is copied several tokens per forward
        if kwargs.get("tree_budget", 32):
            assert out.forward_cost["sizes"][0] == 1 and len(out.forward_cost["seconds"]) == len(
                out.forward_cost["sizes"]
            )


def test_datastore_propose_save_load_and_vocabulary_check(tmp_path):
    corpus = load_corpus("python", scope="stdlib", max_files=20)
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    store = build_datastore(corpus, tokenizer, max_tokens=20_000)
    assert len(store) >= 20_000 and store.metadata["split"] == "train" and store.metadata["tokens"] == len(store)
    assert store.metadata["documents"] < len(corpus["train"])  # stopped after the document that crossed max_tokens
    text = store.tokens[100:110].tolist()
    branches = store.propose(text, branches=2, length=4)
    assert branches and len(branches[0][0]) == 4 and 0 < branches[0][1][0] < 1
    # the most frequent continuation of the suffix is proposed first
    assert branches[0][0][0] in store.tokens.tolist()
    save_datastore(store, tmp_path / "ds")
    loaded = load_datastore(tmp_path / "ds", tokenizer=tokenizer)
    assert torch.equal(loaded.tokens, store.tokens) and torch.equal(loaded.order, store.order)
    assert loaded.propose(text, 2, 4) == branches
    other = train_tokenizer(["x = 1\n" * 50, "def f(): pass\n" * 50], vocab_size=270, use_cache=False)
    with pytest.raises(ValueError, match="built with another tokenizer"):
        load_datastore(tmp_path / "ds", tokenizer=other)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    ids = torch.tensor([text])
    with pytest.raises(ValueError, match="built with another tokenizer"):
        _tr(model, ids, max_new_tokens=4, datastore=tmp_path / "ds", tokenizer=other)
    small = tiny_model("llama", vocab_size=128)
    with pytest.raises(ValueError, match=r"vocabulary \(\d+ ids\) is larger than the model's \(128\)"):
        _tr(small, torch.tensor([[1, 2]]), max_new_tokens=4, datastore=loaded)
    with pytest.raises(ValueError, match="not a retrieval datastore"):
        load_datastore(tmp_path)
    with pytest.raises(ValueError, match="tree='auto'"):
        _tr(model, ids, max_new_tokens=4, datastore=loaded, tree="msn")
    expected = _greedy(model, ids, max_new_tokens=16)
    assert torch.equal(
        _tr(model, ids, max_new_tokens=16, datastore=tmp_path / "ds", tokenizer=tokenizer).sequences, expected
    )


def test_draft_memory_proposes_from_earlier_outputs_and_stays_bounded():
    memory = DraftMemory(max_tokens=40, max_ngram=2)
    memory.add([1, 2, 3, 4, 5])
    memory.add([6, 2, 3, 9])
    # after (2, 3): 4 and 9 once each (confidence 1 / (2 + 1)), the most recent first; each continues within its own
    # output only
    assert memory.propose([8, 2, 3], branches=2, length=3) == [([9], [1 / 3]), ([4, 5], [1 / 3, 0.5])]
    assert memory.propose([5, 6], branches=1, length=2) == [([2, 3], [0.5, 0.5])]  # no context spans two outputs
    assert memory.propose([5, 7], branches=1, length=2) == []  # 5 ends an output: nothing followed it there
    for start in range(100, 150, 10):  # 50 more tokens: the oldest outputs go, at most 40 are held
        memory.add(list(range(start, start + 10)))
    assert 20 <= len(memory) <= 40 and memory.propose([2, 3], 1, 1) == []
    assert memory.propose([143], 1, 2) == [([144, 145], [0.5, 0.5])]
    memory.clear()
    assert len(memory) == 0 and memory.propose([143], 1, 2) == []
    with pytest.raises(ValueError, match="`max_tokens` must be a positive int, got 0"):
        DraftMemory(max_tokens=0)


def test_draft_memory_exact_and_learns_across_calls(flat_forward_cost):
    model = tiny_model("llama")  # its own instance: the model's default memory starts empty
    torch.manual_seed(11)
    ids = torch.randint(0, 128, (1, 12))
    expected = _greedy(model, ids, max_new_tokens=40)
    no_memory = _tr(model, ids, max_new_tokens=40, draft_memory_tokens=0)
    first = _tr(model, ids, max_new_tokens=40)  # fills the model's default memory with its output
    again = _tr(model, ids, max_new_tokens=40)  # drafts from it
    for out in (no_memory, first, again):
        assert torch.equal(out.sequences, expected)
    assert first.num_forwards == no_memory.num_forwards  # nothing remembered yet
    assert again.num_forwards <= 40 // 3  # the remembered output is copied many tokens per forward
    # an explicit memory that does not learn: the caller decides what it holds
    frozen = DraftMemory(learn=False)
    assert _tr(model, ids, max_new_tokens=40, draft_memory=frozen).num_forwards == no_memory.num_forwards
    assert len(frozen) == 0
    frozen.add(expected[0, ids.shape[1] :].tolist())
    out = _tr(model, ids, max_new_tokens=40, draft_memory=frozen)
    assert torch.equal(out.sequences, expected) and out.num_forwards <= 40 // 3
    with pytest.raises(TypeError, match="`draft_memory` must be a DraftMemory or None"):
        _tr(model, ids, max_new_tokens=4, draft_memory=[1, 2])
    with pytest.raises(ValueError, match="tree='auto'"):
        _tr(model, ids, max_new_tokens=4, draft_memory=frozen, tree="msn")
    with pytest.raises(ValueError, match="`draft_memory_tokens` must be a non-negative int, got -1"):
        _tr(model, ids, max_new_tokens=4, draft_memory_tokens=-1)
