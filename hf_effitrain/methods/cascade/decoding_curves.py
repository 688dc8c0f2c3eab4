"""Decoded deferral curves: sequence- and token-level cascades, speculative cascades and speculative decoding.

Every method really decodes, at batch size 1 and greedily, a continuation of each prompt. Two quality measures:

- `large_logprob` (the curves' `quality`): the mean log-probability the large model gives the continuation's tokens
  (teacher forced on prompt + continuation, outside the timing): a low-noise, model-based measure on which the
  large model's own greedy text scores highest locally and the small model's lower;
- `continuation_accuracy`: the share of positions whose token equals the held-out reference token there (the
  task-based measure; noisy for small models, whose continuations diverge from the reference within a few tokens).
  `agreement_with_large`: the share of positions equal to the large model's greedy continuation.

For each swept setting the curve records:

- `small_share`: share of the new tokens taken from the small model (sequence level: the rows not deferred; token
  level: the tokens not deferred; speculative cascade: the positions where the rule trusted the small model);
- `relative_flops`: `2 * parameters` (input embeddings excluded) per processed token of each member, counted by
  forward hooks (rejected drafts and the lazy catch-up included), over the large model's own greedy decoding;
- `relative_wall`: summed `generate` wall-clock over that of the large model's greedy decoding of the same prompt,
  run right before it (interleaved prompt by prompt, so that the load of a shared machine hits both alike).
  Sequence-level points are recombined from the measured per-prompt small and large runs (the cascade runs the small
  model, then the large one on a deferred row: nothing else), every other point is its own run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from hf_effitrain.hub.cascade_rules import sequence_scores, token_logprobs

from .curves import forward_flops_per_token

# The speculative-cascade sweep: both exact ends (chow 0 = the large model, any rule at 1 = the small) and points between.
DEFAULT_ALPHAS: dict[str, list[float]] = {
    "chow": [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0],
    "diff": [0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 1.0],
    "opt": [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0],
}


@dataclass
class DecodedPoint:
    """One setting of one method: its parameter, quality, share from the small model, cost and forwards."""

    setting: float
    quality: float
    continuation_accuracy: float
    agreement_with_large: float
    small_share: float
    relative_flops: float
    relative_wall: float
    large_forwards: int
    small_forwards: int
    tokens_per_large_forward: float | None = None


@dataclass
class DecodedCurve:
    """A method's points, sorted by `small_share`; `area` is under quality against share, with the exact ends added."""

    method: str
    points: list[DecodedPoint]
    area: float = field(init=False)

    def __post_init__(self):
        self.points = sorted(self.points, key=lambda p: (p.small_share, p.setting))

    def finish(self, large_quality: float, small_quality: float) -> "DecodedCurve":
        """Area under quality vs small share over [0, 1]; share 0 is the large model's quality, share 1 the small's."""
        share = [0.0] + [p.small_share for p in self.points] + [1.0]
        quality = [large_quality] + [p.quality for p in self.points] + [small_quality]
        self.area = float(np.trapezoid(quality, share))
        return self

    def cheapest_at(self, target: float, key: str) -> float | None:
        """Least `key` (`relative_flops` / `relative_wall`) among points with quality >= target; None if none."""
        costs = [getattr(p, key) for p in self.points if p.quality >= target]
        return min(costs) if costs else None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "area": self.area, "points": [asdict(p) for p in self.points]}


class ForwardCounter:
    """Counts forward calls and processed positions of a module (forward hook; `input_ids` or `inputs_embeds`)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.tokens = 0
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = args[0] if args else kwargs.get("inputs_embeds")
        self.calls += 1
        self.tokens += int(inputs.shape[0] * inputs.shape[1])

    def take(self) -> tuple[int, int]:
        calls, tokens, self.calls, self.tokens = self.calls, self.tokens, 0, 0
        return calls, tokens

    def remove(self) -> None:
        self.handle.remove()


def _accuracy(new_tokens: torch.LongTensor, reference: torch.LongTensor) -> float:
    n = min(new_tokens.shape[-1], reference.shape[-1])
    return float((new_tokens[..., :n] == reference[..., :n]).double().mean())


class _Runner:
    """Runs one method over every prompt and measures quality, forwards and wall-clock (against interleaved large greedy)."""

    def __init__(self, cascade, prompts: torch.LongTensor, references: torch.LongTensor, common: dict[str, Any]):
        self.cascade, self.prompts, self.references, self.common = cascade, prompts, references, common
        self.counters = (ForwardCounter(cascade.small), ForwardCounter(cascade.large))
        self.flops = (forward_flops_per_token(cascade.small), forward_flops_per_token(cascade.large))
        self.large_tokens: list[torch.Tensor] | None = None  # the large model's greedy continuations (first run)

    def _timed(self, generate, prompt):
        start = time.perf_counter()
        with torch.no_grad():
            sequences, stats = generate(prompt)
        if sequences.is_cuda:
            torch.cuda.synchronize(sequences.device)
        return sequences, stats, time.perf_counter() - start

    def _large_greedy(self, prompt):
        return self.cascade.large.generate(prompt, **self.common), {}

    def run(self, generate) -> dict[str, Any]:
        """`generate(prompt (1, P)) -> (sequences, stats dict)`, over every prompt."""
        rows = []
        for i, (prompt, reference) in enumerate(zip(self.prompts, self.references)):
            prompt = prompt[None].to(self.cascade.small.device)
            _, _, baseline = self._timed(self._large_greedy, prompt)
            for counter in self.counters:
                counter.take()
            sequences, stats, seconds = self._timed(generate, prompt)
            (small_calls, small_tokens), (large_calls, large_tokens) = (c.take() for c in self.counters)
            new_tokens = sequences[0, prompt.shape[1] :].cpu()
            large = self.large_tokens[i] if self.large_tokens is not None else new_tokens
            rows.append(
                {
                    "accuracy": _accuracy(new_tokens, reference),
                    "agreement": _accuracy(new_tokens, large),
                    "sequence": sequences[0].cpu(),
                    "seconds": seconds,
                    "baseline_seconds": baseline,
                    "stats": stats,
                    "new_tokens": new_tokens,
                    "small_calls": small_calls,
                    "small_tokens": small_tokens,
                    "large_calls": large_calls,
                    "large_tokens": large_tokens,
                }
            )
        with torch.no_grad():  # quality under the large model, outside the timing
            scored = self._large_logprobs(torch.stack([r["sequence"] for r in rows]), self.prompts.shape[1])
        for row, value in zip(rows, scored.tolist()):
            row["large_logprob"] = value
        if self.large_tokens is None:
            self.large_tokens = [r["new_tokens"] for r in rows]
        return self.aggregate(rows)

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "rows": rows,
            "quality": float(np.mean([r["large_logprob"] for r in rows])),
            "continuation_accuracy": float(np.mean([r["accuracy"] for r in rows])),
            "agreement_with_large": float(np.mean([r["agreement"] for r in rows])),
            "seconds": float(sum(r["seconds"] for r in rows)),
            "baseline_seconds": float(sum(r["baseline_seconds"] for r in rows)),
            "flops": float(sum(self.flops[0] * r["small_tokens"] + self.flops[1] * r["large_tokens"] for r in rows)),
            "small_calls": sum(r["small_calls"] for r in rows),
            "large_calls": sum(r["large_calls"] for r in rows),
        }

    def _large_logprobs(self, sequences: torch.LongTensor, prompt_len: int, batch_size: int = 16) -> torch.Tensor:
        """Mean log-prob of each row's continuation under the large model `(rows,)` (not counted as forwards)."""
        large = self.cascade.large
        self.counters[1].handle.remove()
        try:
            values = []
            for start in range(0, sequences.shape[0], batch_size):
                batch = sequences[start : start + batch_size].to(large.device)
                logprobs = torch.log_softmax(large(input_ids=batch).logits[:, prompt_len - 1 : -1].float(), dim=-1)
                values.append(logprobs.gather(-1, batch[:, prompt_len:, None]).squeeze(-1).mean(-1).cpu())
            return torch.cat(values)
        finally:
            self.counters[1].handle = large.register_forward_hook(self.counters[1]._hook, with_kwargs=True)

    def close(self) -> None:
        for counter in self.counters:
            counter.remove()


def _point(setting, result, base, small_share) -> DecodedPoint:
    new = sum(int(r["new_tokens"].numel()) for r in result["rows"])
    return DecodedPoint(
        setting=float(setting),
        quality=result["quality"],
        continuation_accuracy=result["continuation_accuracy"],
        agreement_with_large=result["agreement_with_large"],
        small_share=float(small_share),
        relative_flops=result["flops"] / base["flops"],
        relative_wall=result["seconds"] / result["baseline_seconds"],
        large_forwards=result["large_calls"],
        small_forwards=result["small_calls"],
        tokens_per_large_forward=new / result["large_calls"] if result["large_calls"] else None,
    )


def _quantile_cuts(values: torch.Tensor, num_points: int) -> list[float]:
    finite = values[torch.isfinite(values)].double()
    if finite.numel() == 0:
        return []
    cuts = (
        torch.quantile(finite, torch.linspace(0, 1, num_points, dtype=torch.float64)) if finite.numel() > 1 else finite
    )
    return sorted({float(torch.nextafter(c, torch.tensor(math.inf, dtype=torch.float64))) for c in cuts})


def decoded_curves(
    cascade,
    prompts: torch.LongTensor,
    references: torch.LongTensor,
    *,
    alphas: dict[str, list[float]] | None = None,
    draft_len: int = 4,
    num_points: int = 9,
    sequence_rule: str = "chow_average",
) -> dict[str, Any]:
    """Decode every prompt with each method and return the curves (see the module docstring).

    Args:
        cascade (`CascadeForCausalLM`): the small and large members.
        prompts (`torch.LongTensor` of shape `(n, prompt_len)`): prompt ids (no padding).
        references (`torch.LongTensor` of shape `(n, new_tokens)`): the held-out continuations; every method decodes
            exactly `new_tokens` tokens (EOS off).
        alphas (`dict[str, list[float]]`, *optional*): speculative-cascade rule -> alphas to sweep (`DEFAULT_ALPHAS`).
        draft_len (`int`): drafts per large forward, for the speculative cascade and for `assistant_model`.
        num_points (`int`): thresholds (quantiles of the small model's scores) of the sequence and token cascades.
        sequence_rule (`str`): the sequence-level Chow rule.

    Returns:
        `dict` with `small` / `large` / `speculative_decoding` end points, a `DecodedCurve` dict per method
        (`sequence`, `token`, `speculative_<rule>`; `quality` is `large_logprob`), and the members' greedy wall-clock.
    """
    new = references.shape[1]
    if prompts.dim() != 2 or references.dim() != 2 or prompts.shape[0] != references.shape[0] or prompts.shape[0] == 0:
        raise ValueError(
            f"prompts and references must be (n, length) with the same n >= 1, got {tuple(prompts.shape)} and {tuple(references.shape)}."
        )
    alphas = DEFAULT_ALPHAS if alphas is None else alphas
    small, large = cascade.small, cascade.large
    pad = small.generation_config.pad_token_id
    common = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0 if pad is None else pad)
    runner = _Runner(cascade, prompts, references, common)
    try:

        def greedy(model):
            def run(prompt):
                out = model.generate(prompt, **common, return_dict_in_generate=True, output_logits=True)
                return out.sequences, {"logits": torch.stack(out.logits, 1).cpu()}

            return run

        large_run = runner.run(greedy(large))
        small_run = runner.run(greedy(small))
        base = large_run
        large_tokens = runner.large_tokens
        result: dict[str, Any] = {
            "large": asdict(_point(math.inf, large_run, base, 0.0)),
            "small": asdict(_point(-math.inf, small_run, base, 1.0)),
            "large_greedy_seconds": large_run["seconds"],
            "small_greedy_seconds": small_run["seconds"],
        }
        curves: dict[str, DecodedCurve] = {}

        # Sequence level: recombined from the measured small and large runs (per prompt).
        logprobs = torch.cat([token_logprobs(r["stats"]["logits"], r["new_tokens"][None]) for r in small_run["rows"]])
        scores = sequence_scores(logprobs, torch.ones_like(logprobs, dtype=torch.bool), sequence_rule, 0.0)
        points = []
        for threshold in _quantile_cuts(scores, num_points):
            deferred = (scores < threshold).tolist()
            rows = []
            for s, l, d in zip(small_run["rows"], large_run["rows"], deferred):
                row = dict(l if d else s)  # the answer, quality and large-model cost of the member that answered
                row.update(
                    seconds=s["seconds"] + (l["seconds"] if d else 0.0),
                    baseline_seconds=l["seconds"],
                    small_calls=s["small_calls"],
                    small_tokens=s["small_tokens"],
                )
                rows.append(row)
            combined = runner.aggregate(rows)
            points.append(_point(threshold, combined, base, 1.0 - float(np.mean(deferred))))
        curves["sequence"] = DecodedCurve("sequence", points)

        # Token level: really decoded at each threshold (quantiles of the small model's greedy-token log-probs).
        points = []
        for threshold in _quantile_cuts(logprobs.reshape(-1), num_points):

            def token_run(prompt, threshold=threshold):
                out = cascade.generate(prompt, strategy="cascade", deferral="token", threshold=threshold, **common)
                return out, dict(cascade.cascade_stats)

            run = runner.run(token_run)
            share = 1.0 - float(np.mean([r["stats"]["deferred_share"] for r in run["rows"]]))
            points.append(_point(threshold, run, base, share))
        curves["token"] = DecodedCurve("token", points)

        # Speculative cascades: one curve per rule over its alphas.
        for rule, values in alphas.items():
            points = []
            for alpha in values:

                def spec_run(prompt, alpha=alpha, rule=rule):
                    out = cascade.generate(
                        prompt,
                        strategy="speculative_cascade",
                        speculative_rule=rule,
                        speculative_alpha=alpha,
                        cascade_draft_len=draft_len,
                        **common,
                    )
                    return out, dict(cascade.cascade_stats)

                run = runner.run(spec_run)
                share = float(np.mean([r["stats"]["small_token_share"] for r in run["rows"]]))
                points.append(_point(alpha, run, base, share))
            curves[f"speculative_{rule}"] = DecodedCurve(f"speculative_{rule}", points)

        # Plain speculative decoding, the small model drafting `draft_len` tokens per large forward (constant schedule).
        assistant_config = small.generation_config
        saved = (
            getattr(assistant_config, "num_assistant_tokens", None),
            getattr(assistant_config, "num_assistant_tokens_schedule", None),
        )
        assistant_config.num_assistant_tokens, assistant_config.num_assistant_tokens_schedule = draft_len, "constant"
        try:

            def assisted(prompt):
                return large.generate(prompt, assistant_model=small, **common), {}

            run = runner.run(assisted)
        finally:
            assistant_config.num_assistant_tokens, assistant_config.num_assistant_tokens_schedule = saved
        point = asdict(_point(draft_len, run, base, 0.0))
        point["equal_to_large_greedy"] = sum(
            bool(torch.equal(r["new_tokens"], t)) for r, t in zip(run["rows"], large_tokens)
        )
        result["speculative_decoding"] = point

        small_quality, large_quality = small_run["quality"], large_run["quality"]
        result["curves"] = {
            name: curve.finish(large_quality, small_quality).to_dict() for name, curve in curves.items()
        }
        target = large_quality - 0.01 * abs(large_quality)  # the large model's quality minus 1%
        result["at_large_minus_1pct"] = {
            name: {
                "target_quality": target,
                "relative_flops": curve.cheapest_at(target, "relative_flops"),
                "relative_wall": curve.cheapest_at(target, "relative_wall"),
            }
            for name, curve in curves.items()
        }
        result["num_prompts"], result["new_tokens"], result["draft_len"] = int(prompts.shape[0]), new, draft_len
        return result
    finally:
        runner.close()


def plot_decoded_curves(results: dict[str, dict[str, Any]], path, title: str | None = None):
    """Quality against small share, relative FLOPs and relative wall-clock; one line style per small model.

    `results` maps a small model's name (e.g. `standard`, `paper`) to what `decoded_curves` returned.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    keys = ("small_share", "relative_flops", "relative_wall")
    labels = (
        "share of tokens from the small model",
        "FLOPs relative to the large model's greedy decoding",
        "wall-clock relative to the large model's greedy decoding",
    )
    colors = {
        "sequence": "tab:blue",
        "token": "tab:orange",
        "speculative_chow": "tab:green",
        "speculative_diff": "tab:purple",
        "speculative_opt": "tab:red",
    }
    for style, (name, result) in zip(("-", "--", ":", "-."), results.items()):
        for method, curve in result["curves"].items():
            points = curve["points"]
            for axis, key in zip(axes, keys):
                axis.plot(
                    [p[key] for p in points],
                    [p["quality"] for p in points],
                    linestyle=style,
                    marker=".",
                    color=colors.get(method),
                    label=f"{method} ({name})" if axis is axes[0] else None,
                )
        for axis, key in zip(axes, keys):
            for end, marker in (("small", "v"), ("large", "^"), ("speculative_decoding", "*")):
                point = result[end]
                axis.scatter(
                    [point[key]],
                    [point["quality"]],
                    marker=marker,
                    s=60,
                    color="black" if style == "-" else "grey",
                    label=f"{end} ({name})" if axis is axes[0] else None,
                    zorder=3,
                )
    for axis, label in zip(axes, labels):
        axis.set_xlabel(label)
        axis.set_ylabel("mean log-prob of the continuation under the large model")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(title or "decoded deferral curves")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["DEFAULT_ALPHAS", "DecodedCurve", "DecodedPoint", "ForwardCounter", "decoded_curves", "plot_decoded_curves"]
