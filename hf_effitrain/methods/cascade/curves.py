"""Deferral curves of a cascade: quality against the share deferred to the large model and against relative FLOPs.

Every curve is swept over thresholds of the cascade's own deferral score, from `-inf` (defer nothing: the small
model's quality, exactly) to `+inf` (defer everything: the large model's quality, exactly). Each model is run once
over the evaluation set and each threshold is then a cheap recombination, except token-level deferral on
completions, which really decodes with `generate(strategy="cascade")` at every threshold.

Metrics:
- `"token_accuracy"` / `"token_loss"` on held-out text, teacher-forced: the small model's confidence is the
  log-prob of its own greedy prediction (what a deployed cascade sees, the reference being unknown). At token level
  a deferred position is scored with the large model's prediction; at sequence level whole rows are deferred.
- `"exact_match"` on prompt / completion pairs: the greedy completion equals the reference completion's tokens.

Cost: `2 * parameters` FLOPs per processed token and model (input embeddings excluded; attention's own
sequence-length term ignored). The small model processes every token. At sequence level the large model
processes the deferred rows; at token level, like `generate(strategy="cascade")`, it catches up lazily, so a row
costs it every token up to its last deferred position. Relative FLOPs = cascade FLOPs / FLOPs of the large model
alone, so full deferral costs `1 + small/large`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_effitrain.hub.cascade_rules import generated_mask, sequence_scores, token_logprobs
from hf_effitrain.hub.configuration_cascade import DEFERRAL_LEVELS, DEFERRAL_RULES

METRICS = ("token_accuracy", "token_loss", "exact_match")
_HIGHER_IS_BETTER = {"token_accuracy": True, "token_loss": False, "exact_match": True}


def forward_flops_per_token(model: nn.Module) -> int:
    """`2 * parameters` of a forward per token, without the input-embedding lookup (a gather, not a matmul).

    With tied embeddings the shared matrix is counted once, as the LM head.
    """
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and (head is None or head.weight is not embeddings.weight):
        total -= embeddings.weight.numel()
    return 2 * total


@dataclass
class DeferralCurve:
    """Quality of a cascade at a sweep of thresholds, with its end points and areas.

    `area` is the area under quality against deferral ratio (trapezoids over [0, 1]); `area_flops` the area under
    quality against relative FLOPs over [small/large, 1 + small/large], divided by that interval's width (1), so the
    two areas are comparable between cascades of the same two sizes.
    """

    metric: str
    level: str
    rule: str
    thresholds: list[float]
    deferral_ratio: list[float]
    relative_flops: list[float]
    quality: list[float]
    small_quality: float
    large_quality: float
    small_flops_per_token: int
    large_flops_per_token: int
    num_examples: int
    num_tokens: int
    area: float = field(init=False)
    area_flops: float = field(init=False)

    def __post_init__(self):
        ratio, quality, flops = (
            np.asarray(v, dtype=float) for v in (self.deferral_ratio, self.quality, self.relative_flops)
        )
        order = np.argsort(ratio, kind="stable")
        self.area = float(np.trapezoid(quality[order], ratio[order]))
        order = np.argsort(flops, kind="stable")
        self.area_flops = float(np.trapezoid(quality[order], flops[order]))

    @property
    def higher_is_better(self) -> bool:
        return _HIGHER_IS_BETTER[self.metric]

    def target_quality(self, tolerance: float = 0.01) -> float:
        """The large model's quality minus `tolerance` relative (plus, for a loss)."""
        return self.large_quality * (1 - tolerance) if self.higher_is_better else self.large_quality * (1 + tolerance)

    def flops_saved_at(self, tolerance: float = 0.01) -> float | None:
        """1 - the least relative FLOPs among swept points that reach `target_quality(tolerance)`; None if none does.

        Negative when only points costlier than the large model alone reach the target.
        """
        target = self.target_quality(tolerance)
        costs = [
            c
            for c, q in zip(self.relative_flops, self.quality)
            if (q >= target if self.higher_is_better else q <= target)
        ]
        return None if not costs else 1.0 - min(costs)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flops_saved_at_large_minus_1pct"] = self.flops_saved_at(0.01)
        out["target_quality_large_minus_1pct"] = self.target_quality(0.01)
        return out


def _thresholds(scores: torch.Tensor, num_points: int) -> list[float]:
    """-inf, `num_points` quantile cut points of the finite scores, +inf: sweeps the deferral ratio over [0, 1]."""
    finite = scores[torch.isfinite(scores)].double()
    if finite.numel() == 0:
        return [-math.inf, math.inf]
    qs = torch.linspace(0, 1, num_points, dtype=torch.float64)
    cuts = torch.quantile(finite, qs) if finite.numel() > 1 else finite
    # a score equal to a cut is not deferred (score < threshold), so nudge each cut up, in the scores' dtype
    cuts = cuts.to(scores.dtype)
    cuts = sorted(set(torch.nextafter(cuts, torch.full_like(cuts, math.inf)).tolist()))
    return [-math.inf, *cuts, math.inf]


def _check(metric: str, level: str, rule: str, quantile: float, num_points: int) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    if level not in DEFERRAL_LEVELS:
        raise ValueError(f"level must be one of {DEFERRAL_LEVELS}, got {level!r}.")
    if rule not in DEFERRAL_RULES:
        raise ValueError(f"rule must be one of {DEFERRAL_RULES}, got {rule!r}.")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}.")
    if not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}.")


def _as_id_rows(data: Any) -> torch.LongTensor:
    if torch.is_tensor(data):
        rows = data
    elif hasattr(data, "column_names"):
        if "input_ids" not in data.column_names:
            raise ValueError(
                f"Text metrics need an `input_ids` column (e.g. from pack_dataset); got {data.column_names}."
            )
        lengths = {len(r) for r in data["input_ids"]}
        if len(lengths) != 1:
            raise ValueError("Text metrics need equal-length `input_ids` rows (pack_dataset blocks).")
        rows = torch.tensor(data["input_ids"])
    else:
        raise TypeError(
            f"eval_data must be a LongTensor (rows, block) or a datasets.Dataset, got {type(data).__name__}."
        )
    if rows.dim() != 2 or rows.shape[1] < 2 or rows.shape[0] == 0:
        raise ValueError(f"eval_data must hold rows of at least 2 tokens, got shape {tuple(rows.shape)}.")
    return rows.long()


@torch.no_grad()
def _teacher_forced(model: nn.Module, rows: torch.LongTensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Per position t < T-1 of every row: greedy prediction, its log-prob, and the log-prob of token t+1."""
    device = next(model.parameters()).device
    preds, confidence, gold_logprob = [], [], []
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size].to(device)
        logprobs = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), dim=-1)
        best = logprobs.max(-1)
        preds.append(best.indices.cpu())
        confidence.append(best.values.cpu())
        gold_logprob.append(logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1).cpu())
    return {"pred": torch.cat(preds), "confidence": torch.cat(confidence), "gold_logprob": torch.cat(gold_logprob)}


def _curve(metric, level, rule, sweep, small_scores, large_scores, flops_per_token, num_tokens) -> DeferralCurve:
    """Assemble a curve from its sweep `(thresholds, ratio, flops, quality)` and the members' per-item scores."""
    thresholds, ratio, flops, quality = sweep
    return DeferralCurve(
        metric=metric,
        level=level,
        rule=rule if level == "sequence" else "token_confidence",
        thresholds=thresholds,
        deferral_ratio=ratio,
        relative_flops=flops,
        quality=quality,
        small_quality=float(small_scores.mean()),
        large_quality=float(large_scores.mean()),
        small_flops_per_token=flops_per_token[0],
        large_flops_per_token=flops_per_token[1],
        num_examples=int(small_scores.shape[0]),
        num_tokens=num_tokens,
    )


def _cached_teacher_forced(model, rows, batch_size, cache: dict | None) -> dict[str, torch.Tensor]:
    if cache is None:
        return _teacher_forced(model, rows, batch_size)
    # keyed by the model object itself (a weak reference: a freed model's id can be reused by a new one) and by the
    # rows' content (a Dataset gives a fresh tensor on every call)
    for model_ref, cached_rows, result in cache.setdefault("teacher_forced", []):
        if model_ref() is model and cached_rows.shape == rows.shape and torch.equal(cached_rows, rows):
            return result
    result = _teacher_forced(model, rows, batch_size)
    cache["teacher_forced"].append((weakref.ref(model), rows, result))
    return result


def _text_curve(small, large, rows, metric, level, rule, quantile, num_points, batch_size, cache) -> DeferralCurve:
    s, l = (
        _cached_teacher_forced(small, rows, batch_size, cache),
        _cached_teacher_forced(large, rows, batch_size, cache),
    )
    targets = rows[:, 1:]
    if metric == "token_accuracy":
        small_q, large_q = (s["pred"] == targets).double(), (l["pred"] == targets).double()
    else:
        small_q, large_q = -s["gold_logprob"].double(), -l["gold_logprob"].double()
    n_rows, n_pos = targets.shape
    fs, fl = forward_flops_per_token(small), forward_flops_per_token(large)
    tokens_per_row = n_pos  # predicting n_pos tokens takes n_pos forward positions
    large_alone = fl * tokens_per_row * n_rows
    if level == "sequence":
        scores = sequence_scores(s["confidence"], torch.ones_like(targets, dtype=torch.bool), rule, quantile)
    else:
        scores = s["confidence"].reshape(-1)
    thresholds = _thresholds(scores, num_points)
    ratio, quality, flops = [], [], []
    for threshold in thresholds:
        if level == "sequence":
            deferred_rows = scores < threshold
            deferred = deferred_rows[:, None].expand(n_rows, n_pos)
            large_tokens = int(deferred_rows.sum()) * tokens_per_row
            ratio.append(float(deferred_rows.double().mean()))
        else:
            deferred = (scores < threshold).reshape(n_rows, n_pos)
            # lazy catch-up: a row costs the large model every token up to (and including) its last deferred position
            positions = torch.arange(1, n_pos + 1).expand(n_rows, n_pos)
            large_tokens = int(torch.where(deferred, positions, torch.zeros_like(positions)).max(-1).values.sum())
            ratio.append(float(deferred.double().mean()))
        quality.append(float(torch.where(deferred, large_q, small_q).mean()))
        flops.append((fs * tokens_per_row * n_rows + fl * large_tokens) / large_alone)
    return _curve(
        metric, level, rule, (thresholds, ratio, flops, quality), small_q, large_q, (fs, fl), int(targets.numel())
    )


def _completion_batches(data, tokenizer, batch_size: int):
    """Left-padded prompt batches and reference completion ids from `prompt` / `completion` text columns."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(data), batch_size):
            rows = data[start : start + batch_size]
            prompts = tokenizer(rows["prompt"], return_tensors="pt", padding=True, add_special_tokens=False)
            references = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in rows["completion"]]
            yield prompts, references
    finally:
        tokenizer.padding_side = side


def _matches(new_tokens: torch.LongTensor, references: list[list[int]]) -> torch.Tensor:
    """1.0 where the completion starts with the whole reference (greedy decoding stops at the reference length)."""
    return torch.tensor(
        [float(new_tokens[i, : len(ref)].tolist() == ref) for i, ref in enumerate(references)], dtype=torch.float64
    )


@torch.no_grad()
def _decode(model, prompts, max_new_tokens: int, eos_token_id, pad_token_id):
    """Greedy completions with the raw logits of every step (for the small model's deferral scores)."""
    return model.generate(
        prompts["input_ids"],
        attention_mask=prompts["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )


def _completion_curve(
    cascade, data, tokenizer, level, rule, quantile, num_points, batch_size, max_new_tokens
) -> DeferralCurve:
    if tokenizer is None:
        raise ValueError("exact_match needs `tokenizer=` to encode the prompt / completion columns.")
    missing = {"prompt", "completion"} - set(getattr(data, "column_names", []))
    if missing:
        raise ValueError(
            f"exact_match needs `prompt` and `completion` columns (build_code_sft_dataset); missing {sorted(missing)}."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("exact_match needs a tokenizer with a pad token (batches are left-padded).")
    if len(data) == 0:
        raise ValueError("exact_match got no prompt / completion pairs (an empty split?).")
    small, large = cascade.small, cascade.large
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    fs, fl = forward_flops_per_token(small), forward_flops_per_token(large)
    batches = list(_completion_batches(data, tokenizer, batch_size))
    small_em, large_em, scores, small_tokens, large_tokens, confidences = [], [], [], [], [], []
    for prompts, refs in batches:
        budget = max_new_tokens or max(len(r) for r in refs)
        prompt_tokens = prompts["attention_mask"].sum(-1)
        s = _decode(small, prompts, budget, eos, pad)
        s_new = s.sequences[:, prompts["input_ids"].shape[1] :]
        mask = generated_mask(s_new, [eos] if eos is not None else None)
        logprobs = token_logprobs(torch.stack(s.logits, 1), s_new)
        scores.append(sequence_scores(logprobs, mask, rule, quantile))
        confidences.append(logprobs[mask])
        small_em.append(_matches(s_new, refs))
        small_tokens.append(prompt_tokens + mask.sum(-1))
        l_new = _decode(large, prompts, budget, eos, pad).sequences[:, prompts["input_ids"].shape[1] :]
        large_em.append(_matches(l_new, refs))
        large_tokens.append(prompt_tokens + generated_mask(l_new, [eos] if eos is not None else None).sum(-1))
    small_em, large_em, scores = torch.cat(small_em), torch.cat(large_em), torch.cat(scores)
    small_tokens, large_tokens = torch.cat(small_tokens).double(), torch.cat(large_tokens).double()
    large_alone = fl * float(large_tokens.sum())
    thresholds, ratio, quality, flops = [], [], [], []
    if level == "sequence":
        thresholds = _thresholds(scores, num_points)
        for threshold in thresholds:
            deferred = scores < threshold
            ratio.append(float(deferred.double().mean()))
            quality.append(float(torch.where(deferred, large_em, small_em).mean()))
            flops.append((fs * float(small_tokens.sum()) + fl * float(large_tokens[deferred].sum())) / large_alone)
    else:
        thresholds = _thresholds(torch.cat(confidences), num_points)
        for threshold in thresholds:
            matches, emitted, deferred_tokens, cost = [], 0, 0, 0.0
            for prompts, refs in batches:
                budget = max_new_tokens or max(len(r) for r in refs)
                out = cascade.generate(
                    prompts["input_ids"],
                    attention_mask=prompts["attention_mask"],
                    max_new_tokens=budget,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    strategy="cascade",
                    deferral="token",
                    threshold=threshold,
                )
                stats = cascade.cascade_stats
                matches.append(_matches(out[:, prompts["input_ids"].shape[1] :], refs))
                emitted += stats["tokens"]
                deferred_tokens += stats["tokens_deferred"]
                cost += (
                    fs * float(prompts["attention_mask"].sum() + stats["tokens"]) + fl * stats["large_forward_tokens"]
                )
            ratio.append(deferred_tokens / max(emitted, 1))
            quality.append(float(torch.cat(matches).mean()))
            flops.append(cost / large_alone)
    return _curve(
        "exact_match",
        level,
        rule,
        (thresholds, ratio, flops, quality),
        small_em,
        large_em,
        (fs, fl),
        int(small_tokens.sum()),
    )


def deferral_curve(
    cascade,
    eval_data,
    *,
    metric: str = "token_accuracy",
    level: str | None = None,
    rule: str | None = None,
    quantile: float | None = None,
    tokenizer=None,
    num_points: int = 21,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    cache: dict | None = None,
) -> DeferralCurve:
    """Quality of `cascade` against deferral ratio and relative FLOPs on `eval_data`.

    Args:
        cascade (`CascadeForCausalLM`): the cascade (`CascadeForCausalLM.from_models(small, large)`).
        eval_data: for `"token_accuracy"` / `"token_loss"`, a `LongTensor` `(rows, block)` or a `Dataset` with
            equal-length `input_ids` (e.g. the `pack_dataset` validation split); for `"exact_match"`, a `Dataset`
            with `prompt` and `completion` text columns (e.g. `build_code_sft_dataset(...)["test"]`).
        metric (`str`): `"token_accuracy"` (higher is better), `"token_loss"` (mean NLL, lower is better) or
            `"exact_match"`.
        level, rule, quantile: deferral granularity and sequence rule; default to the cascade's config.
        tokenizer: needed for `"exact_match"` (with a pad token).
        num_points (`int`): threshold quantiles between the two end points.
        max_new_tokens (`int`, *optional*): `"exact_match"` decoding budget; default: each batch's longest reference.
        cache (`dict`, *optional*): text metrics only: pass one dict to several calls to run each model over the
            same `eval_data` once (e.g. one large model against several small ones, or both metrics). Keyed by the
            model object and the rows' content, so do not reuse it after a model's weights change in place.

    Returns:
        [`DeferralCurve`]; its first point (threshold `-inf`) is the small model alone and its last (`+inf`) the large.

    Raises:
        ValueError: unknown metric / level / rule, or data without the needed columns.
    """
    if not (hasattr(cascade, "small") and hasattr(cascade, "large")):
        raise ValueError(
            f"deferral_curve needs a CascadeForCausalLM, got {type(cascade).__name__}; use CascadeForCausalLM.from_models(small, large)."
        )
    level = cascade.config.deferral if level is None else level
    rule = cascade.config.rule if rule is None else rule
    quantile = cascade.config.quantile if quantile is None else quantile
    _check(metric, level, rule, quantile, num_points)
    was_training = cascade.training
    cascade.eval()
    try:
        if metric == "exact_match":
            return _completion_curve(
                cascade, eval_data, tokenizer, level, rule, quantile, num_points, batch_size, max_new_tokens
            )
        rows = _as_id_rows(eval_data)
        return _text_curve(
            cascade.small, cascade.large, rows, metric, level, rule, quantile, num_points, batch_size, cache
        )
    finally:
        cascade.train(was_training)


def summarize_curves(curves: dict[str, DeferralCurve], baseline: str | None = None) -> dict[str, Any]:
    """Areas, end points and FLOPs saved per curve, and each curve's area gain over `baseline` (absolute)."""
    summary: dict[str, Any] = {}
    for name, curve in curves.items():
        summary[name] = {
            "area": curve.area,
            "area_flops": curve.area_flops,
            "small_quality": curve.small_quality,
            "large_quality": curve.large_quality,
            "flops_saved_at_large_minus_1pct": curve.flops_saved_at(0.01),
        }
        if baseline is not None and baseline in curves and name != baseline:
            summary[name]["area_gain_vs_" + baseline] = curve.area - curves[baseline].area
    return summary


__all__ = ["METRICS", "DeferralCurve", "deferral_curve", "forward_flops_per_token", "summarize_curves"]
