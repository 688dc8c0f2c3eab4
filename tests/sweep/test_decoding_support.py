"""Clear refusals of the decoding strategies on architectures that cannot roll their cache back, and of the
token-level cascade on members whose cache cannot be caught up; exact results where they can run."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_configs import tiny_causal_lm  # noqa: E402

from hf_effitrain import generate  # noqa: E402
from hf_effitrain.hub.decoding_support import decoding_refusal  # noqa: E402
from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM  # noqa: E402

PROMPT = torch.tensor([[5, 9, 17, 33, 9, 17]])


@functools.lru_cache(maxsize=None)
def cached_model(model_type: str, is_decoder: bool | None = None):
    """One tiny model per type for the whole module (the refusal tests only read it)."""
    return tiny_causal_lm(model_type, **({} if is_decoder is None else {"is_decoder": is_decoder}))


@pytest.mark.parametrize(
    "model_type, is_decoder, reason",
    [
        ("mamba", None, "keeps recurrent state"),
        ("qwen3_next", None, "keeps recurrent state"),
        ("openai-gpt", None, "keeps no KV cache"),
        ("roberta", False, "caches keys/values only as a decoder"),
        ("cpmant", None, "prepends prompt tokens of its own"),
    ],
)
@pytest.mark.parametrize("strategy", ["jacobi", "tr_jacobi"])
def test_strategies_refuse_what_cannot_roll_back(model_type, is_decoder, reason, strategy):
    model = cached_model(model_type, is_decoder)
    # tr_jacobi refuses a forward without `position_ids` (mamba, cpmant) before it looks at the cache
    accepted = reason if strategy == "jacobi" else f"{reason}|forward takes `attention_mask` and `position_ids`"
    with pytest.raises(ValueError, match=accepted) as info:
        generate(model, PROMPT, strategy=strategy, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert "cache_implementation" not in str(info.value)  # nothing the user chose is blamed
    if reason in str(info.value):
        assert "strategy='plain'" in str(info.value)


def test_attention_models_are_not_refused():
    assert decoding_refusal(cached_model("llama")) is None
    assert decoding_refusal(cached_model("roberta")) is None  # a decoder (is_decoder=True) caches keys/values


# transformers 5.24 gives Mamba a DynamicCache of linear-attention layers, earlier releases a `cache_params` of its own
@pytest.mark.parametrize(
    "large_type, reason",
    [
        ("mamba", "(no attention layer in its cache|recurrent state in a cache of its own)"),
        ("openai-gpt", "keeps no KV cache"),
    ],
)
def test_token_cascade_refuses_members_that_cannot_catch_up(large_type, reason):
    cascade = CascadeForCausalLM.from_models(
        cached_model("llama"), cached_model(large_type), deferral="token", threshold=float("inf")
    )
    with pytest.raises(ValueError, match=f"the large model .*{reason}.*deferral='sequence'"):
        cascade.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0)


def test_token_cascade_on_a_hybrid_member_defers_exactly():
    """A hybrid (recurrent + attention) member only needs catching up, never a rollback: deferring everything gives
    its greedy output."""
    large = tiny_causal_lm("jamba")
    cascade = CascadeForCausalLM.from_models(tiny_causal_lm("llama"), large, deferral="token", threshold=float("inf"))
    expected = large.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(cascade.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)
