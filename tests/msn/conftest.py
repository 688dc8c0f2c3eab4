"""Fixtures of the decoding tests."""

import pytest

from hf_effitrain.hub import generation_jacobi
from hf_effitrain.hub.draft_tree_auto import ForwardCost


@pytest.fixture
def flat_forward_cost(monkeypatch):
    """The auto tree sized for a flat forward-cost curve (a GPU's, up to the tree budget) instead of one measured on
    this machine: a test that counts forwards must not depend on the machine's load while the cost is measured."""

    def flat(model, max_tokens, run, repeats=3):
        return ForwardCost([1, max_tokens], [1.0, 1.0])

    monkeypatch.setattr(generation_jacobi, "forward_cost", flat)
