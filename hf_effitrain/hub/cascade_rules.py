"""Deferral scores of a cascade: Chow-Sum, Chow-Average and Chow-Quantile over the small model's token log-probs.

Gupta et al. 2024 ("Language model cascades: token-level uncertainty and beyond"): Chow-Sum (the sequence
log-likelihood) over-defers long answers, Chow-Average (the per-token mean) has the reverse length bias, and
Chow-Quantile-alpha (the alpha-quantile of the token log-probs; alpha=0 is the least confident token) is the most
robust simple rule. All scores are log-probabilities, hence in [-inf, 0]; the cascade defers when score < threshold.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.LongTensor) -> torch.Tensor:
    """Log-probability of each chosen token: `logits` (batch, T, vocab), `tokens` (batch, T) -> (batch, T) float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def generated_mask(new_tokens: torch.LongTensor, eos_token_ids: list[int] | None) -> torch.BoolTensor:
    """(batch, T) mask of the tokens a sequence really emitted: everything up to and including its first EOS.

    Positions after the first EOS hold padding that `generate` appended while other rows were still running.
    """
    if not eos_token_ids:
        return torch.ones_like(new_tokens, dtype=torch.bool)
    is_eos = torch.isin(new_tokens, torch.tensor(eos_token_ids, device=new_tokens.device))
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return eos_before == 0


def sequence_scores(logprobs: torch.Tensor, mask: torch.BoolTensor, rule: str, quantile: float = 0.0) -> torch.Tensor:
    """Score each row of `logprobs` (batch, T) over its `mask`ed tokens with a Chow rule; returns (batch,) float32.

    Raises:
        ValueError: for an unknown rule.
    """
    logprobs = logprobs.float()
    kept = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    if rule == "chow_sum":
        return kept.sum(-1)
    if rule == "chow_average":
        return kept.sum(-1) / mask.sum(-1).clamp(min=1)
    if rule == "chow_quantile":
        masked = logprobs.masked_fill(~mask, float("nan"))
        # nanquantile cannot interpolate with -inf entries; clamp them to the float32 floor (still "never confident").
        masked = masked.clamp(min=torch.finfo(torch.float32).min)
        return torch.nanquantile(masked, quantile, dim=-1, interpolation="linear")
    raise ValueError(f"Unknown deferral rule {rule!r}; valid rules are 'chow_sum', 'chow_average', 'chow_quantile'.")


__all__ = ["generated_mask", "sequence_scores", "token_logprobs"]
