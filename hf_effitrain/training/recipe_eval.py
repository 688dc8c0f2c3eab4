"""The recipe's evaluation: decoding speed of the small model and quality / cost of the cascade strategies.

Prompts are docstring -> body prompts from the held-out split of the code SFT set (files never trained on). Every
figure is measured on this machine in this run: tokens per second and tokens per forward of greedy `generate` and
`tr_jacobi` (with whether the outputs are equal), and for each cascade strategy the share of tokens the small model
produced, how closely the output follows the large model's greedy output, and its time relative to the large model.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hf_effitrain.hub.generation_effi import generate as effi_generate

CASCADE_STRATEGIES: dict[str, dict[str, Any]] = {
    "sequence": {"strategy": "cascade", "deferral": "sequence"},
    "token": {"strategy": "cascade", "deferral": "token"},
    "speculative_cascade": {"strategy": "speculative_cascade"},
}


def held_out_prompts(scope: str, max_files: int | None, count: int) -> list[str]:
    """The first `count` prompts of the code SFT set's test split (then validation when the test split is short)."""
    from hf_effitrain.data import build_code_sft_dataset

    splits = build_code_sft_dataset("python", scope=scope, max_files=max_files)
    prompts = list(splits["test"]["prompt"][:count])
    if len(prompts) < count:
        prompts += list(splits["validation"]["prompt"][: count - len(prompts)])
    if not prompts:
        raise ValueError(
            f"The code SFT set of scope={scope!r}, max_files={max_files} has no held-out prompts; use more files."
        )
    return prompts


def validation_losses(
    models: dict[str, Any], tokenizer, scope: str, max_files: int | None, block_size: int, max_blocks: int = 64
) -> dict[str, float]:
    """Plain causal-LM loss of each model on the same held-out blocks: one yardstick for every stage (the stages'
    own objectives differ: patch loss, noisy-input SFT loss, cascade-weighted loss)."""
    from hf_effitrain.data import load_corpus, pack_dataset

    corpus = load_corpus("python", scope=scope, max_files=max_files)
    blocks = pack_dataset(corpus["validation"], tokenizer, block_size)
    if len(blocks) == 0:
        raise ValueError(
            f"The validation split of scope={scope!r}, max_files={max_files} holds no {block_size}-token block; use more files."
        )
    ids = torch.tensor(blocks["input_ids"][:max_blocks])
    losses = {}
    for name, model in models.items():
        total = 0.0
        with torch.inference_mode():
            for batch in ids.to(model.device).split(8):
                total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0]
        losses[name] = total / ids.shape[0]
    return losses


def _timed(model, ids: torch.Tensor, max_new_tokens: int, **kwargs) -> tuple[torch.Tensor, float, Any]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = effi_generate(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[0, ids.shape[1] :], time.perf_counter() - start, out


def decoding_speed(
    model, tokenizer, prompts: list[str], max_new_tokens: int, extra: dict[str, dict] | None = None
) -> dict[str, Any]:
    """Greedy vs `tr_jacobi` (and each `extra` named set of generate kwargs) on every prompt, side by side.

    Each method first decodes the first prompt once untimed: one-off costs (the allocator, `tr_jacobi`'s measurement
    of the model's forward cost, cached per model afterwards) would otherwise weigh on a few short completions.
    """
    methods = {"greedy": {}, "tr_jacobi": {"strategy": "tr_jacobi"}, **(extra or {})}
    totals = {name: {"seconds": 0.0, "tokens": 0, "forwards": 0, "equal_to_greedy": 0} for name in methods}
    if prompts:
        ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"].to(model.device)
        for kwargs in methods.values():
            _timed(model, ids, max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
        reference = None
        for name, kwargs in methods.items():
            new, seconds, out = _timed(model, ids, max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
            reference = new if reference is None else reference
            row = totals[name]
            row["seconds"] += seconds
            row["tokens"] += new.numel()
            row["forwards"] += getattr(out, "num_forwards", None) or new.numel()
            row["equal_to_greedy"] += int(torch.equal(new, reference))
    greedy_rate = totals["greedy"]["tokens"] / totals["greedy"]["seconds"]
    for row in totals.values():
        row["tokens_per_second"] = row["tokens"] / row["seconds"]
        row["tokens_per_forward"] = row["tokens"] / row["forwards"]
        row["speedup_vs_greedy"] = row["tokens_per_second"] / greedy_rate
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "methods": totals}


def cascade_quality_and_cost(cascade, tokenizer, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    """Each cascade strategy against the large model alone: agreement with its greedy output, small share, time.

    As in `decoding_speed`, the large model and every strategy first decode the first prompt once untimed.
    """
    pad = tokenizer.pad_token_id
    if prompts:
        ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"].to(cascade.device)
        _timed(cascade.large, ids, max_new_tokens, pad_token_id=pad)
        for kwargs in CASCADE_STRATEGIES.values():
            _timed(cascade, ids, max_new_tokens, pad_token_id=pad, **kwargs)
    large_outputs, large_seconds = [], 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(cascade.device)
        new, seconds, _ = _timed(cascade.large, ids, max_new_tokens, pad_token_id=pad)
        large_outputs.append((ids, new))
        large_seconds += seconds
    results: dict[str, Any] = {
        "large_alone": {"seconds": large_seconds, "agreement_with_large": 1.0, "small_token_share": 0.0}
    }
    for name, kwargs in CASCADE_STRATEGIES.items():
        agree = tokens = small_tokens = 0
        seconds_total = 0.0
        for ids, large_new in large_outputs:
            new, seconds, _ = _timed(cascade, ids, max_new_tokens, pad_token_id=pad, **kwargs)
            seconds_total += seconds
            width = min(new.numel(), large_new.numel())
            agree += int((new[:width] == large_new[:width]).sum())
            tokens += large_new.numel()
            stats = getattr(cascade, "cascade_stats", {}) or {}
            small_tokens += _small_tokens(stats, new.numel())
        results[name] = {
            "seconds": seconds_total,
            "time_vs_large": seconds_total / large_seconds,
            "agreement_with_large": agree / max(tokens, 1),
            "small_token_share": small_tokens / max(tokens, 1),
        }
    return results


def _small_tokens(stats: dict[str, Any], new_tokens: int) -> int:
    """Tokens of one call that the small model produced, from the cascade's statistics of that call."""
    if "small_token_share" in stats:  # speculative cascade
        return round(stats["small_token_share"] * new_tokens)
    if stats.get("deferral") == "sequence":
        return 0 if stats.get("sequences_deferred") else new_tokens
    return new_tokens - int(stats.get("tokens_deferred", 0))
