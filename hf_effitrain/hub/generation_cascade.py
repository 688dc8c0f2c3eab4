"""`generate(strategy="cascade")`: decode with a small model and defer to a large one when the small is unsure.

Two granularities (the cascade config's `deferral`, overridable per call):

- `"sequence"`: the small model answers (its own `generate`); every answer whose Chow score (`cascade_rules.py`) is
  below `threshold` is answered again, from the prompt, by the large model's `generate`.
- `"token"`: greedy decoding where each new token comes from the small model unless the log-prob of its greedy
  token is below `threshold`; then the large model produces that token. Both models see every emitted token: the
  large model's KV cache is brought up to date lazily (one forward over the tokens it has not seen yet) the next time
  it is asked for a token, so it costs nothing while the small model is confident.

`threshold=float("inf")` defers everything (the output is the large model's greedy output, token for token) and
`float("-inf")` nothing (the small model's). Decisions and shares are returned in a [`CascadeGenerateOutput`] with
`return_dict_in_generate=True` and always stored as a dict in `model.cascade_stats`.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cascade_rules import generated_mask, sequence_scores, token_logprobs
from .configuration_cascade import check_deferral_settings
from .decoding_support import check_cascade_member
from .transformers_compat import (
    cache_from_model_kwargs,
    cache_param_name,
    output_cache,
    pad_token_tensor,
    supports_logits_to_keep,
)

_CASCADE_KWARGS = ("deferral", "rule", "threshold", "quantile")


@dataclass
class CascadeGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus the cascade's decisions.

    Args:
        deferred (`torch.BoolTensor`):
            `(batch,)` at sequence level (True: the large model answered); `(batch, new_tokens)` at token level
            (True: the large model produced that token; False on padding after EOS).
        deferral_scores (`torch.FloatTensor`):
            The scores compared with the threshold: `(batch,)` Chow scores, or `(batch, new_tokens)` small-model
            log-probs of its greedy tokens (NaN on padding).
        deferred_share (`float`):
            Share of sequences (sequence level) or emitted tokens (token level) that the large model produced.
    """

    deferred: torch.BoolTensor | None = None
    deferral_scores: torch.FloatTensor | None = None
    deferred_share: float | None = None


def _member_generation_config(generation_config: GenerationConfig | None, model) -> GenerationConfig:
    """The cascade's generation config without its `strategy` entry, so members decode with plain `generate`."""
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    config.__dict__.pop("strategy", None)
    return config


def _eos_and_pad(config: GenerationConfig, member) -> tuple[list[int], int | None]:
    eos = config.eos_token_id
    if eos is None:
        eos = member.generation_config.eos_token_id
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = config.pad_token_id
    if pad is None:
        pad = member.generation_config.pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]
    return eos_ids, pad


def _right_pad(rows: list[torch.Tensor], width: int, pad: int | None) -> torch.Tensor:
    out = rows[0].new_full((len(rows), width), 0 if pad is None else pad)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


def _sequence_cascade(model, input_ids, config, kwargs, rule, threshold, quantile):
    """Sequence-level deferral; returns (sequences, deferred (B,), scores (B,), emitted mask, deferred tokens mask)."""
    prompt_len = input_ids.shape[1]
    small_config = copy.deepcopy(config)
    small_config.update(return_dict_in_generate=True, output_logits=True)
    small_out = model.small.generate(input_ids, generation_config=small_config, **kwargs)
    small_new = small_out.sequences[:, prompt_len:]
    eos_ids, pad = _eos_and_pad(config, model.small)
    small_mask = generated_mask(small_new, eos_ids)
    logprobs = token_logprobs(torch.stack(small_out.logits, dim=1), small_new)
    scores = sequence_scores(logprobs, small_mask, rule, quantile)
    deferred = scores < threshold
    if not deferred.any():
        return small_out.sequences, deferred, scores, small_mask, torch.zeros_like(small_mask)

    batch = input_ids.shape[0]
    large_kwargs = {
        k: (v[deferred] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v) for k, v in kwargs.items()
    }
    large_sequences = model.large.generate(input_ids[deferred], generation_config=config, **large_kwargs)
    if deferred.all():
        new = large_sequences[:, prompt_len:]
        mask = generated_mask(new, eos_ids)
        return large_sequences, deferred, scores, mask, mask.clone()

    rows = []
    large_rows = iter(large_sequences[:, prompt_len:])
    for i in range(batch):
        new = next(large_rows) if deferred[i] else small_new[i]
        emitted = generated_mask(new.unsqueeze(0), eos_ids)[0]
        rows.append(new[: int(emitted.sum())])  # right-padded again below to the longest answer
    width = max(r.shape[0] for r in rows)
    new_tokens = _right_pad(rows, width, pad)
    emitted = torch.zeros_like(new_tokens, dtype=torch.bool)
    for i, r in enumerate(rows):
        emitted[i, : r.shape[0]] = True
    sequences = torch.cat([input_ids, new_tokens], dim=1)
    return sequences, deferred, scores, emitted, emitted & deferred.unsqueeze(1)


class _Member:
    """One member's KV cache and forward, fed only the tokens it has not seen yet (mirrors `generate`'s `_sample`).

    Shared by the token-level cascade (one new position per call) and the speculative cascade (drafts verified in
    one call, then `roll_back` to the accepted tokens).
    """

    def __init__(self, model, cache, base_kwargs: dict[str, Any]):
        self.model, self.cache = model, cache
        self.use_logits_to_keep = supports_logits_to_keep(model)
        self.cache_kwarg = cache_param_name(type(model).prepare_inputs_for_generation)
        self.accepts_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        self.base_kwargs = base_kwargs
        self.forwards = 0
        self.forward_tokens = 0

    def logits(self, input_ids: torch.LongTensor, attention_mask, position_ids, keep: int = 1) -> torch.Tensor:
        """Float32 logits `(batch, keep, vocab)` of the last `keep` positions of `input_ids` `(batch, length)`."""
        seen = self.cache.get_seq_length()
        n_new = input_ids.shape[1] - seen
        if n_new < keep:
            raise RuntimeError(f"Asked for the logits of {keep} positions but only {n_new} are new to the cache (bug).")
        kwargs = {**self.base_kwargs, self.cache_kwarg: self.cache, "use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None and self.accepts_position_ids:
            kwargs["position_ids"] = position_ids
        if self.use_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        inputs = self.model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=n_new, is_first_iteration=seen == 0, **kwargs
        )
        outputs = self.model(**inputs, return_dict=True)
        self.cache = output_cache(outputs)
        self.forwards += 1
        self.forward_tokens += n_new * input_ids.shape[0]
        return outputs.logits[:, -keep:].to(copy=True, dtype=torch.float32)

    def next_logits(self, input_ids: torch.LongTensor, attention_mask, position_ids) -> torch.Tensor:
        """Float32 logits `(batch, vocab)` of the next token."""
        return self.logits(input_ids, attention_mask, position_ids, keep=1)[:, -1]

    def roll_back(self, length: int) -> None:
        """Keep the first `length` cached positions (a member that lags behind keeps what it has)."""
        excess = self.cache.get_seq_length() - length
        if excess >= 0:
            self.cache.crop(-excess)  # crop(0) also lets sliding-window layers drop what they no longer need


def _token_cascade(model, input_ids, config, kwargs, threshold):
    """Token-level greedy deferral, run inside the small model's `generate` so that stopping criteria, logits
    processors, masks and position ids are prepared exactly as for its greedy decoding."""
    result: dict[str, Any] = {}

    def _loop(small, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        pad = pad_token_tensor(generation_config, input_ids.device)
        attention_mask = model_kwargs.pop("attention_mask", None)
        position_ids = model_kwargs.pop("position_ids", None)
        small_cache = cache_from_model_kwargs(model_kwargs)
        for name in ("cache", "past_key_values"):
            model_kwargs.pop(name, None)
        model_kwargs.pop("use_cache", None)
        model_kwargs.pop("logits_to_keep", None)
        large_cache = DynamicCache(config=model.large.config.get_text_config(decoder=True))
        members = (_Member(small, small_cache, model_kwargs), _Member(model.large, large_cache, model_kwargs))
        batch, prompt_len = input_ids.shape
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        confidences, deferrals, emitted = [], [], []
        while True:
            small_logits = members[0].next_logits(input_ids, attention_mask, position_ids)
            small_scores = logits_processor(input_ids, small_logits)
            token = small_scores.argmax(-1)
            confidence = torch.log_softmax(small_logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
            defer = (confidence < threshold) & unfinished
            if defer.any():
                large_logits = members[1].next_logits(input_ids, attention_mask, position_ids)
                large_token = logits_processor(input_ids, large_logits).argmax(-1)
                token = torch.where(defer, large_token, token)
            if pad is not None:
                token = torch.where(unfinished, token, pad.to(token.device))
            confidences.append(confidence.masked_fill(~unfinished, float("nan")))
            deferrals.append(defer)
            emitted.append(unfinished.clone())
            input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
            if position_ids is not None:
                position_ids = torch.cat([position_ids, position_ids[..., -1:] + 1], dim=-1)
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
            if not unfinished.any():
                break
        result.update(
            confidences=torch.stack(confidences, 1),
            deferred=torch.stack(deferrals, 1),
            emitted=torch.stack(emitted, 1),
            large_forward_tokens=members[1].forward_tokens,
        )
        return input_ids

    # the loop needs the small model's cache whatever `use_cache` its config holds (training may save use_cache=False)
    sequences = model.small.generate(
        input_ids, generation_config=config, custom_generate=_loop, **{**kwargs, "use_cache": True}
    )
    return sequences, result


def cascade_generate(
    model, inputs: torch.LongTensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
):
    """Generate with the cascade `model` (a `CascadeForCausalLM`): `model.generate(strategy="cascade", ...)`.

    Args:
        model (`CascadeForCausalLM`): holds `small`, `large` and the deferral settings in its config.
        inputs (`torch.LongTensor` of shape `(batch, prompt_len)`): prompt ids (left-padded for batches, with
            `attention_mask`).
        generation_config (`GenerationConfig`, *optional*): applies to both members; defaults to the cascade's.
        deferral (`str`, *optional*): `"sequence"` or `"token"`; defaults to `model.config.deferral`.
        rule (`str`, *optional*): `"chow_sum"`, `"chow_average"` or `"chow_quantile"` (sequence level).
        threshold (`float`, *optional*): defer when the score is below it; `<= 0`, `inf` or `-inf`.
        quantile (`float`, *optional*): alpha of `"chow_quantile"`.
        kwargs: everything else goes to the members' `generate` (`max_new_tokens`, `attention_mask`, ...).

    Returns:
        The sequences `(batch, prompt_len + new)`, or a [`CascadeGenerateOutput`] when `return_dict_in_generate=True`.
        `model.cascade_stats` holds the shares of sequences and tokens deferred and the large model's forward tokens.

    Raises:
        ValueError: on a model that is not a cascade, an invalid deferral setting, beam search or several
            sequences per prompt, or token-level deferral with sampling (token-level deferral is greedy).
    """
    if not (hasattr(model, "small") and hasattr(model, "large") and hasattr(model.config, "deferral")):
        raise ValueError(
            f"strategy='cascade' needs a cascade model (CascadeForCausalLM with `small` and `large` members), got "
            f"{type(model).__name__}. Build one with CascadeForCausalLM.from_models(small, large)."
        )
    settings = {name: kwargs.pop(name, None) for name in _CASCADE_KWARGS}
    deferral = settings["deferral"] if settings["deferral"] is not None else model.config.deferral
    rule = settings["rule"] if settings["rule"] is not None else model.config.rule
    threshold = settings["threshold"] if settings["threshold"] is not None else model.config.threshold
    quantile = settings["quantile"] if settings["quantile"] is not None else model.config.quantile
    check_deferral_settings(deferral, rule, threshold, quantile)
    threshold = float(threshold)

    if inputs is None:
        inputs = kwargs.pop("input_ids", None)
    if inputs is None:
        raise ValueError(
            "strategy='cascade' needs prompt ids: pass `inputs` (or `input_ids`) of shape (batch, prompt_len)."
        )
    config = _member_generation_config(generation_config, model)
    kwargs = config.update(**kwargs)  # generation settings go into the config, the rest are model inputs
    return_dict = bool(config.return_dict_in_generate)
    config.update(return_dict_in_generate=False, output_scores=False, output_logits=False)
    if (config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1:
        raise ValueError(
            f"Cascade generation returns one answer per prompt without beam search; got num_beams={config.num_beams}, "
            f"num_return_sequences={config.num_return_sequences}."
        )
    if deferral == "token" and config.do_sample:
        raise ValueError(
            "Token-level deferral is greedy; got do_sample=True. Use deferral='sequence' to sample with the members."
        )

    prompt_len = inputs.shape[1]
    if deferral == "sequence":
        sequences, deferred, scores, emitted, from_large = _sequence_cascade(
            model, inputs, config, kwargs, rule, threshold, quantile
        )
        share = float(deferred.float().mean()) if deferred.numel() else 0.0
        large_tokens = None
    else:
        for role in ("small", "large"):
            check_cascade_member(getattr(model, role), role)
        sequences, result = _token_cascade(model, inputs, config, kwargs, threshold)
        deferred, scores, emitted = result["deferred"], result["confidences"], result["emitted"]
        from_large = deferred
        share = float(deferred.sum()) / max(int(emitted.sum()), 1)
        large_tokens = result["large_forward_tokens"]

    model.cascade_stats = {
        "deferral": deferral,
        "rule": rule if deferral == "sequence" else "token_confidence",
        "threshold": threshold,
        "sequences": int(inputs.shape[0]),
        "sequences_deferred": int(deferred.any(-1).sum() if deferred.dim() > 1 else deferred.sum()),
        "tokens": int(emitted.sum()),
        "tokens_deferred": int(from_large.sum()),
        "deferred_share": share,
        "token_share": float(from_large.sum()) / max(int(emitted.sum()), 1),
        "large_forward_tokens": large_tokens,
        "new_tokens": int(sequences.shape[1] - prompt_len),
    }
    if not return_dict:
        return sequences
    return CascadeGenerateOutput(sequences=sequences, deferred=deferred, deferral_scores=scores, deferred_share=share)


__all__ = ["CascadeGenerateOutput", "cascade_generate"]
