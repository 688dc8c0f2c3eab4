"""`generate(strategy="cascade")`: exactness at the end points, mixed deferral, reporting and errors."""

from __future__ import annotations

import math

import pytest
import torch

from hf_effitrain.hub.generation_cascade import CascadeGenerateOutput, cascade_generate
from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM
from tests.cascade.cascade_helpers import prompts, tiny_pair
from tests.testing_utils import ARCHITECTURES

MAX_NEW = 10


def _eos_hit_by(model, ids, mask) -> int:
    """A token the model emits early in row 0, used as EOS so that rows stop at different lengths."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None)
    return int(out[0, ids.shape[1] + 2])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("deferral", ["sequence", "token"])
def test_end_points_equal_member_greedy_generate(architecture, deferral):
    small, large = tiny_pair(architecture)
    cascade = CascadeForCausalLM.from_models(small, large, deferral=deferral)
    ids, mask = prompts()
    for threshold, member in ((math.inf, large), (-math.inf, small)):
        eos = _eos_hit_by(member, ids, mask)
        common = dict(attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
        expected = member.generate(ids, **common)
        got = cascade.generate(ids, threshold=threshold, **common)
        assert got.shape == expected.shape
        assert torch.equal(got, expected), f"{architecture} {deferral} threshold={threshold}"
        assert cascade.cascade_stats["deferred_share"] == (1.0 if threshold > 0 else 0.0)


def test_sequence_level_mixes_rows_from_both_members():
    small, large = tiny_pair("llama")
    ids, mask = prompts(batch=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    cascade = CascadeForCausalLM.from_models(small, large, rule="chow_sum")
    probe = cascade.generate(ids, threshold=-math.inf, return_dict_in_generate=True, **kwargs)
    scores = probe.deferral_scores
    threshold = float(scores.median())  # defers the rows strictly below the median
    out = cascade.generate(ids, threshold=threshold, return_dict_in_generate=True, **kwargs)
    assert isinstance(out, CascadeGenerateOutput)
    assert torch.equal(out.deferred, scores < threshold) and 0 < int(out.deferred.sum()) < 4
    small_out, large_out = small.generate(ids, **kwargs), large.generate(ids, **kwargs)
    for row in range(4):
        reference = large_out if out.deferred[row] else small_out
        assert torch.equal(out.sequences[row], reference[row])
    assert out.deferred_share == pytest.approx(float(out.deferred.float().mean()))
    assert cascade.cascade_stats["sequences_deferred"] == int(out.deferred.sum())


def test_token_level_mixes_tokens_and_reports_them():
    small, large = tiny_pair("qwen2")
    ids, mask = prompts()
    cascade = CascadeForCausalLM.from_models(small, large, deferral="token")
    kwargs = dict(attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True)
    probe = cascade.generate(ids, threshold=-math.inf, **kwargs)
    threshold = float(probe.deferral_scores[:, 0].median())  # some rows defer their first token, some do not
    out = cascade.generate(ids, threshold=threshold, **kwargs)
    assert out.deferred.shape == (3, MAX_NEW)
    assert torch.equal(out.deferred[:, 0], probe.deferral_scores[:, 0] < threshold)
    # the first token of a deferred row is the large model's greedy first token, of a kept row the small model's
    first_large = large.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)[:, -1]
    first_small = small.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)[:, -1]
    expected_first = torch.where(out.deferred[:, 0], first_large, first_small)
    assert torch.equal(out.sequences[:, ids.shape[1]], expected_first)
    stats = cascade.cascade_stats
    assert stats["tokens_deferred"] == int(out.deferred.sum())
    assert stats["deferred_share"] == pytest.approx(int(out.deferred.sum()) / stats["tokens"])
    assert 0 < stats["large_forward_tokens"] <= 3 * (ids.shape[1] + MAX_NEW)


def test_config_threshold_is_the_default_and_call_overrides_it():
    small, large = tiny_pair("llama")
    ids, mask = prompts()
    cascade = CascadeForCausalLM.from_models(small, large, threshold=math.inf)
    out = cascade.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, large.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False))
    cascade.generate(
        ids, attention_mask=mask, max_new_tokens=4, threshold=-math.inf, rule="chow_quantile", quantile=0.5
    )
    assert cascade.cascade_stats["deferred_share"] == 0.0 and cascade.cascade_stats["rule"] == "chow_quantile"


@pytest.mark.parametrize(
    "bad", [{"threshold": 0.5}, {"threshold": float("nan")}, {"rule": "max"}, {"deferral": "word"}, {"quantile": 1.5}]
)
def test_invalid_settings_raise(bad):
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    ids, mask = prompts()
    with pytest.raises(ValueError, match=next(iter(bad))):
        cascade.generate(ids, attention_mask=mask, max_new_tokens=2, **bad)


def test_token_level_rejects_sampling_and_beams():
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large, deferral="token")
    with pytest.raises(ValueError, match="greedy"):
        cascade.generate(prompts()[0], max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match="num_beams"):
        cascade.generate(prompts()[0], max_new_tokens=2, num_beams=2, deferral="sequence")


def test_sequence_level_samples_with_the_members():
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    ids, mask = prompts()
    torch.manual_seed(0)
    out = cascade.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, threshold=math.inf)
    torch.manual_seed(0)
    cascade.small.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True)  # the small answers first
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True)
    assert torch.equal(out, expected)


def test_cascade_strategy_on_plain_model_raises():
    small, _ = tiny_pair("llama")
    with pytest.raises(ValueError, match="cascade model"):
        cascade_generate(small, prompts()[0], max_new_tokens=2)


@pytest.mark.parametrize("deferral", ["sequence", "token"])
def test_user_generation_config_keeps_the_cascade_strategy(deferral):
    # Regression: a passed GenerationConfig has no `strategy`, and `generate` used to fall to plain generate (small
    # model only, no deferral, no cascade_stats) instead of the checkpoint's default strategy.
    from transformers import GenerationConfig

    from hf_effitrain.hub import custom_generate_entry, generation_effi

    small, large = tiny_pair("llama")
    ids, mask = prompts()
    cascade = CascadeForCausalLM.from_models(small, large, deferral=deferral, threshold=math.inf)
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = large.generate(ids, attention_mask=mask, generation_config=config)
    assert not torch.equal(expected, small.generate(ids, attention_mask=mask, generation_config=config))
    entry_points = (
        lambda: cascade.generate(ids, attention_mask=mask, generation_config=config),
        lambda: generation_effi.generate(cascade, ids, generation_config=config, attention_mask=mask),
        lambda: custom_generate_entry.generate(ids, model=cascade, generation_config=config, attention_mask=mask),
    )
    for run in entry_points:
        if hasattr(cascade, "cascade_stats"):
            del cascade.cascade_stats
        assert torch.equal(run(), expected)
        assert cascade.cascade_stats["deferral"] == deferral and cascade.cascade_stats["deferred_share"] == 1.0
    assert not hasattr(config, "strategy")  # the user's config is left as it was


def test_select_strategy_order():
    from transformers import GenerationConfig

    from hf_effitrain.hub.generation_effi import STRATEGIES, select_strategy

    small, _ = tiny_pair("llama")
    assert select_strategy(small) is None and select_strategy(small, None, GenerationConfig()) is None
    small.generation_config.strategy = "tr_jacobi"  # the checkpoint's default
    assert select_strategy(small, None, GenerationConfig()) is STRATEGIES["tr_jacobi"]
    assert select_strategy(small, None, GenerationConfig(strategy="jacobi")) is STRATEGIES["jacobi"]
    assert select_strategy(small, "cascade", GenerationConfig(strategy="jacobi")) is STRATEGIES["cascade"]
    assert select_strategy(small, "jacobi", custom_generate=lambda *a, **k: None) is None
    with pytest.raises(ValueError, match="valid strategies"):
        select_strategy(small, "beam")


def test_plain_opts_out_of_a_checkpoint_default_strategy():
    from hf_effitrain.hub.generation_effi import select_strategy

    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large, threshold=float("inf"))  # default strategy: "cascade"
    assert select_strategy(cascade, "plain") is None and select_strategy(cascade) is not None
    ids = torch.tensor([[5, 9, 13, 2]])
    sampled = cascade.generate(ids, strategy="plain", do_sample=True, top_k=5, max_new_tokens=6, pad_token_id=0)
    assert sampled.shape == (1, 10) and not hasattr(cascade, "cascade_stats")  # the small model's own generate ran
    with pytest.raises(ValueError, match="'plain' \\(plain generate\\)"):
        cascade.generate(ids, strategy="greedy", max_new_tokens=2)
