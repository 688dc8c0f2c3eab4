"""`generate(strategy="speculative_cascade")`: a cascade decoded like speculative decoding (Narasimhan et al. 2025).

Per round (batch size 1, greedy):

1. the small model drafts `cascade_draft_len` tokens greedily, one forward per token;
2. the large model scores the unseen context and all drafts in ONE forward, giving its next-token distribution at
   every draft position and one more (the bonus position);
3. each position's target is the small model's greedy token where the deferral rule trusts the small model there,
   the large model's greedy token otherwise; the drafts are accepted up to the first one that differs from its
   target, which is replaced by the target, and when all are accepted the bonus position's target is appended;
4. both members' KV caches are cut back (`DynamicCache.crop(-n)`) to the accepted tokens.

Rules over the small / large next-token distributions `p_S`, `p_L` (after the logits processors) with `alpha` in
`[0, 1]`: `"chow"` trusts the small model iff `max p_S >= 1 - alpha`, `"diff"` iff `max p_S >= max p_L - alpha`,
`"opt"` iff `max p_S >= max p_L - alpha * TV(p_S, p_L)`. `"chow"` needs only `p_S`, so a round whose drafts (and
bonus position) it all trusts skips the large forward.

Exact ends (float32): `"chow"` with `alpha=0` never trusts the small model (a softmax never puts all the mass on one
token; the rest mass is summed in float64, not computed as `1 - max`), so the output is the large model's greedy
`generate` token for token: lossless speculative decoding with the small model as drafter. Any rule with `alpha=1`
always trusts it: the output is the small model's greedy `generate` (for `"opt"` the margin `alpha * TV` bounds
`max p_L - max p_S` mathematically; `"chow"` and `"diff"` are the safe choices for this end).

The call goes through `GenerationMixin.generate(small, ..., custom_generate=<loop>)`, so the generation-config
merge, attention mask, position ids, stopping criteria (EOS, `max_new_tokens`, stop strings) and logits processors are
the ones greedy `generate` prepares. Statistics are returned in a [`SpeculativeCascadeOutput`] with
`return_dict_in_generate=True` and always stored as a dict in `model.cascade_stats`.

This file ships inside checkpoints (`hub/`): it imports only stdlib, torch, transformers and single-dot siblings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation import GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .configuration_cascade import SPECULATIVE_DEFAULTS, check_speculative_settings
from .decoding_support import decoding_refusal
from .generation_cascade import _Member, _member_generation_config
from .generation_jacobi import _check_cache, _move_stop_strings_to_criteria, _Stopper, refuse_stateful_processors
from .transformers_compat import cache_from_model_kwargs

STRATEGY = "speculative_cascade"

__all__ = ["SpeculativeCascadeOutput", "speculative_cascade_generate", "trust_small"]


@dataclass
class SpeculativeCascadeOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus the speculative cascade's statistics.

    Args:
        from_small (`torch.BoolTensor` of shape `(1, new_tokens)`):
            True where the rule trusted the small model at that position (the token is the small model's greedy
            token); False where the token is the large model's (an accepted draft the large model agreed with
            counts as the large model's).
        small_token_share (`float`): share of the new tokens taken from the small model (`from_small.mean()`).
        num_large_forwards (`int`): large-model forwards (each scores a whole round of drafts).
        num_small_forwards (`int`): small-model forwards (one per draft, plus the bonus positions).
        tokens_per_large_forward (`float`): new tokens / large forwards (None when the large model never ran).
        accepted_lengths (`list[int]`): new tokens gained per round.
    """

    from_small: torch.BoolTensor | None = None
    small_token_share: float | None = None
    num_large_forwards: int | None = None
    num_small_forwards: int | None = None
    tokens_per_large_forward: float | None = None
    accepted_lengths: list[int] | None = None


def trust_small(
    rule: str, alpha: float, small_scores: torch.Tensor, large_scores: torch.Tensor | None
) -> torch.BoolTensor:
    """Where the rule trusts the small model: `(positions, vocab)` processed scores of each member -> `(positions,)`.

    Probabilities are taken in float64 (masked `-inf` scores get probability 0). `"chow"` compares the small model's
    rest mass (every token but its greedy one, summed) with `alpha`, which equals `max p_S >= 1 - alpha` without the
    rounding of `1 - max p_S`; `large_scores` may be None for `"chow"` only.
    """
    p_small = torch.softmax(small_scores.double(), dim=-1)
    top_small, top_index = p_small.max(dim=-1)
    if rule == "chow":
        rest = p_small.scatter(-1, top_index[:, None], 0.0).sum(dim=-1)
        return rest <= alpha
    p_large = torch.softmax(large_scores.double(), dim=-1)
    margin = alpha if rule == "diff" else alpha * 0.5 * (p_small - p_large).abs().sum(dim=-1)
    return top_small >= p_large.max(dim=-1).values - margin


class _Context:
    """The committed attention mask / position ids, grown on the fly to cover drafts."""

    def __init__(self, attention_mask, position_ids):
        self.attention_mask, self.position_ids = attention_mask, position_ids

    def covering(self, extra: int):
        mask, positions = self.attention_mask, self.position_ids
        if extra:
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((1, extra))], dim=-1)
            if positions is not None:
                steps = torch.arange(1, extra + 1, device=positions.device, dtype=positions.dtype)
                positions = torch.cat([positions, positions[..., -1:] + steps], dim=-1)
        return mask, positions

    def commit(self, extra: int) -> None:
        self.attention_mask, self.position_ids = self.covering(extra)


class _LargeScores:
    """The large model's processed scores at a round's positions, each computed when the acceptance walk reaches it.

    Processing every verified position would cost one logits-processor call per draft; processing only the positions
    the walk reads (each with its own prefix `ids[:, :start + i]`, as a batch-1 greedy step) costs about one call per
    accepted token, as greedy `generate` does.
    """

    def __init__(self, logits_processor, ids: torch.LongTensor, start: int):
        self.logits_processor, self.ids, self.start = logits_processor, ids, start
        self.processing = len(logits_processor) > 0
        self.logits, self.offset, self.rows = None, 0, {}

    def __bool__(self) -> bool:
        """Whether the round's large forward has run."""
        return self.logits is not None

    def run(self, large: _Member, context: _Context, keep: int, offset: int = 0) -> None:
        """One large forward over the unseen context and drafts; its last `keep` positions start at row `offset`."""
        mask, positions = context.covering(self.ids.shape[1] - self.start)
        self.logits, self.offset = large.logits(self.ids, mask, positions, keep=keep)[0], offset

    def all(self) -> torch.Tensor:
        """Every row at once (only without processors: then the rows are the raw logits)."""
        return self.logits

    def row(self, i: int) -> torch.Tensor:
        """Scores `(1, vocab)` of round position `i`."""
        if i not in self.rows:
            logits = self.logits[i - self.offset : i - self.offset + 1]
            prefix = self.ids[:, : self.start + i]
            self.rows[i] = self.logits_processor(prefix, logits) if self.processing else logits
        return self.rows[i]


def _round(
    small: _Member,
    large: _Member,
    sequence,
    context: _Context,
    logits_processor,
    rule: str,
    alpha: float,
    draft_len: int,
):
    """One draft / verify round: (new tokens, from-small flags, accepted drafts)."""
    n = sequence.shape[1]
    ids = sequence
    small_scores, drafts = [], []
    for i in range(draft_len):  # 1. greedy drafts, one small forward each
        mask, positions = context.covering(i)
        scores = logits_processor(ids, small.logits(ids, mask, positions, keep=1)[0])
        small_scores.append(scores)
        drafts.append(int(scores.argmax(-1)))
        ids = torch.cat([ids, ids.new_tensor([[drafts[-1]]])], dim=1)
    large_scores = _LargeScores(logits_processor, ids, n)

    n_accepted, flags = 0, []
    if drafts:
        small_scores = torch.cat(small_scores, dim=0)
        trusted = trust_small(rule, alpha, small_scores, None) if rule == "chow" else None
        if trusted is None or not bool(trusted.all()):  # 2. one large forward over the context and the drafts
            large_scores.run(large, context, keep=draft_len + 1)
        large_greedy = None
        if large_scores and not large_scores.processing:  # no processors: every decision in one device-to-host read
            raw = large_scores.all()[:draft_len]
            if trusted is None:
                trusted = trust_small(rule, alpha, small_scores, raw)
            packed = torch.stack([trusted.long(), raw.argmax(-1)]).tolist()
            trusted, large_greedy = [bool(flag) for flag in packed[0]], packed[1]
        elif trusted is not None:
            trusted = trusted.tolist()
        for i, draft in enumerate(drafts):  # 3. accept up to the first draft that differs from its target
            trust = (
                trusted[i]
                if trusted is not None
                else bool(trust_small(rule, alpha, small_scores[i : i + 1], large_scores.row(i)))
            )
            flags.append(trust)
            if trust:
                target = draft
            else:
                target = large_greedy[i] if large_greedy is not None else int(large_scores.row(i).argmax(-1))
            if target != draft:
                return drafts[:i] + [target], flags, i
            n_accepted += 1

    # 4. every draft accepted: the bonus position's target (the small model scores it first, the rule may skip the large)
    mask, positions = context.covering(draft_len)
    bonus_small = logits_processor(ids, small.logits(ids, mask, positions, keep=1)[0])
    if not large_scores and rule != "chow":
        large_scores.run(large, context, keep=1, offset=draft_len)
    bonus_large = large_scores.row(draft_len) if rule != "chow" else None  # "chow" reads p_L only if it defers
    trust_bonus = bool(trust_small(rule, alpha, bonus_small, bonus_large))
    if not trust_bonus and not large_scores:
        large_scores.run(large, context, keep=1, offset=draft_len)
    bonus = int((bonus_small if trust_bonus else large_scores.row(draft_len)).argmax(-1))
    return drafts + [bonus], flags + [trust_bonus], n_accepted


def _check_loop_inputs(generation_config, input_ids, model_kwargs, logits_processor) -> None:
    if generation_config.do_sample or (generation_config.num_beams or 1) != 1:
        raise ValueError(
            f"Strategy {STRATEGY!r} is greedy; got do_sample={generation_config.do_sample}, num_beams={generation_config.num_beams}. "
            "Use strategy='cascade' with deferral='sequence' to sample with the members."
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"Strategy {STRATEGY!r} supports batch size 1 only, got a batch of {input_ids.shape[0]} (num_return_sequences included)."
        )
    if (
        generation_config.output_attentions
        or generation_config.output_hidden_states
        or generation_config.output_scores
        or generation_config.output_logits
    ):
        raise ValueError(
            f"Strategy {STRATEGY!r} does not return scores, logits, attentions or hidden states (each token may come "
            "from either member); drop output_scores / output_logits / output_attentions / output_hidden_states."
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            f"Strategy {STRATEGY!r} needs prompt ids: the large model cannot read the small model's `inputs_embeds`."
        )
    refuse_stateful_processors(logits_processor, STRATEGY, "drafts are scored and rolled back")


def _decode_loop(
    cascade,
    small_model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    model_kwargs,
    params,
    streamer,
):
    _check_loop_inputs(generation_config, input_ids, model_kwargs, logits_processor)
    context = _Context(model_kwargs.pop("attention_mask", None), model_kwargs.pop("position_ids", None))
    small_cache = cache_from_model_kwargs(model_kwargs)
    for name in ("cache", "past_key_values", "use_cache", "logits_to_keep"):
        model_kwargs.pop(name, None)
    large_cache = DynamicCache(config=cascade.large.config.get_text_config(decoder=True))
    stopper = _Stopper(stopping_criteria, stopping_criteria.max_length or generation_config.max_length)
    for cache, member in ((small_cache, small_model), (large_cache, cascade.large)):
        _check_cache(cache, STRATEGY, stopper.max_length, member)
    small, large = _Member(small_model, small_cache, model_kwargs), _Member(cascade.large, large_cache, model_kwargs)
    rule, alpha, draft_len = params["speculative_rule"], params["speculative_alpha"], params["cascade_draft_len"]

    sequence, from_small, accepted_lengths, done = input_ids, [], [], False
    while not done:
        room = stopper.max_length - sequence.shape[1]  # a round emits at most drafts + 1 tokens
        tokens, flags, n_accepted = _round(
            small, large, sequence, context, logits_processor, rule, alpha, max(0, min(draft_len, room - 1))
        )
        kept, done = stopper.keep(sequence, tokens, None)
        valid = sequence.shape[1] + min(n_accepted, kept)  # cached positions whose token was committed
        sequence = torch.cat([sequence, sequence.new_tensor([tokens[:kept]])], dim=1)
        context.commit(kept)
        small.roll_back(valid)
        large.roll_back(valid)
        from_small += flags[:kept]
        accepted_lengths.append(kept)
        if streamer is not None:  # one token per call, as greedy
            for token in tokens[:kept]:
                streamer.put(torch.tensor([token]))
    if streamer is not None:
        streamer.end()

    new = sequence.shape[1] - input_ids.shape[1]
    share = sum(from_small) / max(new, 1)
    per_large = new / large.forwards if large.forwards else None
    cascade.cascade_stats = {
        "strategy": STRATEGY,
        "speculative_rule": rule,
        "speculative_alpha": alpha,
        "cascade_draft_len": draft_len,
        "new_tokens": new,
        "large_forwards": large.forwards,
        "small_forwards": small.forwards,
        "large_forward_tokens": large.forward_tokens,
        "small_forward_tokens": small.forward_tokens,
        "tokens_per_large_forward": per_large,
        "small_token_share": share,
        "deferred_share": 1.0 - share if new else 0.0,
        "rounds": len(accepted_lengths),
    }
    if not generation_config.return_dict_in_generate:
        return sequence
    return SpeculativeCascadeOutput(
        sequences=sequence,
        from_small=torch.tensor([from_small], dtype=torch.bool, device=sequence.device),
        small_token_share=share,
        num_large_forwards=large.forwards,
        num_small_forwards=small.forwards,
        tokens_per_large_forward=per_large,
        accepted_lengths=accepted_lengths,
    )


def _resolve_params(model, generation_config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Each parameter from the call's keywords, else the passed config, else the cascade's config, else the default."""
    params = {}
    for name, default in SPECULATIVE_DEFAULTS.items():
        value = kwargs.pop(name, None)
        for config in (generation_config, getattr(model, "generation_config", None)):
            if value is None:
                value = getattr(config, name, None)
        params[name] = default if value is None else value
    check_speculative_settings(params["speculative_rule"], params["speculative_alpha"], params["cascade_draft_len"])
    params["speculative_alpha"] = float(params["speculative_alpha"])
    return params


def speculative_cascade_generate(
    model, inputs: torch.LongTensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
):
    """Generate with the cascade `model` as a speculative cascade: `model.generate(strategy="speculative_cascade", ...)`.

    Args:
        model (`CascadeForCausalLM`): holds `small` (the drafter) and `large` (the verifier).
        inputs (`torch.LongTensor` of shape `(1, prompt_len)`): the prompt ids (batch size 1).
        generation_config (`GenerationConfig`, *optional*): applies to both members; defaults to the cascade's. It
            may hold `speculative_rule`, `speculative_alpha` and `cascade_draft_len` (keywords override them).
        speculative_rule (`str`, *optional*): `"chow"`, `"diff"` or `"opt"` (see the module docstring).
        speculative_alpha (`float`, *optional*): the rule's margin, in `[0, 1]`.
        cascade_draft_len (`int`, *optional*): small-model drafts per large forward (>= 1).
        **kwargs: anything greedy `generate` takes (`max_new_tokens`, `attention_mask`, `eos_token_id`, logits
            processors, stopping criteria, `streamer`, `return_dict_in_generate`, ...).

    Returns:
        The sequences `(1, prompt_len + new)`, or a [`SpeculativeCascadeOutput`] when `return_dict_in_generate=True`.
        `model.cascade_stats` holds the forwards of each member, tokens per large forward and the small model's share.

    Raises:
        ValueError: on a model that is not a cascade, an invalid setting, sampling, beam search, a batch of more than
            one sequence, requested scores / attentions, a stateful logits processor, `assistant_model` or
            `custom_generate`, or a cache that cannot be rolled back.
    """
    if not (hasattr(model, "small") and hasattr(model, "large")):
        raise ValueError(
            f"strategy={STRATEGY!r} needs a cascade model (CascadeForCausalLM with `small` and `large` members), got "
            f"{type(model).__name__}. Build one with CascadeForCausalLM.from_models(small, large)."
        )
    for name in ("custom_generate", "assistant_model", "prompt_lookup_num_tokens"):
        if kwargs.get(name) is not None:
            raise ValueError(f"Strategy {STRATEGY!r} is its own drafter and decoding loop: drop `{name}`.")
    for role in ("small", "large"):
        reason = decoding_refusal(getattr(model, role))
        if reason is not None:
            raise ValueError(
                f"Strategy {STRATEGY!r} verifies drafts and rolls both members' KV caches back, which the {role} model "
                f"does not allow: {reason}. Use strategy='cascade' with deferral='sequence'."
            )
    if kwargs.get("do_sample"):
        raise ValueError(f"Strategy {STRATEGY!r} is greedy; got do_sample=True.")
    params = _resolve_params(model, generation_config, kwargs)
    if inputs is None:
        inputs = kwargs.pop("input_ids", None)
    if inputs is None:
        raise ValueError(
            f"strategy={STRATEGY!r} needs prompt ids: pass `inputs` (or `input_ids`) of shape (1, prompt_len)."
        )
    config = _member_generation_config(generation_config, model)
    for name in SPECULATIVE_DEFAULTS:
        config.__dict__.pop(name, None)
    streamer = kwargs.pop("streamer", None)
    config = _move_stop_strings_to_criteria(model.small, config, kwargs)

    def loop(small, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        return _decode_loop(
            model,
            small,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            model_kwargs,
            params,
            streamer,
        )

    # `GenerationMixin.generate` directly: the small model's own `generate` may be a strategy dispatcher. The loop keeps
    # its own caches whatever `use_cache` the members' configs hold (a trained model may have saved use_cache=False).
    kwargs["use_cache"] = True
    return GenerationMixin.generate(
        model.small, inputs, generation_config=config, custom_generate=loop, streamer=streamer, **kwargs
    )
