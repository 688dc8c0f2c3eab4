"""`generate(strategy="speculative_cascade")`: exact ends, equality with a token-by-token reference, stats, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from hf_effitrain.hub.configuration_cascade import SPECULATIVE_DEFAULTS
from hf_effitrain.hub.generation_speculative_cascade import SpeculativeCascadeOutput, trust_small
from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM
from tests.cascade.cascade_helpers import PAD_ID, prompts, tiny_pair

MAX_NEW = 12
STRATEGY = "speculative_cascade"


def _prompt():
    ids, mask = prompts(batch=1)  # left-padded: the first 3 positions are padding
    return ids, mask


def _eos_hit_by(model, ids, mask) -> int:
    """A token the model emits as its 4th new token, used as EOS so that generation stops early."""
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID
    )
    return int(out[0, ids.shape[1] + 3])


@pytest.mark.parametrize(
    "architecture, draft_len", [("llama", 1), ("llama", 4), ("qwen2", 3), ("mistral", 3), ("gpt2", 2)]
)
def test_end_points_equal_member_greedy_generate(architecture, draft_len):
    small, large = tiny_pair(architecture)
    cascade = CascadeForCausalLM.from_models(small, large)
    ids, mask = _prompt()
    ends = ((large, "chow", 0.0), (small, "chow", 1.0), (small, "diff", 1.0))
    for member, rule, alpha in ends:
        for eos in (None, _eos_hit_by(member, ids, mask)):  # max_new_tokens stop, then an EOS stop
            common = dict(
                attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=PAD_ID
            )
            expected = member.generate(ids, **common)
            got = cascade.generate(
                ids,
                strategy=STRATEGY,
                speculative_rule=rule,
                speculative_alpha=alpha,
                cascade_draft_len=draft_len,
                **common,
            )
            assert torch.equal(got, expected), f"{architecture} {rule} alpha={alpha} eos={eos}"
            stats = cascade.cascade_stats
            assert stats["new_tokens"] == expected.shape[1] - ids.shape[1]
            assert stats["small_token_share"] == (1.0 if member is small else 0.0)
            if eos is not None:
                assert expected.shape[1] - ids.shape[1] <= 4  # stopped on the EOS, not on max_new_tokens


class _CountingIdentity(LogitsProcessor):
    """A logits processor that changes nothing and counts the rows it is called on."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += scores.shape[0]
        return scores


def _positions(mask: torch.Tensor) -> torch.LongTensor:
    """Position ids as `generate` derives them from a left-padded mask (matters for absolute positions, e.g. gpt2)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _reference(small, large, ids, mask, rule, alpha, max_new):
    """The rule applied token by token with full forwards and no cache: what the greedy speculative cascade equals."""
    sequence, attention, from_small, clear = ids, mask, [], []
    for _ in range(max_new):
        inputs = dict(input_ids=sequence, attention_mask=attention, position_ids=_positions(attention))
        s, l = small(**inputs).logits[:, -1].float(), large(**inputs).logits[:, -1].float()
        trusted = bool(trust_small(rule, alpha, s, l))
        token = (s if trusted else l).argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        attention = torch.cat([attention, attention.new_ones(1, 1)], dim=1)
        from_small.append(trusted)
        # a decision within float32 noise of its edge may go either way (the cached forwards round differently)
        clear.append(
            all(bool(trust_small(rule, a, s, l)) == trusted for a in (max(alpha - 1e-4, 0.0), min(alpha + 1e-4, 1.0)))
        )
    return sequence, from_small, clear


def _critical_alphas(small, large, sequence, mask, rule) -> torch.Tensor:
    """Per position of `sequence`'s last MAX_NEW tokens: the least alpha at which the rule trusts the small model."""
    inputs = dict(input_ids=sequence, attention_mask=mask, position_ids=_positions(mask))
    s = torch.softmax(small(**inputs).logits[0, -MAX_NEW - 1 : -1].double(), -1)
    l = torch.softmax(large(**inputs).logits[0, -MAX_NEW - 1 : -1].double(), -1)
    gap = l.max(-1).values - s.max(-1).values
    if rule == "chow":
        return 1 - s.max(-1).values
    return gap if rule == "diff" else gap / (0.5 * (s - l).abs().sum(-1))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", ["chow", "diff", "opt"])
def test_mixed_deferral_equals_the_token_by_token_rule(architecture, rule):
    small, large = tiny_pair(architecture)
    with torch.no_grad():  # a large model that often agrees with the small one, both with peaked distributions
        for p_small, p_large in zip(small.parameters(), large.parameters()):
            if p_small.shape == p_large.shape:
                p_large.copy_(p_small + 0.3 * torch.randn_like(p_small))
        for model in (small, large):  # the final norm's scale (gpt2 ties its LM head to the input embeddings)
            (model.model.norm if architecture == "llama" else model.transformer.ln_f).weight.mul_(4)
        cascade = CascadeForCausalLM.from_models(small, large)
        ids, mask = _prompt()
        greedy = large.generate(
            ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID
        )
        full_mask = torch.cat([mask, mask.new_ones(1, MAX_NEW)], dim=1)
        critical = _critical_alphas(small, large, greedy, full_mask, rule).clamp(0, 1)
    mixed = 0
    values = critical.unique()  # sorted; alphas halfway between two critical values keep decisions off their edges
    midpoints = ((values[1:] + values[:-1]) / 2).tolist()
    for alpha in (midpoints[len(midpoints) // 3], midpoints[2 * len(midpoints) // 3]):
        with torch.no_grad():
            expected, flags, clear = _reference(small, large, ids, mask, rule, alpha, MAX_NEW)
        for draft_len in (1, 3):
            call = dict(
                attention_mask=mask,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=PAD_ID,
                strategy=STRATEGY,
                speculative_rule=rule,
                speculative_alpha=alpha,
                cascade_draft_len=draft_len,
                return_dict_in_generate=True,
            )
            out = cascade.generate(ids, **call)
            assert isinstance(out, SpeculativeCascadeOutput)
            assert torch.equal(out.sequences, expected), f"{rule} alpha={alpha} draft_len={draft_len}"
            assert all(got == want for got, want, c in zip(out.from_small[0].tolist(), flags, clear) if c)
            assert sum(out.accepted_lengths) == MAX_NEW and out.small_token_share == pytest.approx(sum(flags) / MAX_NEW)
            # with a logits processor the large model's scores are processed only where the acceptance walk reads
            # them; an identity processor must leave every decision as it was without one
            counting = _CountingIdentity()
            processed = cascade.generate(ids, **call, logits_processor=LogitsProcessorList([counting]))
            assert torch.equal(processed.sequences, expected) and torch.equal(processed.from_small, out.from_small)
            large_calls = counting.calls - processed.num_small_forwards  # one call per small forward, the rest large
            # every position of the output read p_L once ("chow" only where it did not trust the small model), not
            # every position each large forward verified
            walked = MAX_NEW - (int(out.from_small.sum()) if rule == "chow" else 0)
            assert large_calls == walked, (rule, alpha, draft_len, counting.calls)
        mixed += 0 < sum(flags) < MAX_NEW
    assert mixed, f"no alpha mixed the two members for {rule}; the test would not cover rollbacks"


def test_statistics_count_forwards():
    small, large = tiny_pair("qwen2")
    cascade = CascadeForCausalLM.from_models(small, large)
    ids, mask = _prompt()
    common = dict(attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    # always trusting under "chow": the large model never runs, the small one runs once per token
    out = cascade.generate(
        ids, strategy=STRATEGY, speculative_rule="chow", speculative_alpha=1.0, return_dict_in_generate=True, **common
    )
    assert (out.num_large_forwards, out.num_small_forwards, out.tokens_per_large_forward) == (0, MAX_NEW, None)
    assert out.small_token_share == 1.0 and out.from_small.shape == (1, MAX_NEW)
    # always trusting under "diff": one large forward per round of 3 drafts + bonus
    cascade.generate(
        ids, strategy=STRATEGY, speculative_rule="diff", speculative_alpha=1.0, cascade_draft_len=3, **common
    )
    stats = cascade.cascade_stats
    assert stats["large_forwards"] == stats["rounds"] == MAX_NEW // 4 and stats["tokens_per_large_forward"] == 4.0
    assert stats["small_forwards"] == MAX_NEW and stats["deferred_share"] == 0.0
    assert (
        stats["large_forward_tokens"] == ids.shape[1] + MAX_NEW - 1
    )  # every round's bonus token is fed by the next round
    # never trusting: each large forward yields at least one token
    cascade.generate(
        ids, strategy=STRATEGY, speculative_rule="chow", speculative_alpha=0.0, cascade_draft_len=3, **common
    )
    stats = cascade.cascade_stats
    assert 1 <= stats["tokens_per_large_forward"] <= 4 and stats["large_forwards"] == stats["rounds"]
    assert stats["new_tokens"] == MAX_NEW and stats["small_token_share"] == 0.0


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_logits_processors_match_greedy(architecture):
    small, large = tiny_pair(architecture)
    cascade = CascadeForCausalLM.from_models(small, large)
    ids, mask = _prompt()
    processors = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=6, bad_words_ids=[[5], [7]])
    for member, alpha in ((large, 0.0), (small, 1.0)):
        eos = _eos_hit_by(member, ids, mask)  # min_new_tokens suppresses it for the first 6 tokens
        common = dict(
            attention_mask=mask,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD_ID,
            **processors,
        )
        expected = member.generate(ids, **common)
        got = cascade.generate(
            ids, strategy=STRATEGY, speculative_rule="chow", speculative_alpha=alpha, cascade_draft_len=3, **common
        )
        assert torch.equal(got, expected)


def test_generation_config_entries_defaults_and_precedence(tmp_path):
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    for name, value in SPECULATIVE_DEFAULTS.items():
        assert getattr(cascade.generation_config, name) == value
    ids, mask = _prompt()
    common = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    cascade.generate(ids, strategy=STRATEGY, **common)
    assert cascade.cascade_stats["speculative_rule"] == SPECULATIVE_DEFAULTS["speculative_rule"]
    # a passed config's entries, then the call's keywords; the checkpoint default strategy
    config = GenerationConfig(speculative_rule="chow", speculative_alpha=0.0, cascade_draft_len=2)
    expected = large.generate(ids, **common)
    assert torch.equal(cascade.generate(ids, generation_config=config, strategy=STRATEGY, **common), expected)
    assert cascade.cascade_stats["cascade_draft_len"] == 2
    cascade.generate(
        ids, generation_config=config, strategy=STRATEGY, cascade_draft_len=5, speculative_alpha=1.0, **common
    )
    assert cascade.cascade_stats["cascade_draft_len"] == 5 and cascade.cascade_stats["small_token_share"] == 1.0
    cascade.generation_config.update(strategy=STRATEGY, speculative_rule="chow", speculative_alpha=0.0)
    assert torch.equal(cascade.generate(ids, **common), expected)
    cascade.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert (saved.strategy, saved.speculative_rule, saved.speculative_alpha, saved.cascade_draft_len) == (
        STRATEGY,
        "chow",
        0.0,
        4,
    )


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ({"speculative_rule": "max"}, ValueError, "speculative_rule"),
        ({"speculative_alpha": 1.5}, ValueError, "speculative_alpha"),
        ({"speculative_alpha": float("nan")}, ValueError, "speculative_alpha"),
        ({"cascade_draft_len": 0}, ValueError, "cascade_draft_len"),
        ({"cascade_draft_len": 2.0}, TypeError, "cascade_draft_len"),
        ({"do_sample": True}, ValueError, "greedy"),
        ({"num_beams": 2}, ValueError, "greedy"),
        ({"output_scores": True, "return_dict_in_generate": True}, ValueError, "scores"),
        ({"guidance_scale": 1.5}, ValueError, "keeps state"),
    ],
)
def test_invalid_settings_raise(bad, error, match):
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    ids, mask = _prompt()
    with pytest.raises(error, match=match):
        cascade.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD_ID, strategy=STRATEGY, **bad)


def test_batches_and_plain_models_are_refused():
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    ids, mask = prompts(batch=2)
    with pytest.raises(ValueError, match="batch size 1"):
        cascade.generate(ids, attention_mask=mask, max_new_tokens=2, strategy=STRATEGY, pad_token_id=PAD_ID)
    with pytest.raises(ValueError, match="cascade model"):
        from hf_effitrain.hub.generation_speculative_cascade import speculative_cascade_generate

        speculative_cascade_generate(small, ids[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match="assistant_model"):
        cascade.generate(ids[:1], max_new_tokens=2, strategy=STRATEGY, assistant_model=small)


def test_rules_at_their_ends():
    scores = torch.randn(6, 50) * 4
    other = torch.randn(6, 50) * 4
    assert not trust_small("chow", 0.0, scores, None).any()
    for rule in ("chow", "diff", "opt"):
        assert trust_small(rule, 1.0, scores, other).all()
    confident = torch.zeros(1, 50)
    confident[0, 3] = 30.0  # p_S(3) = 1 - 4.6e-12: `1 - max p` in float32 rounds to 0, the rest mass does not
    assert not trust_small("chow", 0.0, confident, None).any() and trust_small("chow", 1e-9, confident, None).all()


def test_streamer_gets_the_prompt_then_every_token():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.values, self.ended = [], False

        def put(self, value):
            self.values.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    ids, mask = _prompt()
    streamer = Collect()
    out = cascade.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        pad_token_id=PAD_ID,
        eos_token_id=None,
        strategy=STRATEGY,
        speculative_rule="diff",
        speculative_alpha=1.0,
        cascade_draft_len=3,
        streamer=streamer,
    )
    assert (
        streamer.values == [ids[0].tolist()] + [[token] for token in out[0, ids.shape[1] :].tolist()] and streamer.ended
    )
