"""Exact greedy Jacobi and TR-Jacobi decoding for any causal LM of transformers (MSN paper, arXiv 2406.17404).

Both strategies guess several future tokens, verify them all in ONE forward, and keep the longest prefix that greedy
decoding would have produced, plus the model's own next token (the "bonus"): the output is token for token the one of
`model.generate(do_sample=False)`, only with fewer forwards when the guesses are good.

- `jacobi`: the current token + `jacobi_draft_len` drafts in a causal chain. The predictions at rejected positions
  become the next drafts (Jacobi iteration); the tail is refilled with tokens drawn from the verified history, which is
  the "ahead" noise an MSN model was trained to denoise.
- `tr_jacobi`: a token tree verified with a tree attention mask (a node sees the prefix, its ancestors and itself).
  Candidates per depth: the top-`tree_top_k` tokens the previous step predicted there, retrieval branches (the
  frequency-ranked continuations of the text's longest recurring suffix, `suffix_drafter.py`; optionally a corpus
  `datastore=`, `retrieval_datastore.py`) and history-drawn filler. `tree="auto"` (default) verifies each step the
  tree that maximises expected new tokens per second on this device (`draft_tree_auto.py`), down to no drafts at
  all (greedy's own step) where drafts do not pay; `tree="msn"` is the paper's static 69-node tree.
  The accepted path's keys/values are compacted into place in the `DynamicCache`, the rest is cropped.

Per step: one forward, one host sync (greedy tokens + top-k come back together), no allocation that grows with the
prompt (the tree mask and the output ids live in buffers allocated once per call). Logits processors (min length,
repetition penalty, ...) are applied only to the nodes the acceptance walk reaches, one node at a time with its own
prefix: about one call per accepted token, as greedy makes, and one sync each.

Both go through `GenerationMixin.generate(model, ..., custom_generate=<loop>)`, so transformers prepares everything a
user relies on (generation-config merge, attention mask, stopping criteria with EOS / `max_new_tokens`, logits
processors, the cache), and return what `model.generate` returns. With `return_dict_in_generate=True` the output is a
`JacobiGenerateOutput` that also carries `num_forwards`, `accepted_lengths`, `tokens_per_forward` and `tree_sizes`.

Strategy parameters are `GenerationConfig` entries (see `STRATEGY_DEFAULTS`), settable per call as keyword arguments.
This file ships inside checkpoints (`hub/`): it imports only stdlib, torch, transformers and single-dot siblings.
"""

from __future__ import annotations

import copy
import inspect
import random
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import (
    SynthIDTextWatermarkLogitsProcessor,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .decoding_support import check_decoding_support
from .draft_memory import DraftMemory
from .draft_tree_auto import AcceptanceStats, Cell, StepTree, forward_cost, select_tree, static_step_tree
from .generation_jacobi_tree import chain_nodes, tr_jacobi_nodes
from .retrieval_datastore import RetrievalDatastore
from .suffix_drafter import SuffixDrafter
from .transformers_compat import (
    cache_from_model_kwargs,
    cache_output_field,
    model_cache_kwarg,
    output_cache,
    prefill,
    update_model_kwargs_after_prefill,
)

__all__ = [
    "STRATEGY_DEFAULTS",
    "JacobiGenerateOutput",
    "add_strategy_defaults",
    "jacobi_generate",
    "tr_jacobi_generate",
]

logger = logging.get_logger(__name__)

# GenerationConfig entries read by the two strategies (a call's keyword argument wins over the config's value).
STRATEGY_DEFAULTS: dict[str, int | str] = {
    "jacobi_draft_len": 5,  # drafts after the current token in a Jacobi step
    "tree": "auto",  # TR-Jacobi tree: "auto" (sized per step for this device) or "msn" (the paper's static tree)
    "tree_budget": 32,  # most draft nodes of an auto tree (0: greedy steps only)
    "tree_depth": 5,  # deepest level of predicted candidates (TR-Jacobi)
    "tree_top_k": 10,  # candidates per depth (TR-Jacobi)
    "retrieval_ngram_size": 3,  # longest suffix looked up in prompt + generated text (TR-Jacobi)
    "retrieval_length": 10,  # tokens per retrieval branch (auto tree; the static tree's chain stops at tree_depth)
    "retrieval_branches": 3,  # suffix-structure branches of an auto tree (the static tree has one)
    "datastore_branches": 2,  # branches from a `datastore=` (auto tree; the static tree uses the suffix one)
    "memory_branches": 2,  # branches from the memory of earlier outputs (auto tree)
    "draft_memory_tokens": 32768,  # size of the model's default memory of earlier outputs (0: none)
    "draft_seed": 0,  # seed of the history-sampled filler drafts (any value gives the same output)
}
TREES = {
    "auto": "sized per step for this device and the running acceptance",
    "msn": "the MSN paper's static 69-node tree",
}
_NON_NEGATIVE = {
    "draft_seed",
    "tree_budget",
    "retrieval_branches",
    "datastore_branches",
    "memory_branches",
    "draft_memory_tokens",
}
# Devices where nothing runs asynchronously, so a second device-to-host read costs nothing: the top-k is then computed
# only for the rows that seed the next step (CPU argmax/topk over all of a 69-token tree's rows costs ~5 ms here).
_SPLIT_SYNC_DEVICES = ("cpu",)
_SPINE_WEIGHT = 0.5  # value of a first-choice chain node's prediction for the next step, per calibrated pred hit
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
        tree_sizes (`list[int]`): tokens verified by each decoding step (root included; the prefill excluded).
        forward_cost (`dict`, *optional*): the measured forward seconds per token count an auto tree was sized with.
    """

    num_forwards: int | None = None
    accepted_lengths: list[int] | None = None
    tokens_per_forward: float | None = None
    tree_sizes: list[int] | None = None
    forward_cost: dict | None = None


def _resolve_params(model, generation_config, kwargs: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
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
        if name == "tree":
            if value not in TREES:
                allowed = ", ".join(f"{key!r} ({what})" for key, what in TREES.items())
                raise ValueError(f"Unknown `tree` {value!r}; allowed: {allowed}.")
            params[name] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
        if value < 0 or (value == 0 and name not in _NON_NEGATIVE):
            allowed = "a non-negative int" if name in _NON_NEGATIVE else "a positive int"
            raise ValueError(f"`{name}` must be {allowed}, got {value}.")
        params[name] = value
    return params


def _run(model, inputs, generation_config, kwargs: dict[str, Any], strategy: str, plan: "_TreePlan", seed: int):
    """Let transformers prepare the call, then decode with `_decode_loop` over the trees `plan` describes."""
    if kwargs.get("custom_generate") is not None:
        raise ValueError(f"`custom_generate` cannot be combined with strategy {strategy!r}.")
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
        raise ValueError(
            f"Strategy {strategy!r} is its own drafter: drop `assistant_model` / `prompt_lookup_num_tokens`."
        )
    if kwargs.get("do_sample"):
        raise ValueError(f"Strategy {strategy!r} is greedy only (exact greedy decoding); got do_sample=True.")
    streamer = kwargs.pop("streamer", None)
    generation_config = _move_stop_strings_to_criteria(model, generation_config, kwargs)
    if kwargs.get("use_cache") is None and getattr(generation_config, "use_cache", None) is None:
        # Some configs default to use_cache=False (MPT); caching changes no greedy token, and the strategies need it.
        # An explicit use_cache=False is still refused in the loop.
        kwargs["use_cache"] = True

    def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        return _decode_loop(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            model_kwargs,
            strategy=strategy,
            plan=plan,
            seed=seed,
            streamer=streamer,
        )

    # `GenerationMixin.generate` directly: the model's own `generate` may be a strategy dispatcher (recursion).
    return GenerationMixin.generate(
        model, inputs, generation_config=generation_config, custom_generate=loop, streamer=streamer, **kwargs
    )


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
    if not any(
        type(criterion) is StopStringCriteria for criterion in criteria
    ):  # a user's own one wins, as in generate
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria
    return generation_config


def jacobi_generate(
    model, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
):
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
    plan = _TreePlan("chain", top_k=1, depth=params["jacobi_draft_len"], nodes=chain_nodes(params["jacobi_draft_len"]))
    return _run(model, inputs, generation_config, kwargs, "jacobi", plan, params["draft_seed"])


def tr_jacobi_generate(
    model, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
):
    """Exact greedy TR-Jacobi decoding: one forward over a draft tree per step (see the module docstring).

    Args:
        model (`PreTrainedModel`): any causal LM of transformers whose attention takes a 4D additive mask
            (`attn_implementation` "sdpa" or "eager"); batch size 1, greedy.
        inputs (`torch.LongTensor` of shape `(1, seq)`): the prompt ids.
        generation_config (`GenerationConfig`, *optional*): as for `model.generate`; may hold `tree` ("auto" or
            "msn"), `tree_budget`, `tree_depth`, `tree_top_k`, `retrieval_ngram_size`, `retrieval_length`,
            `retrieval_branches`, `datastore_branches`, `draft_seed` (keyword arguments override them).
        **kwargs: anything `model.generate` takes, plus `datastore` (a `RetrievalDatastore` or the folder of a
            saved one: drafts retrieved from a corpus; with `tokenizer=` its vocabulary hash is checked).
    Returns:
        What `model.generate` returns; a `JacobiGenerateOutput` with statistics when `return_dict_in_generate=True`.
    Raises:
        ValueError: for an unknown `tree`, a negative budget, a datastore from another vocabulary, or a model whose
            attention cannot take a tree mask.
    """
    names = (
        "tree",
        "tree_budget",
        "tree_depth",
        "tree_top_k",
        "retrieval_ngram_size",
        "retrieval_length",
        "retrieval_branches",
        "datastore_branches",
        "memory_branches",
        "draft_memory_tokens",
        "draft_seed",
    )
    params = _resolve_params(model, generation_config, kwargs, names)
    datastore = _resolve_datastore(model, kwargs.pop("datastore", None), kwargs.get("tokenizer"))
    memory = kwargs.pop("draft_memory", None)
    if memory is not None and not isinstance(memory, DraftMemory):
        raise TypeError(f"`draft_memory` must be a DraftMemory or None (the model's own), got {type(memory).__name__}.")
    check_decoding_support(model, "tr_jacobi")  # the architecture's own reason first, before signature checks
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in _ATTENTION_WITH_CUSTOM_MASKS:
        raise ValueError(
            f"tr_jacobi needs a custom tree attention mask, which {type(model).__name__} with attn_implementation="
            f"{impl!r} cannot take; load the model with attn_implementation in {list(_ATTENTION_WITH_CUSTOM_MASKS)}."
        )
    forward_args = inspect.signature(model.forward).parameters
    if "attention_mask" not in forward_args or "position_ids" not in forward_args:
        raise ValueError(
            f"tr_jacobi needs a model whose forward takes `attention_mask` and `position_ids`; {type(model).__name__} does not."
        )
    depth, top_k, length = params["tree_depth"], params["tree_top_k"], params["retrieval_length"]
    common = dict(top_k=top_k, depth=depth, ngram=params["retrieval_ngram_size"], retrieval_length=length)
    if params["tree"] == "msn":
        if datastore is not None or memory is not None:
            raise ValueError(
                "`datastore` and `draft_memory` drafts go into the auto tree; use tree='auto' (the static 'msn' tree "
                "has one suffix branch)."
            )
        plan = _TreePlan("msn", suffix_branches=1, nodes=tr_jacobi_nodes(depth, top_k, length), **common)
    else:
        plan = _TreePlan(
            "auto",
            suffix_branches=params["retrieval_branches"],
            store_branches=params["datastore_branches"] if datastore is not None else 0,
            budget=params["tree_budget"],
            datastore=datastore,
            memory=memory
            if memory is not None
            else _default_memory(model, params["draft_memory_tokens"], params["retrieval_ngram_size"]),
            memory_branches=params["memory_branches"],
            **common,
        )
    return _run(model, inputs, generation_config, kwargs, "tr_jacobi", plan, params["draft_seed"])


_MEMORIES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, int], DraftMemory]]" = (
    weakref.WeakKeyDictionary()
)


def _default_memory(model, max_tokens: int, max_ngram: int) -> DraftMemory | None:
    """The model's own memory of earlier outputs (one per size and n-gram length; None when `max_tokens` is 0)."""
    if not max_tokens:
        return None
    per_model = _MEMORIES.setdefault(model, {})
    memory = per_model.get((max_tokens, max_ngram))
    if memory is None:
        memory = per_model[(max_tokens, max_ngram)] = DraftMemory(max_tokens, max_ngram)
    return memory


def _resolve_datastore(model, datastore: Any, tokenizer: Any) -> RetrievalDatastore | None:
    """A `RetrievalDatastore` from an instance or a folder, checked against the tokenizer (if given) and the model."""
    if datastore is None:
        return None
    if isinstance(datastore, (str, Path)):
        datastore = RetrievalDatastore.load(datastore)
    if not isinstance(datastore, RetrievalDatastore):
        raise TypeError(
            f"`datastore` must be a RetrievalDatastore or the folder of a saved one, got {type(datastore).__name__}."
        )
    if tokenizer is not None:
        datastore.check_tokenizer(tokenizer)
    datastore.check_model(
        model.get_output_embeddings().weight.shape[0]
        if model.get_output_embeddings() is not None
        else model.config.vocab_size
    )
    return datastore


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


def refuse_stateful_processors(logits_processor, strategy: str, why: str) -> None:
    """Refuse logits processors that keep state across calls (see `_STATEFUL_PROCESSORS`), saying `why` they would
    see more calls than greedy decoding makes."""
    for processor in logits_processor:
        origin = next((flag for kind, flag in _STATEFUL_PROCESSORS.items() if isinstance(processor, kind)), None)
        if origin is not None:
            raise ValueError(
                f"Strategy {strategy!r} cannot use {type(processor).__name__} (from `{origin}`): it keeps state across "
                f"calls and expects one call per generated token, while {why}, so the output would silently differ "
                "from greedy's. Use strategy='plain'."
            )


def _check_cache(cache, strategy: str, max_length: int, model, offset: int = 0) -> None:
    """Refuse what cannot be rolled back; `offset`: prompt positions given as `inputs_embeds` (not in `max_length`)."""
    check_decoding_support(model, strategy, cache)  # architectures that cannot roll back, with the reason
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"Strategy {strategy!r} rolls the cache back and needs a DynamicCache, got {type(cache).__name__} "
            f"(drop `cache_implementation` / `past_key_values`, and keep use_cache=True)."
        )
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise ValueError(
                f"Strategy {strategy!r} cannot roll back cache layers of type {type(layer).__name__} ({type(model).__name__})."
            )
        if (
            strategy == "tr_jacobi"
            and isinstance(layer, DynamicSlidingWindowLayer)
            and offset + max_length > layer.sliding_window
        ):
            embeds = f" + {offset} `inputs_embeds` positions" if offset else ""
            raise ValueError(
                f"tr_jacobi's tree mask covers full attention only; {type(model).__name__} has a sliding window of "
                f"{layer.sliding_window} tokens, shorter than max_length={max_length}{embeds}. Use strategy 'jacobi' or fewer tokens."
            )
    cache.activate_past_recording()  # sliding-window layers keep their states until `crop`


def _compact_cache(cache: DynamicCache, start: int, source: list[int], remove: int, device: torch.device) -> None:
    """Move the keys/values at positions `source` to `start, start+1, ...`, then drop the last `remove` positions.

    Nothing moves when the accepted drafts already sit right after `start` (a chain, or the first-choice path).
    """
    if source and source != list(range(start, start + len(source))):
        index = torch.tensor(source, device=device)
        end = start + len(source)
        for layer in cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys[:, :, start:end] = layer.keys.index_select(2, index)
                layer.values[:, :, start:end] = layer.values.index_select(2, index)
    cache.crop(-remove)  # also with remove == 0: sliding-window layers then drop what they no longer need


class _ProcessedPredictions:
    """Greedy's token at each tree node with the logits processors applied, computed when the acceptance walk first
    asks for it (`predicted[node]`).

    Each processor call sees one node with its own prefix, as in a batch-1 `_sample` step, and only the nodes the walk
    reaches are processed (the accepted path, plus any sibling holding the same token): a step makes about as many
    processor calls as greedy makes for the tokens it yields, not one per draft.
    """

    def __init__(self, logits_processor, sequence: torch.Tensor, tokens: torch.Tensor, tree: StepTree, logits):
        self.logits_processor = logits_processor
        self.sequence = sequence  # the text before the root
        self.tokens, self.tree, self.logits = tokens, tree, logits
        self.scores: dict[int, torch.Tensor] = {}
        self.greedy: dict[int, int] = {}

    def __getitem__(self, node: int) -> int:
        token = self.greedy.get(node)
        if token is None:
            line = self.tree.ancestors[node]
            prefix = torch.cat([self.sequence, self.tokens[line[1:]][None]], dim=1) if node else self.sequence
            row = self.scores[node] = self.logits_processor(prefix, self.logits[node : node + 1])
            token = self.greedy[node] = int(row.argmax(dim=-1))
        return token

    def rows(self, nodes: list[int]) -> torch.Tensor:
        """The processed scores of `nodes` (all reached by the walk), one row each."""
        return torch.cat([self.scores[node] for node in nodes], dim=0)


@dataclass
class _TreePlan:
    """How a strategy builds its steps' trees (`mode`: "chain" for jacobi, "msn" static, "auto")."""

    mode: str
    top_k: int
    depth: int
    ngram: int = 0
    retrieval_length: int = 0
    suffix_branches: int = 0
    store_branches: int = 0
    budget: int = 0
    datastore: Any = None
    memory: DraftMemory | None = None
    memory_branches: int = 0
    nodes: list[tuple[int, ...]] | None = None  # static trees

    @property
    def rows_needed(self) -> int:
        retrieves = self.suffix_branches or self.store_branches or self.memory_branches
        return max(self.depth, self.retrieval_length if retrieves else 0)

    @property
    def max_nodes(self) -> int:
        return self.budget + 1 if self.mode == "auto" else len(self.nodes) + 1


class _Drafts:
    """The step's candidate rows (row `d` is depth `d + 1`): the previous step's top-k predictions where there are
    some, tokens drawn from the history elsewhere (the "ahead" noise MSN trains on), plus the retrieval branches
    (suffix structure first, then the datastore)."""

    def __init__(self, plan: _TreePlan, history: list[int], seed: int):
        self.plan = plan
        self.history = list(history)
        self.rng = random.Random(seed)
        self.suffix = SuffixDrafter(history, plan.ngram) if plan.suffix_branches else None
        self.predicted: list[tuple[list[int], list[float]]] = []  # per row: top-k tokens and their probabilities

    def rows(self, depth: int) -> list[list[Cell]]:
        plan = self.plan
        static = plan.mode != "auto"  # static trees read fixed columns: every row has top_k (+ 1 retrieval) cells
        fill_width = plan.top_k if static else 1
        rows = []
        for d in range(depth):
            row = []
            if d < len(self.predicted):
                tokens, probs = self.predicted[d]
                row = [Cell(t, "pred", p) for t, p in zip(tokens, probs)]
            if len(row) < fill_width:
                row += [Cell(t, "fill", 0.0) for t in self.rng.choices(self.history, k=fill_width - len(row))]
            rows.append(row)
        length = min(plan.retrieval_length, depth)
        branches = []
        if self.suffix is not None:
            branches += [
                (tokens, confidences, "suffix")
                for tokens, confidences in self.suffix.propose(plan.suffix_branches, length)
            ]
        if plan.memory is not None and plan.memory_branches:
            branches += [
                (tokens, confidences, "memory")
                for tokens, confidences in plan.memory.propose(self.history, plan.memory_branches, length)
            ]
        if plan.datastore is not None and plan.store_branches:
            branches += [
                (tokens, confidences, "store")
                for tokens, confidences in plan.datastore.propose(self.history, plan.store_branches, length)
            ]
        if static:  # the static tree's retrieval column: the first branch, filler where it is shorter
            tokens, confidences, kind = branches[0] if branches else ([], [], "fill")
            for d in range(length):
                cell = (
                    Cell(tokens[d], kind, confidences[d], 0)
                    if d < len(tokens)
                    else Cell(self.rng.choice(self.history), "fill", 0.0, 0)
                )
                rows[d].append(cell)
            return rows
        for b, (tokens, confidences, kind) in enumerate(branches):
            for d, (t, c) in enumerate(zip(tokens, confidences)):
                rows[d].append(Cell(t, kind, c, b))
        return rows

    def extend(self, tokens: list[int]) -> None:
        self.history.extend(tokens)
        if self.suffix is not None:
            self.suffix.extend(tokens)


class _StepInputs:
    """Preallocated per-call buffers: the tree attention mask (prefix columns stay visible, the prompt's padding stays
    masked; each step writes only its `n x n` block and clears it afterwards) and the causal 2D mask for chains.
    Nothing per step grows with the prompt."""

    def __init__(
        self, max_nodes: int, total: int, prompt_mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device
    ):
        self.min = torch.finfo(dtype).min
        self.bias = torch.zeros(max_nodes, total, dtype=dtype, device=device)
        self.mask_2d = None
        if prompt_mask is not None:
            self.mask_2d = torch.ones(1, total, dtype=prompt_mask.dtype, device=device)
            self.mask_2d[:, : prompt_mask.shape[1]] = prompt_mask.to(device)
            if not bool(prompt_mask.all()):
                self.bias[:, : prompt_mask.shape[1]].masked_fill_(prompt_mask.to(device) == 0, self.min)
        self.device = device
        self.block: torch.Tensor | None = None

    def mask(self, tree: StepTree, cache_len: int, visible: torch.Tensor | None):
        """The attention mask of a step: the model's own causal mask for a chain, else the tree bias (4D view)."""
        n = tree.size
        if tree.chain:
            return None if self.mask_2d is None else self.mask_2d[:, : cache_len + n]
        block = self.bias[:n, cache_len : cache_len + n]
        block.fill_(self.min)
        block[visible[0], visible[1]] = 0.0
        self.block = block
        return self.bias[:n, : cache_len + n][None, None]

    def chain_mask(self, n: int, cache_len: int):
        """A 4D mask with a causal `n x n` block (what the forward-cost measurement runs with)."""
        block = self.bias[:n, cache_len : cache_len + n]
        block.fill_(self.min)
        block.triu_(1)
        self.block = block
        return self.bias[:n, : cache_len + n][None, None]

    def clear(self) -> None:
        if self.block is not None:
            self.block.zero_()
            self.block = None


def _tree_tensors(tree: StepTree, tokens: list[int], position: int, device: torch.device):
    """Tokens, position ids and visible (query, key) pairs of `tree` (None for a chain), in ONE host-to-device copy."""
    n = tree.size
    pairs = [] if tree.chain else tree.visible_rows + tree.visible_cols  # a chain uses the model's causal mask
    packed = torch.tensor(tokens + [position + d for d in tree.depth] + pairs, device=device)
    return packed[:n], packed[n : 2 * n], None if tree.chain else packed[2 * n :].view(2, -1)


def _decode_loop(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    model_kwargs,
    *,
    strategy,
    plan: _TreePlan,
    seed,
    streamer,
):
    if generation_config.do_sample or generation_config.num_beams != 1:
        raise ValueError(
            f"Strategy {strategy!r} is exact greedy decoding; got do_sample={generation_config.do_sample}, "
            f"num_beams={generation_config.num_beams}. Use strategy='plain' for sampling or beam search."
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"Strategy {strategy!r} supports batch size 1 only, got a batch of {input_ids.shape[0]} (num_return_sequences included)."
        )
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(f"Strategy {strategy!r} does not return attentions or hidden states.")
    if not model_kwargs.get("use_cache", True):
        raise ValueError(f"Strategy {strategy!r} needs use_cache=True.")
    refuse_stateful_processors(logits_processor, strategy, "the strategy applies the logits processors to every draft")
    cache = cache_from_model_kwargs(model_kwargs)
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
    outputs = prefill(model, input_ids, generation_config, model_kwargs)
    model_kwargs = update_model_kwargs_after_prefill(model, outputs, model_kwargs)
    cache = output_cache(outputs)
    cache_kwarg = model_cache_kwarg(model)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
    processed = logits_processor(input_ids, logits)
    first = torch.argmax(processed, dim=-1)
    kept, done = stopper.keep(input_ids, first.tolist(), scores, (processed,))
    if scores is not None:
        scores += (processed,)
    if raw_logits is not None:
        raw_logits += (logits,)
    # the output ids live in one preallocated buffer (no per-step concatenation growing with the text)
    buffer = input_ids.new_zeros(1, stopper.max_length + 1)
    length = input_ids.shape[1] + 1
    buffer[:, : length - 1] = input_ids
    buffer[:, length - 1] = first
    accepted_lengths, tree_sizes = [1], []
    root = int(first[0])
    if streamer is not None:
        streamer.put(first.cpu())
    cache_len = cache.get_seq_length()  # the prompt's positions (ids or `inputs_embeds`)
    del outputs

    # Positions and the prompt's padding continue from what transformers prepared (left padding in a batch-1 mask).
    position = int(model_kwargs["position_ids"][0, -1]) if model_kwargs.get("position_ids") is not None else cache_len
    inputs = _StepInputs(
        plan.max_nodes, offset + stopper.max_length + plan.max_nodes, model_kwargs.get("attention_mask"), dtype, device
    )
    drafts = _Drafts(plan, input_ids[0].tolist() + first.tolist(), seed)
    static_trees: dict[int, StepTree] = {}
    stats = AcceptanceStats() if plan.mode == "auto" else None
    cost, overhead = None, 0.0
    forward_kwargs = dict(use_cache=True, return_dict=True)
    split_sync = device.type in _SPLIT_SYNC_DEVICES
    processing = len(logits_processor) > 0

    if plan.mode == "auto" and plan.budget and not done:

        def run(n: int) -> None:  # one forward of n tokens with a tree-shaped mask, rolled back
            ids = buffer[:, :n] if n <= length else buffer[:, :1].expand(1, n)
            pos = torch.arange(position, position + n, device=device)[None]
            model(
                input_ids=ids,
                position_ids=pos,
                attention_mask=inputs.chain_mask(n, cache_len),
                **forward_kwargs,
                **{cache_kwarg: cache},
            )
            inputs.clear()
            cache.crop(-n)

        cost = forward_cost(model, plan.max_nodes, run)

    while not done:
        step_start = time.perf_counter()
        remaining = stopper.max_length - length  # tokens still allowed after the current one
        depth = min(plan.rows_needed, remaining - 1)
        rows = drafts.rows(depth)
        if plan.mode == "auto":
            spine = stats.estimate("pred", 1, 0.5) * _SPINE_WEIGHT
            tree = select_tree(rows, stats, cost, overhead, plan.budget if depth else 0, spine)
        else:
            tree = static_trees.get(depth)
            if tree is None:
                tree = static_trees[depth] = static_step_tree([node for node in plan.nodes if len(node) <= depth])
        n = tree.size
        host_tokens = [root] + [rows[r][c].token for r, c in tree.cells]
        tokens, position_ids, visible = _tree_tensors(tree, host_tokens, position, device)

        # 2. One forward over the current token and all drafts.
        mask = inputs.mask(tree, cache_len, visible)
        forward_start = time.perf_counter()
        out = model(
            input_ids=tokens[None],
            position_ids=position_ids[None],
            attention_mask=mask,
            **forward_kwargs,
            **{cache_kwarg: cache},
        )
        inputs.clear()
        logits = out.logits[0].to(dtype=torch.float32, device=device)
        sequence = buffer[:, :length]
        k = min(plan.top_k, logits.shape[-1])
        if split_sync:  # CPU: nothing is asynchronous, so top-k waits until the accepted path says which rows matter
            # numpy's argmax (vectorised; same first-index tie rule as torch's) is ~10x faster on CPU here
            predicted, top_rows = logits.numpy().argmax(axis=-1).tolist(), None
        else:  # accelerator: the greedy tokens and every row's top-k come back in ONE sync
            greedy = logits.argmax(dim=-1, keepdim=True)
            top_probs, top = (torch.softmax(logits, dim=-1) if plan.mode == "auto" else logits).topk(k, dim=-1)
            packed = torch.cat([greedy, top], dim=1).tolist()
            predicted, top_rows = [row[0] for row in packed], [row[1:] for row in packed]
            top_probs = top_probs.tolist() if plan.mode == "auto" else None
        forward_end = time.perf_counter()

        # 3. Accept the longest root path whose drafts equal greedy's predictions; the bonus token comes with it.
        # With logits processors greedy's tokens are those of the processed scores, computed only for the nodes the
        # walk reaches; the next step's drafts still come from the raw logits (drafts never change the output).
        verified = _ProcessedPredictions(logits_processor, sequence, tokens, tree, logits) if processing else predicted
        path = tree.accept(host_tokens, verified)
        new_tokens = [verified[node] for node in path]
        if scores is not None:
            step_scores = tuple((verified.rows(path) if processing else logits[path]).split(1))
        else:
            step_scores = ()
        kept, done = stopper.keep(sequence, new_tokens, scores, step_scores)
        if scores is not None:
            scores += step_scores[:kept]
        if raw_logits is not None:
            raw_logits += tuple(logits[path[:kept]].split(1))
        buffer[0, length : length + kept] = torch.tensor(new_tokens[:kept], device=device)
        length += kept
        root = new_tokens[kept - 1]
        accepted_lengths.append(kept)
        tree_sizes.append(n)
        if stats is not None:
            _update_stats(stats, rows, new_tokens)
        if not done:
            drafts.extend(new_tokens[:kept])
        if streamer is not None:  # one token per call, as greedy: text streamers decode at token boundaries
            for token in new_tokens[:kept]:
                streamer.put(torch.tensor([token]))

        # 4. Keep the cache of the accepted path only (the root and `kept - 1` drafts), and roll back the rest.
        _compact_cache(cache, cache_len + 1, [cache_len + node for node in path[1:kept]], n - kept, device)
        cache_len += kept
        position += kept

        # 5. Next candidates: the predictions at the drafts below the accepted path (Jacobi reuse).
        below = tree.continuation(path[-1])[: plan.depth]
        if not below or k == 1:
            drafts.predicted = [([predicted[v]], [0.0]) for v in below]
        elif split_sync:
            scores_below = logits[below]
            if plan.mode == "auto":
                probs_below, top_below = torch.softmax(scores_below, dim=-1).topk(k, dim=-1)
                drafts.predicted = list(zip(top_below.tolist(), probs_below.tolist()))
            else:
                drafts.predicted = [(row, [0.0] * k) for row in scores_below.topk(k, dim=-1).indices.tolist()]
        else:
            drafts.predicted = [(top_rows[v], top_probs[v] if top_probs is not None else [0.0] * k) for v in below]
        del out
        if plan.mode == "auto":
            if cost is not None:
                cost.observe(n, forward_end - forward_start)
            spent = time.perf_counter() - step_start - (forward_end - forward_start)
            overhead = spent if len(tree_sizes) == 1 else 0.9 * overhead + 0.1 * spent

    if plan.memory is not None and plan.memory.learn:
        plan.memory.add(buffer[0, input_ids.shape[1] : length].tolist())
    if done and cache is not None and cache.get_seq_length() > cache_len:
        cache.crop(-(cache.get_seq_length() - cache_len))
    if streamer is not None:
        streamer.end()
    sequence = buffer[:, :length]
    num_forwards = len(accepted_lengths)
    new = sum(accepted_lengths)
    logger.info(
        "%s: %d new tokens in %d forwards (%.2f tokens per forward)", strategy, new, num_forwards, new / num_forwards
    )
    if want_dict:
        return JacobiGenerateOutput(
            sequences=sequence,
            scores=scores,
            logits=raw_logits,
            **{cache_output_field(JacobiGenerateOutput): cache},
            num_forwards=num_forwards,
            accepted_lengths=accepted_lengths,
            tokens_per_forward=new / num_forwards,
            tree_sizes=tree_sizes,
            forward_cost=cost.as_dict() if cost is not None else None,
        )
    return sequence


def _update_stats(stats: AcceptanceStats, rows: list[list[Cell]], truth: list[int]) -> None:
    """Count the cells of every row whose true token the step revealed; a retrieval branch's cell only while its
    branch still agreed with the truth above it (its tokens are a continuation of its own earlier ones)."""
    known = rows[: len(truth)]
    alive: dict[int, bool] = {}
    counted = []
    for d, row in enumerate(known):
        keep = []
        for cell in row:
            if cell.branch < 0 or alive.get(cell.branch, True):
                keep.append(cell)
        counted.append(keep)
        for cell in row:
            if cell.branch >= 0:
                alive[cell.branch] = alive.get(cell.branch, True) and cell.token == truth[d]
    stats.update(counted, truth)
