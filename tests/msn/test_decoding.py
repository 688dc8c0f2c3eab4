"""Jacobi / TR-Jacobi decoding is token-for-token greedy `generate` on every tested architecture (float32)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import hf_effitrain
from hf_effitrain.hub.draft_tree_auto import static_step_tree
from hf_effitrain.hub.generation_effi import EffiGenerationMixin
from hf_effitrain.hub.generation_jacobi import (
    STRATEGY_DEFAULTS,
    JacobiGenerateOutput,
    add_strategy_defaults,
    jacobi_generate,
    tr_jacobi_generate,
)
from hf_effitrain.hub.generation_jacobi_tree import tr_jacobi_nodes
from hf_effitrain.hub.suffix_drafter import SuffixDrafter
from tests.testing_utils import ARCHITECTURES, tiny_model

STRATEGIES = ("jacobi", "tr_jacobi")
# (strategy, extra kwargs): every exactness check covers the static tree and the auto tree
VARIANTS = (("jacobi", {}), ("tr_jacobi", {"tree": "msn"}), ("tr_jacobi", {}))


@functools.lru_cache(maxsize=None)
def _model(architecture: str, attn: str = "sdpa"):
    return tiny_model(architecture, attn_implementation=attn)


def _greedy(model, ids, **kwargs):
    return model.generate(ids, do_sample=False, pad_token_id=0, **kwargs)


def _strategy(model, ids, strategy, **kwargs):
    return hf_effitrain.generate(model, ids, strategy=strategy, pad_token_id=0, **kwargs)


_EXAMPLES = dict(
    prompt=st.lists(st.integers(0, 127), min_size=1, max_size=24),
    max_new_tokens=st.integers(1, 40),
    draft_len=st.integers(1, 8),
    depth=st.integers(1, 6),
    top_k=st.integers(1, 12),
)


def _check_exact(architecture, prompt, max_new_tokens, draft_len, depth, top_k):
    model = _model(architecture)
    ids = torch.tensor([prompt])
    expected = _greedy(model, ids, max_new_tokens=max_new_tokens)
    jacobi = _strategy(model, ids, "jacobi", max_new_tokens=max_new_tokens, jacobi_draft_len=draft_len)
    tree = _strategy(
        model, ids, "tr_jacobi", max_new_tokens=max_new_tokens, tree="msn", tree_depth=depth, tree_top_k=top_k
    )
    auto = _strategy(
        model,
        ids,
        "tr_jacobi",
        max_new_tokens=max_new_tokens,
        tree_depth=depth,
        tree_top_k=top_k,
        tree_budget=draft_len * 4,
    )
    assert torch.equal(jacobi, expected)
    assert torch.equal(tree, expected)
    assert torch.equal(auto, expected)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_EXAMPLES)
def test_msn_exact_against_greedy(architecture, prompt, max_new_tokens, draft_len, depth, top_k):
    _check_exact(architecture, prompt, max_new_tokens, draft_len, depth, top_k)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_EXAMPLES)
def test_msn_exact_against_greedy_many(architecture, prompt, max_new_tokens, draft_len, depth, top_k):
    _check_exact(architecture, prompt, max_new_tokens, draft_len, depth, top_k)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_msn_exact_with_eos_mask_processors_and_scores(architecture, attn):
    model = _model(architecture, attn)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 12))
    plain = _greedy(model, ids, max_new_tokens=30)
    eos = int(plain[0, 20])  # EOS lands inside an accepted block
    left_padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    cases = [
        {"eos_token_id": eos},
        {"eos_token_id": eos, "min_new_tokens": 25},  # logits processor that depends on each node's prefix
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2, "bad_words_ids": [[5], [7, 9]]},  # row-wise: one batched call per tree depth
        {"prefix_allowed_tokens_fn": lambda batch_id, sent: list(range(64))},  # not row-wise: one call per node
        {"attention_mask": left_padded},
        {"max_new_tokens": 3},  # tree deeper than the remaining budget
    ]
    for case in cases:
        kwargs = {"max_new_tokens": 30, **case}
        expected = _greedy(model, ids, **kwargs)
        for strategy, extra in VARIANTS:
            assert torch.equal(_strategy(model, ids, strategy, **kwargs, **extra), expected), (strategy, extra, case)
    expected = _greedy(
        model, ids, max_new_tokens=20, return_dict_in_generate=True, output_scores=True, output_logits=True
    )
    for strategy, extra in VARIANTS:
        out = _strategy(
            model,
            ids,
            strategy,
            max_new_tokens=20,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **extra,
        )
        assert isinstance(out, JacobiGenerateOutput)
        assert torch.equal(out.sequences, expected.sequences)
        assert len(out.scores) == len(expected.scores) == 20
        for ours, theirs in zip(out.scores + out.logits, expected.scores + expected.logits):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1
        assert sum(out.accepted_lengths) == 20 and out.num_forwards == len(out.accepted_lengths)
        assert out.tokens_per_forward == pytest.approx(20 / out.num_forwards)
        assert len(out.tree_sizes) == out.num_forwards - 1 and all(size >= 1 for size in out.tree_sizes)


def _repeating_case():
    """A tiny model + prompt whose greedy continuation falls into a short cycle (found deterministically)."""
    model = _model("llama")
    for seed in range(50):
        torch.manual_seed(seed)
        ids = torch.randint(0, 128, (1, 8))
        tail = _greedy(model, ids, max_new_tokens=48)[0, -24:].tolist()
        if any(tail[i:] == tail[: len(tail) - i] for i in range(1, 5)):
            return model, ids
    raise AssertionError("no repeating greedy continuation found")


def test_msn_retrieval_accepts_several_tokens_per_step(flat_forward_cost):
    model, ids = _repeating_case()
    expected = _greedy(model, ids, max_new_tokens=64)
    out = _strategy(model, ids, "tr_jacobi", max_new_tokens=64, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert out.num_forwards < 64 / 2  # the cycle is copied by the retrieval chain / carried candidates
    assert max(out.accepted_lengths) >= 4
    # Retrieval alone (top-1 candidates, one column) still copies the cycle several tokens at a time.
    lean = _strategy(model, ids, "tr_jacobi", max_new_tokens=64, tree_top_k=1, return_dict_in_generate=True)
    assert torch.equal(lean.sequences, expected) and lean.num_forwards < 64


def test_msn_logits_processors_see_about_one_call_per_accepted_token(flat_forward_cost):
    class Counting(LogitsProcessor):  # a row-wise processor (repetition penalty) that counts its calls and rows
        def __init__(self):
            self.calls, self.penalty = 0, RepetitionPenaltyLogitsProcessor(1.2)

        def __call__(self, input_ids, scores):
            self.calls += input_ids.shape[0]
            return self.penalty(input_ids, scores)

    model, ids = _repeating_case()
    greedy = Counting()
    expected = _greedy(model, ids, max_new_tokens=48, logits_processor=LogitsProcessorList([greedy]))
    for strategy, extra in VARIANTS:
        ours = Counting()
        out = _strategy(
            model,
            ids,
            strategy,
            max_new_tokens=48,
            logits_processor=LogitsProcessorList([ours]),
            return_dict_in_generate=True,
            **extra,
        )
        assert torch.equal(out.sequences, expected), (strategy, extra)
        assert greedy.calls == 48
        # only the accepted path is processed (never every draft); a path cut by max_new_tokens counts whole
        assert 48 <= ours.calls <= 48 + out.num_forwards, (strategy, extra, ours.calls)
        assert ours.calls < 1 + sum(out.tree_sizes), (strategy, extra)  # what processing every node would make


def test_msn_streamer_receives_accepted_tokens(flat_forward_cost):
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.reshape(-1).tolist())

        def end(self):
            self.calls.append("end")

    model, ids = _repeating_case()
    greedy = Recorder()
    expected = _greedy(model, ids, max_new_tokens=24, streamer=greedy)
    for strategy in STRATEGIES:
        ours = Recorder()
        out = _strategy(model, ids, strategy, max_new_tokens=24, streamer=ours, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected)
        # the prompt, then each new token exactly once and alone (as greedy: text streamers decode at token boundaries)
        assert (
            ours.calls == greedy.calls == [ids[0].tolist(), *[[t] for t in expected[0, ids.shape[1] :].tolist()], "end"]
        )
    assert out.num_forwards < 24  # tr_jacobi: several tokens per forward, still streamed one by one


def test_msn_generation_config_fields_and_per_call_override(tmp_path):
    model = tiny_model("qwen2")
    add_strategy_defaults(model.generation_config)
    model.generation_config.tree_top_k = 0
    model.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert {name: getattr(loaded, name) for name in STRATEGY_DEFAULTS} == {**STRATEGY_DEFAULTS, "tree_top_k": 0}
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="tree_top_k"):  # read from the model's generation config
        _strategy(model, ids, "tr_jacobi", max_new_tokens=4)
    expected = _greedy(model, ids, max_new_tokens=8)
    assert torch.equal(_strategy(model, ids, "tr_jacobi", max_new_tokens=8, tree_top_k=3), expected)


def test_msn_effi_model_generate_strategy_and_config_default():
    class EffiLlama(EffiGenerationMixin, LlamaForCausalLM):
        pass

    base = _model("llama")
    model = EffiLlama(base.config).eval()
    model.load_state_dict(base.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = _greedy(base, ids, max_new_tokens=12)
    assert torch.equal(model.generate(ids, strategy="tr_jacobi", max_new_tokens=12, pad_token_id=0), expected)
    model.generation_config.strategy = "jacobi"  # a checkpoint may name its default strategy
    out = model.generate(ids, max_new_tokens=12, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(out, JacobiGenerateOutput) and torch.equal(out.sequences, expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"jacobi_draft_len": 0}, ValueError, "jacobi_draft_len"),
        ({"tree_depth": -1}, ValueError, "tree_depth"),
        ({"retrieval_length": 0}, ValueError, "retrieval_length"),
        ({"retrieval_ngram_size": 2.5}, TypeError, "retrieval_ngram_size"),
        ({"tree": "medusa"}, ValueError, r"Unknown `tree` 'medusa'; allowed: 'auto' .*'msn'"),
        ({"tree_budget": -3}, ValueError, "`tree_budget` must be a non-negative int, got -3"),
        ({"retrieval_branches": -1}, ValueError, "`retrieval_branches` must be a non-negative int, got -1"),
        ({"memory_branches": -2}, ValueError, "`memory_branches` must be a non-negative int, got -2"),
        ({"do_sample": True}, ValueError, "greedy only"),
        ({"num_beams": 2}, ValueError, "exact greedy"),
        ({"cache_implementation": "static"}, ValueError, "DynamicCache"),
        ({"output_attentions": True, "return_dict_in_generate": True}, ValueError, "attentions"),
    ],
)
def test_msn_decoding_errors(kwargs, error, match):
    model = _model("llama")
    strategy = "jacobi" if "jacobi_draft_len" in kwargs else "tr_jacobi"
    with pytest.raises(error, match=match):
        _strategy(model, torch.tensor([[1, 2, 3]]), strategy, max_new_tokens=5, **kwargs)


def test_msn_decoding_errors_batch_strategy_and_attention():
    model = _model("gpt2")
    with pytest.raises(ValueError, match="batch size 1"):
        _strategy(model, torch.tensor([[1, 2], [3, 4]]), "jacobi", max_new_tokens=3)
    with pytest.raises(
        ValueError, match=r"valid strategies are \['cascade', 'jacobi', 'speculative_cascade', 'tr_jacobi'\]"
    ):
        _strategy(model, torch.tensor([[1, 2]]), "medusa", max_new_tokens=3)
    flash = tiny_model("mistral")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="MistralForCausalLM.*flash_attention_2"):
        tr_jacobi_generate(flash, torch.tensor([[1, 2]]), max_new_tokens=3)
    with pytest.raises(ValueError, match="custom_generate"):
        jacobi_generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, custom_generate=lambda *a, **k: None)


def test_msn_sliding_window_jacobi_exact_and_tree_refused():
    model = tiny_model("mistral", sliding_window=8)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    expected = _greedy(model, ids, max_new_tokens=30)
    assert torch.equal(_strategy(model, ids, "jacobi", max_new_tokens=30), expected)
    with pytest.raises(ValueError, match="sliding window of 8"):
        _strategy(model, ids, "tr_jacobi", max_new_tokens=30)


def test_msn_tree_structure_and_retrieval():
    tree = static_step_tree(tr_jacobi_nodes(5, 10, 5))
    assert tree.size == 69 and max(tree.depth) == 5
    assert torch.bincount(torch.tensor(tree.depth)).tolist() == [1, 11, 29, 24, 3, 1]
    # every node sees exactly the root, its ancestors and itself
    visible = torch.zeros(tree.size, tree.size, dtype=torch.bool)
    visible[tree.visible_rows, tree.visible_cols] = True
    assert visible.sum(dim=1).tolist() == [d + 1 for d in tree.depth]
    for node, line in enumerate(tree.ancestors):
        assert line[0] == 0 and line[-1] == node and all(tree.parents[b - 1] == a for a, b in zip(line, line[1:]))
    cut = static_step_tree([node for node in tr_jacobi_nodes(5, 10, 5) if len(node) <= 2])
    assert max(cut.depth) == 2 and cut.size == 1 + 11 + 29
    # acceptance walks the longest path whose tokens equal the parent's greedy prediction
    tokens = [0] * tree.size
    predicted = list(range(100, 100 + tree.size))
    first = tree.children[0][3]
    tokens[first] = predicted[0]
    assert tree.accept(tokens, predicted) == [0, first]


def test_msn_suffix_drafter_frequency_ranked_branches():
    drafter = SuffixDrafter([4, 1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 7], max_ngram=3)
    drafter.extend([1, 2])
    branches = drafter.propose(branches=2, length=3)
    # after (1, 2): 3 twice, 7 once; each branch continues with the most frequent next token of its context
    assert [tokens for tokens, _ in branches] == [[3, 9, 1], [7, 1, 2]]
    assert branches[0][1][0] == pytest.approx(2 / 4) and branches[1][1][0] == pytest.approx(1 / 4)
    assert SuffixDrafter([5, 6, 7], 3).propose(2, 2) == [] and SuffixDrafter([7, 7], 3).propose(1, 4) == [
        ([7, 7, 7, 7], [0.5] * 4)
    ]


def test_msn_suffix_drafter_trusts_long_verbatim_repeats_more():
    # the last 8 tokens occurred before, followed by 50: a copy, more likely than a match of the 3-token context alone
    copied = SuffixDrafter([1, 2, 3, 4, 5, 6, 7, 8, 50, 1, 2, 3, 4, 5, 6, 7, 8], max_ngram=3).propose(1, 1)
    assert copied == [([50], [pytest.approx(1 - 0.5 * 3 / 8)])]
    short = SuffixDrafter([9, 6, 7, 8, 50, 1, 6, 7, 8], max_ngram=3).propose(1, 1)
    assert short == [([50], [0.5])]
