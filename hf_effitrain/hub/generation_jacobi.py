"""Exact greedy Jacobi and TR-Jacobi decoding for any causal LM of transformers (MSN paper, arXiv 2406.17404).

Both strategies guess several future tokens, verify them all in ONE forward, and keep the longest prefix that greedy
decoding would have produced, plus the model's own next token (the "bonus"): the output is token for token the one of
`model.generate(do_sample=False)`, only with fewer forwards when the guesses are good.

- `jacobi`: the current token + `jacobi_draft_len` drafts in a causal chain. The predictions at rejected positions
  become the next drafts (Jacobi iteration); the tail is refilled with tokens drawn from the verified history, which is
  the "ahead" noise an MSN model was trained to denoise.
- `tr_jacobi`: a static tree (69 tokens by default, depth 5): per depth the top-`tree_top_k` tokens the previous step
  predicted there, plus a retrieval chain (the tokens that followed the longest recurring suffix of the text). One
  forward with a tree attention mask (a node sees the prefix, its ancestors and itself); the longest accepted
  root-to-leaf path wins and its keys/values are compacted into place in the `DynamicCache`, the rest is cropped.

Both go through `GenerationMixin.generate(model, ..., custom_generate=<loop>)`, so transformers prepares everything a
user relies on (generation-config merge, attention mask, stopping criteria with EOS / `max_new_tokens`, logits
processors, the cache), and return what `model.generate` returns. With `return_dict_in_generate=True` the output is a
`JacobiGenerateOutput` that also carries `num_forwards`, `accepted_lengths` and `tokens_per_forward`.

Strategy parameters are `GenerationConfig` entries (see `STRATEGY_DEFAULTS`), settable per call as keyword arguments.
This file ships inside checkpoints (`hub/`): it imports only stdlib, torch, transformers and single-dot siblings.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor, UnbatchedClassifierFreeGuidanceLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .generation_jacobi_tree import DraftTree, SuffixIndex, chain_nodes, tr_jacobi_nodes

__all__ = [
    "STRATEGY_DEFAULTS",
    "JacobiGenerateOutput",
    "add_strategy_defaults",
    "jacobi_generate",
    "tr_jacobi_generate",
]

logger = logging.getLogger(__name__)

# GenerationConfig entries read by the two strategies (a call's keyword argument wins over the config's value).
STRATEGY_DEFAULTS: dict[str, int] = {
    "jacobi_draft_len": 5,  # drafts after the current token in a Jacobi step
    "tree_depth": 5,  # deepest tree level (TR-Jacobi)
    "tree_top_k": 10,  # candidates per depth (TR-Jacobi)
    "retrieval_ngram_size": 3,  # longest suffix looked up in prompt + generated text (TR-Jacobi)
    "retrieval_length": 5,  # tokens of the retrieval chain (TR-Jacobi)
    "draft_seed": 0,  # seed of the history-sampled filler drafts (any value gives the same output)
}
_NON_NEGATIVE = {"draft_seed"}
_ATTENTION_WITH_CUSTOM_MASKS = ("eager", "sdpa")
# Logits processors that keep state across calls (they expect exactly one call per generated token); the strategies
# call the processors once per draft node, so with these the output would silently differ from greedy's.
_STATEFUL_PROCESSORS = {
    UnbatchedClassifierFreeGuidanceLogitsProcessor: "guidance_scale",
    SynthIDTextWatermarkLogitsProcessor: "watermarking_config",
}


def add_strategy_defaults(generation_config: GenerationConfig) -> GenerationConfig:
    """Write the missing strategy entries of `STRATEGY_DEFAULTS` into `generation_config` (saved in generation_config.json).

    A config derived from the model config (`_from_model_config=True`) drops unknown entries when it is loaded back,
    so it is marked as a user config.
    """
    generation_config._from_model_config = False
    for name, value in STRATEGY_DEFAULTS.items():
        if getattr(generation_config, name, None) is None:
            setattr(generation_config, name, value)
    return generation_config


@dataclass
class JacobiGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus decoding statistics.

    Args:
        num_forwards (`int`): model forwards, the prefill included (greedy needs one per new token).
        accepted_lengths (`list[int]`): new tokens gained by each forward (the prefill gains 1).
        tokens_per_forward (`float`): new tokens / forwards (greedy: 1.0).
    """

    num_forwards: int | None = None
    accepted_lengths: list[int] | None = None
    tokens_per_forward: float | None = None


def _resolve_params(model, generation_config, kwargs: dict[str, Any], names: tuple[str, ...]) -> dict[str, int]:
    """Pop the strategy parameters from `kwargs`, else take the passed config's, else the model's own (the
    checkpoint's `generation_config.json`), else the defaults, and validate them."""
    configs = (generation_config, getattr(model, "generation_config", None))
    params = {}
    for name in names:
        value = kwargs.pop(name, None)
        for config in configs:
            if value is None:
                value = getattr(config, name, None)
        if value is None:
            value = STRATEGY_DEFAULTS[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
        if value < 0 or (value == 0 and name not in _NON_NEGATIVE):
            allowed = "a non-negative int" if name in _NON_NEGATIVE else "a positive int"
            raise ValueError(f"`{name}` must be {allowed}, got {value}.")
        params[name] = value
    return params


def _run(model, inputs, generation_config, kwargs: dict[str, Any], strategy: str, tree_nodes_fn, seed: int):
    """Let transformers prepare the call, then decode with `_decode_loop` over the trees made by `tree_nodes_fn`."""
    if kwargs.get("custom_generate") is not None:
        raise ValueError(f"`custom_generate` cannot be combined with strategy {strategy!r}.")
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
        raise ValueError(f"Strategy {strategy!r} is its own drafter: drop `assistant_model` / `prompt_lookup_num_tokens`.")
    if kwargs.get("do_sample"):
        raise ValueError(f"Strategy {strategy!r} is greedy only (exact greedy decoding); got do_sample=True.")
    streamer = kwargs.pop("streamer", None)
    generation_config = _move_stop_strings_to_criteria(model, generation_config, kwargs)

    def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        return _decode_loop(
            model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs,
            strategy=strategy, tree_nodes_fn=tree_nodes_fn, seed=seed, streamer=streamer,
        )

    # `GenerationMixin.generate` directly: the model's own `generate` may be a strategy dispatcher (recursion).
    return GenerationMixin.generate(model, inputs, generation_config=generation_config, custom_generate=loop, streamer=streamer, **kwargs)


def _move_stop_strings_to_criteria(model, generation_config, kwargs: dict[str, Any]):
    """Turn `stop_strings` into a `StopStringCriteria` in `kwargs["stopping_criteria"]`, and return the config to pass.

    With a callable `custom_generate`, transformers drops the `tokenizer` argument before building the stopping
    criteria, so `stop_strings` would fail there: the criterion is built here (what greedy `generate` builds) and the
    config the call uses gets `stop_strings=None`. Precedence as in `generate`: keyword > `generation_config` > model's.
    """
    tokenizer = kwargs.pop("tokenizer", None)
    from_kwargs = kwargs.pop("stop_strings", None)
    from_config = getattr(generation_config, "stop_strings", None)
    from_model = getattr(getattr(model, "generation_config", None), "stop_strings", None)
    stop_strings = next((value for value in (from_kwargs, from_config, from_model) if value is not None), None)
    if stop_strings is None:
        return generation_config
    if tokenizer is None:
        raise ValueError(
            "There are one or more stop strings, either in the arguments to `generate` or in the model's generation "
            "config, but we could not locate a tokenizer. When generating with stop strings, you must pass the "
            "model's tokenizer to the `tokenizer` argument of `generate`."
        )
    if from_config is not None:
        generation_config = copy.deepcopy(generation_config)
        generation_config.stop_strings = None
    if from_model is not None:
        kwargs["stop_strings"] = None  # `generate` would fill a missing value in from the model's generation config
    criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
    if not any(type(criterion) is StopStringCriteria for criterion in criteria):  # a user's own one wins, as in generate
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria
    return generation_config


def jacobi_generate(model, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
    """Exact greedy Jacobi decoding: the current token + `jacobi_draft_len` drafts per forward.

    Args:
        model (`PreTrainedModel`): any causal LM of transformers (batch size 1, greedy).
        inputs (`torch.LongTensor` of shape `(1, seq)`): the prompt ids.
        generation_config (`GenerationConfig`, *optional*): as for `model.generate`; may hold `jacobi_draft_len`
            and `draft_seed`, which a keyword argument of the same name overrides.
        **kwargs: anything `model.generate` takes (`max_new_tokens`, `attention_mask`, `streamer`,
            `return_dict_in_generate`, stopping criteria, logits processors...).
    Returns:
        What `model.generate` returns; a `JacobiGenerateOutput` with statistics when `return_dict_in_generate=True`.
    """
    params = _resolve_params(model, generation_config, kwargs, ("jacobi_draft_len", "draft_seed"))
    draft_len = params["jacobi_draft_len"]
    return _run(model, inputs, generation_config, kwargs, "jacobi", lambda: (chain_nodes(draft_len), 1, None), params["draft_seed"])


def tr_jacobi_generate(model, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
    """Exact greedy TR-Jacobi decoding: one forward over a static draft tree per step (see the module docstring).

    Args:
        model (`PreTrainedModel`): any causal LM of transformers whose attention takes a 4D additive mask
            (`attn_implementation` "sdpa" or "eager"); batch size 1, greedy.
        inputs (`torch.LongTensor` of shape `(1, seq)`): the prompt ids.
        generation_config (`GenerationConfig`, *optional*): as for `model.generate`; may hold `tree_depth`,
            `tree_top_k`, `retrieval_ngram_size`, `retrieval_length`, `draft_seed` (keyword arguments override them).
        **kwargs: anything `model.generate` takes.
    Returns:
        What `model.generate` returns; a `JacobiGenerateOutput` with statistics when `return_dict_in_generate=True`.
    """
    names = ("tree_depth", "tree_top_k", "retrieval_ngram_size", "retrieval_length", "draft_seed")
    params = _resolve_params(model, generation_config, kwargs, names)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in _ATTENTION_WITH_CUSTOM_MASKS:
        raise ValueError(
            f"tr_jacobi needs a custom tree attention mask, which {type(model).__name__} with attn_implementation="
            f"{impl!r} cannot take; load the model with attn_implementation in {list(_ATTENTION_WITH_CUSTOM_MASKS)}."
        )
    forward_args = inspect.signature(model.forward).parameters
    if "attention_mask" not in forward_args or "position_ids" not in forward_args:
        raise ValueError(f"tr_jacobi needs a model whose forward takes `attention_mask` and `position_ids`; {type(model).__name__} does not.")
    depth, top_k = params["tree_depth"], params["tree_top_k"]
    retrieval = (params["retrieval_ngram_size"], params["retrieval_length"])
    nodes_fn = lambda: (tr_jacobi_nodes(depth, top_k, retrieval[1]), top_k, retrieval)  # noqa: E731
    return _run(model, inputs, generation_config, kwargs, "tr_jacobi", nodes_fn, params["draft_seed"])


class _Stopper:
    """Decides, on the host, how many of a step's accepted tokens greedy decoding would have kept.

    `max_length` and EOS criteria (what `max_new_tokens` / `eos_token_id` create) are checked on the host tokens the
    acceptance sync already brought back; any other criterion is evaluated token by token exactly as `_sample` does.
    """

    def __init__(self, stopping_criteria, max_length: int):
        self.criteria = stopping_criteria
        self.max_length = max_length
        self.eos: set[int] = set()
        self.generic = []
        for criterion in stopping_criteria:
            if isinstance(criterion, MaxLengthCriteria):
                self.max_length = min(self.max_length, criterion.max_length)
            elif isinstance(criterion, EosTokenCriteria):
                self.eos.update(int(t) for t in criterion.eos_token_id.reshape(-1).tolist())
            else:
                self.generic.append(criterion)

    def keep(self, sequence: torch.Tensor, tokens: list[int], scores, step_scores=()) -> tuple[int, bool]:
        """(how many of `tokens` to append to `sequence`, whether generation ends after them).

        `scores` is the tuple collected so far (None when scores are not collected) and `step_scores` the scores of
        `tokens`: as in `_sample`, the criteria for token `i` see the scores up to and including token `i`'s.
        """
        length = sequence.shape[1]
        for i, token in enumerate(tokens):
            done = length + i + 1 >= self.max_length or token in self.eos
            if self.generic and not done:
                candidate = torch.cat([sequence, sequence.new_tensor(tokens[: i + 1])[None]], dim=1)
                seen = None if scores is None else scores + tuple(step_scores[: i + 1])
                done = bool(torch.stack([c(candidate, seen).reshape(-1)[0] for c in self.generic]).any())
            if done:
                return i + 1, True
        return len(tokens), False


def _check_cache(cache, strategy: str, max_length: int, model, offset: int = 0) -> None:
    """Refuse what cannot be rolled back; `offset`: prompt positions given as `inputs_embeds` (not in `max_length`)."""
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"Strategy {strategy!r} rolls the cache back and needs a DynamicCache, got {type(cache).__name__} "
            f"(drop `cache_implementation` / `past_key_values`, and keep use_cache=True)."
        )
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise ValueError(f"Strategy {strategy!r} cannot roll back cache layers of type {type(layer).__name__} ({type(model).__name__}).")
        if strategy == "tr_jacobi" and isinstance(layer, DynamicSlidingWindowLayer) and offset + max_length > layer.sliding_window:
            embeds = f" + {offset} `inputs_embeds` positions" if offset else ""
            raise ValueError(
                f"tr_jacobi's tree mask covers full attention only; {type(model).__name__} has a sliding window of "
                f"{layer.sliding_window} tokens, shorter than max_length={max_length}{embeds}. Use strategy 'jacobi' or fewer tokens."
            )
    cache.activate_past_recording()  # sliding-window layers keep their states until `crop`


def _compact_cache(cache: DynamicCache, start: int, source: torch.Tensor, remove: int) -> None:
    """Move the keys/values at positions `source` to `start, start+1, ...`, then drop the last `remove` positions."""
    if source.numel():
        target = torch.arange(start, start + source.numel(), device=source.device)
        for layer in cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys[:, :, target] = layer.keys[:, :, source]
                layer.values[:, :, target] = layer.values[:, :, source]
    cache.crop(-remove)  # also with remove == 0: sliding-window layers then drop what they no longer need


def _process_scores(logits_processor, sequence: torch.Tensor, tokens: torch.Tensor, tree: DraftTree, logits: torch.Tensor) -> torch.Tensor:
    """Apply the logits processors to every node's logits with the node's own prefix, as `_sample` would (slow path)."""
    if not len(logits_processor):
        return logits
    rows = []
    for node, ancestors in enumerate(tree.ancestors):
        prefix = torch.cat([sequence, tokens[ancestors][None]], dim=1) if ancestors else sequence
        rows.append(logits_processor(prefix, logits[node : node + 1]))
    return torch.cat(rows, dim=0)


def _decode_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, *, strategy, tree_nodes_fn, seed, streamer):
    if generation_config.do_sample or generation_config.num_beams != 1:
        raise ValueError(
            f"Strategy {strategy!r} is exact greedy decoding; got do_sample={generation_config.do_sample}, "
            f"num_beams={generation_config.num_beams}. Use strategy='plain' for sampling or beam search."
        )
    if input_ids.shape[0] != 1:
        raise ValueError(f"Strategy {strategy!r} supports batch size 1 only, got a batch of {input_ids.shape[0]} (num_return_sequences included).")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(f"Strategy {strategy!r} does not return attentions or hidden states.")
    if not model_kwargs.get("use_cache", True):
        raise ValueError(f"Strategy {strategy!r} needs use_cache=True.")
    for processor in logits_processor:
        origin = next((flag for kind, flag in _STATEFUL_PROCESSORS.items() if isinstance(processor, kind)), None)
        if origin is not None:
            raise ValueError(
                f"Strategy {strategy!r} cannot use {type(processor).__name__} (from `{origin}`): "
                f"it keeps state across calls and expects one call per generated token, while the strategy applies the "
                f"logits processors to every draft, so the output would silently differ from greedy's. Use strategy='plain'."
            )
    cache = model_kwargs.get("past_key_values")
    stopper = _Stopper(stopping_criteria, stopping_criteria.max_length or generation_config.max_length)
    # A prompt given as `inputs_embeds` fills the cache without appearing in `input_ids` (nor in `max_length`).
    embeds = model_kwargs.get("inputs_embeds")
    offset = max(embeds.shape[1] - input_ids.shape[1], 0) if embeds is not None else 0
    _check_cache(cache, strategy, stopper.max_length, model, offset)
    want_dict = generation_config.return_dict_in_generate
    scores = () if want_dict and generation_config.output_scores else None
    raw_logits = () if want_dict and generation_config.output_logits else None
    device = input_ids.device
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32

    # 1. Prefill exactly as greedy `_sample` does, and take its first token.
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
    cache = outputs.past_key_values
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
    processed = logits_processor(input_ids, logits)
    first = torch.argmax(processed, dim=-1)
    kept, done = stopper.keep(input_ids, first.tolist(), scores, (processed,))
    if scores is not None:
        scores += (processed,)
    if raw_logits is not None:
        raw_logits += (logits,)
    sequence = torch.cat([input_ids, first[:, None]], dim=1)
    accepted_lengths = [1]
    if streamer is not None:
        streamer.put(first.cpu())
    cache_len = cache.get_seq_length()  # the prompt's positions (ids or `inputs_embeds`)
    del outputs

    nodes, top_k, retrieval = tree_nodes_fn()
    full_tree = DraftTree(nodes, device, dtype)
    trees = {full_tree.max_depth: full_tree}
    # Positions and the prompt's padding continue from what transformers prepared (left padding in a batch-1 mask).
    position = int(model_kwargs["position_ids"][0, -1]) if model_kwargs.get("position_ids") is not None else cache_len
    prompt_mask = model_kwargs.get("attention_mask")
    pad_bias = None
    if prompt_mask is not None and not bool(prompt_mask.all()):
        pad_bias = torch.zeros(1, offset + stopper.max_length, dtype=dtype, device=device)
        pad_bias[:, : prompt_mask.shape[1]].masked_fill_(prompt_mask[:, :].to(device) == 0, torch.finfo(dtype).min)
    generator = torch.Generator(device=device).manual_seed(seed)
    table_width = top_k + (1 if retrieval else 0)
    candidates = None  # (depth, width) candidate table; None: first step, filled from history
    index = SuffixIndex(input_ids[0].tolist() + first.tolist(), retrieval[0]) if retrieval else None

    while not done:
        remaining = stopper.max_length - sequence.shape[1]  # tokens still allowed after the current one
        depth = min(full_tree.max_depth, remaining - 1)
        if depth not in trees:
            trees[depth] = full_tree.cut(depth)
        tree = trees[depth]
        n_nodes = tree.size

        # 2. Fill the tree: predicted candidates, then history-sampled filler, then the retrieval chain.
        history = sequence[0]
        filler = history[torch.randint(0, history.shape[0], (full_tree.max_depth, table_width), generator=generator, device=device)]
        table = filler
        if candidates is not None:
            table[: candidates.shape[0], : candidates.shape[1]] = candidates
        if index is not None and (continuation := index.lookup(min(retrieval[1], full_tree.max_depth))):
            table[: len(continuation), top_k] = torch.tensor(continuation, device=device)
        tokens = torch.cat([history[-1:], table[tree.rows, tree.columns]])

        # 3. One forward over the current token and all drafts.
        position_ids = (tree.depth + position)[None]
        if tree.is_chain:
            mask = None if prompt_mask is None else torch.cat([prompt_mask, prompt_mask.new_ones(1, cache_len + n_nodes - prompt_mask.shape[1])], dim=1)
        else:
            prefix = torch.zeros(n_nodes, cache_len, dtype=dtype, device=device) if pad_bias is None else pad_bias[:, :cache_len].expand(n_nodes, -1)
            mask = torch.cat([prefix, tree.bias[:n_nodes, :n_nodes]], dim=1)[None, None]
        out = model(input_ids=tokens[None], position_ids=position_ids, attention_mask=mask, past_key_values=cache, use_cache=True, return_dict=True)
        logits = out.logits[0].to(dtype=torch.float32, device=device)
        processed = _process_scores(logits_processor, sequence, tokens, tree, logits)
        predicted = torch.argmax(processed, dim=-1)

        # 4. Accept the longest root-to-leaf path whose drafts equal greedy's predictions (padding never matches).
        path_tokens, path_predicted = tokens[tree.paths], predicted[tree.paths]
        agree = (path_tokens[:, 1:] == path_predicted[:, :-1]) & tree.valid[:, 1:]
        accepted = agree.long().cumprod(dim=1).sum(dim=1)
        best = torch.argmax(accepted)
        packed = torch.cat([best.view(1), accepted[best].view(1), path_predicted[best]]).tolist()  # the one sync
        best, n_accepted = packed[0], packed[1]
        new_tokens = packed[2 : 3 + n_accepted]
        path = tree.paths[best]
        step_scores = tuple(processed[path[: n_accepted + 1]].split(1)) if scores is not None else ()
        kept, done = stopper.keep(sequence, new_tokens, scores, step_scores)
        if scores is not None:
            scores += step_scores[:kept]
        if raw_logits is not None:
            raw_logits += tuple(logits[path[:kept]].split(1))
        sequence = torch.cat([sequence, path_predicted[best, :kept][None]], dim=1)
        accepted_lengths.append(kept)
        if index is not None and not done:
            index.extend(new_tokens[:kept])
        if streamer is not None:  # one token per call, as greedy: text streamers decode at token boundaries
            for token in new_tokens[:kept]:
                streamer.put(torch.tensor([token]))

        # 5. Keep the cache of the accepted path only (the root and `kept - 1` drafts), and roll back the rest.
        source = cache_len + path[1:kept] if not tree.is_chain else path[:0]
        _compact_cache(cache, cache_len + 1, source, n_nodes - kept)
        cache_len += kept
        position += kept

        # 6. Next candidates: top-k of the predictions at the rejected nodes of the best path (Jacobi reuse).
        rejected = path[n_accepted + 1 : len(tree.path_lists[best])]  # host-known length: no boolean-mask sync
        candidates = torch.topk(processed[rejected], k=min(top_k, processed.shape[-1]), dim=-1).indices if top_k > 1 else predicted[rejected][:, None]
        del out

    if done and cache is not None and cache.get_seq_length() > cache_len:
        cache.crop(-(cache.get_seq_length() - cache_len))
    if streamer is not None:
        streamer.end()
    num_forwards = len(accepted_lengths)
    new = sum(accepted_lengths)
    logger.info("%s: %d new tokens in %d forwards (%.2f tokens per forward)", strategy, new, num_forwards, new / num_forwards)
    if want_dict:
        return JacobiGenerateOutput(
            sequences=sequence,
            scores=scores,
            logits=raw_logits,
            past_key_values=cache,
            num_forwards=num_forwards,
            accepted_lengths=accepted_lengths,
            tokens_per_forward=new / num_forwards,
        )
    return sequence
