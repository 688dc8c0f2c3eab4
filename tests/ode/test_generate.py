"""OdeSharedForCausalLM generation: per-call num_steps, one KV-cache slot per evaluation, exactness of the cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationMixin

from hf_effitrain.hub.generation_effi import EffiGenerationMixin
from hf_effitrain.hub.modeling_ode_shared import OdeSharedPreTrainedModel
from tests.ode.ode_helpers import VOCAB, count_layer_calls, greedy_without_cache, tiny_ode

PROMPT = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
NEW_TOKENS = 8


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_cached_generate_equals_recomputation_at_every_num_steps(solver):
    model = tiny_ode(num_pre_layers=1, num_post_layers=1, num_steps=8, ode_interval=8.0, solver=solver)
    for num_steps in (8, 4, 2, 1):
        generated = model.generate(
            PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_steps=num_steps
        )
        assert torch.equal(generated, greedy_without_cache(model, PROMPT, num_steps, NEW_TOKENS)), (
            f"num_steps={num_steps}"
        )


def test_batched_cached_generate_with_padding_equals_recomputation():
    model = tiny_ode(num_steps=4)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    generated = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, num_steps=2, pad_token_id=0
    )
    no_cache = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        num_steps=2,
        pad_token_id=0,
        use_cache=False,
    )
    assert torch.equal(generated, no_cache)


def test_generate_passes_num_steps_to_every_forward():
    model = tiny_ode(num_steps=4)
    with count_layer_calls(model) as counts:
        model.generate(PROMPT, max_new_tokens=5, min_new_tokens=5, do_sample=False, num_steps=2)
    assert counts["model.shared_blocks.0.0"] == 2 * 5  # prefill + 4 decode forwards, 2 steps each
    inputs = model.prepare_inputs_for_generation(PROMPT, num_steps=3, use_cache=True)
    assert inputs["num_steps"] == 3


def test_cache_has_one_slot_per_evaluation():
    model = tiny_ode(num_pre_layers=1, num_steps=4, solver="heun")
    cache = DynamicCache(config=model.config)  # what generate builds: one layer per distinct layer
    model(PROMPT, past_key_values=cache, use_cache=True, num_steps=3)
    assert len(cache.layers) == 1 + 3 * 2
    assert all(layer.get_seq_length() == PROMPT.shape[1] for layer in cache.layers)


def test_changing_num_steps_on_a_filled_cache_raises():
    model = tiny_ode(num_steps=4)
    out = model(PROMPT, use_cache=True, num_steps=4)
    next_token = out.logits[:, -1:].argmax(-1)
    model(next_token, past_key_values=out.past_key_values, use_cache=True, num_steps=4)  # same layout: fine
    with pytest.raises(ValueError, match=r"filled with num_steps=\[4\].*uses num_steps=\[2\]"):
        model(next_token, past_key_values=out.past_key_values, use_cache=True, num_steps=2)


def test_continuing_generate_with_other_num_steps_on_a_cache_raises():
    model = tiny_ode(num_steps=4)
    first = model.generate(PROMPT, max_new_tokens=3, do_sample=False, num_steps=4, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="keep num_steps fixed"):
        model.generate(
            first.sequences, past_key_values=first.past_key_values, max_new_tokens=3, do_sample=False, num_steps=1
        )


def test_effi_generation_mixin_comes_first_and_strategy_none_is_plain_generate():
    model = tiny_ode()
    mro = type(model).__mro__
    assert mro.index(EffiGenerationMixin) < mro.index(OdeSharedPreTrainedModel) < mro.index(GenerationMixin)
    plain = model.generate(PROMPT, max_new_tokens=4, do_sample=False, num_steps=2)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False, num_steps=2, strategy=None), plain)
    with pytest.raises(ValueError, match="Unknown decoding strategy 'nope'"):
        model.generate(PROMPT, max_new_tokens=4, strategy="nope")


@pytest.mark.parametrize("strategy", ["jacobi", "tr_jacobi"])
def test_decoding_strategies_keep_the_num_steps_of_the_prefill(strategy):
    """Strategies call forward without num_steps after generate's prefill: the filled cache fixes the steps."""
    model = tiny_ode(num_steps=4)
    for num_steps in (4, 2, 1):
        greedy = model.generate(PROMPT, max_new_tokens=10, min_new_tokens=10, do_sample=False, num_steps=num_steps)
        fast = model.generate(
            PROMPT, max_new_tokens=10, min_new_tokens=10, do_sample=False, num_steps=num_steps, strategy=strategy
        )
        assert torch.equal(fast, greedy), f"num_steps={num_steps}"
