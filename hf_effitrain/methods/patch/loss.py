"""The patch-level loss of Shao et al. (2024) for any causal LM of transformers, without touching its modeling code.

A patch is the plain mean of K consecutive token embeddings (taken from `get_input_embeddings()`), fed to the model
as `inputs_embeds`, so that patch i takes position i in the model's own convention (0..T-1, or from `padding_idx + 1`
for the RoBERTa family). The final hidden state of patch i goes through the model's own LM head once, and that one
distribution is scored against every token of patch i+1:

    loss = (1/K) * sum_k CE(logits_i, x_{(i+1)K+k})        (each CE a mean over the valid positions)

The loss is computed from the logits the model's forward returns, so whatever an architecture does around its head
(Cohere / Granite logit scaling, MiniCPM3's hidden-state scaling, soft-capping under any config name) is kept, and
K=1 is the model's own causal-LM loss. With the fused loss (a plain bias-free head, logits untouched after it) the
hidden states are taken at the input of the output embeddings with a forward pre-hook, which hands the head an empty
slice so that the model computes no logits, and `fused_linear_cross_entropy` scores (hidden, head weight, targets
(N, K)) without them. Both work through peft wrappers and DDP (the model is called through its wrapper's `forward`,
so gradient synchronisation is intact). Architectures whose forward needs token ids are refused
(`check_patch_architecture`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel

from hf_effitrain.integrations.lm_head import fusable_lm_head, fused_loss_enabled
from hf_effitrain.ops import fused_linear_cross_entropy

from .config import validate_patch_options

__all__ = [
    "check_causal_lm",
    "check_patch_architecture",
    "multi_target_cross_entropy",
    "patch_embeddings",
    "patch_level_loss",
    "patch_targets",
]


def check_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return `(input_embeddings, lm_head)` of a (possibly peft- or DDP-wrapped) causal LM.

    Raises:
        ValueError: when the model has no input embeddings, or no output embeddings mapping hidden states to the
            vocabulary of its input embeddings (e.g. an `AutoModel` without a head, or a classification model).
    """
    inner = extract_model_from_parallel(model)
    name = type(inner).__name__
    try:
        embed = inner.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embed = None
    if embed is None or getattr(embed, "weight", None) is None:
        raise ValueError(
            f"{name} has no input embeddings (get_input_embeddings()); patch-level training averages token embeddings "
            "and needs a causal LM such as AutoModelForCausalLM."
        )
    try:
        head = inner.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        head = None
    vocab = embed.weight.shape[0]
    weight = getattr(head, "weight", None)
    # The head maps to the embedding rows, or to the config's vocabulary when the table is larger (cpmant's prompt
    # rows, mllama's image tokens); a classifier's few rows are neither.
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    allowed_rows = {vocab, getattr(text_config, "vocab_size", vocab)}
    if (
        head is None
        or weight is None
        or weight.dim() != 2
        or weight.shape[0] not in allowed_rows
        or weight.shape[0] > vocab
    ):
        got = (
            "none"
            if head is None
            else f"{type(head).__name__} with weight {None if weight is None else tuple(weight.shape)}"
        )
        raise ValueError(
            f"{name} has no LM head mapping hidden states to (at most) its {vocab} input embeddings (get_output_embeddings(): "
            f"{got}); patch-level training needs a causal LM such as AutoModelForCausalLM, not AutoModel."
        )
    return embed, head


def patch_embeddings(
    token_embeds: torch.Tensor, patch_size: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Average (B, K*T, H) token embeddings into (B, T, H) patch embeddings.

    With a `token_mask` (B, K*T) the mean runs over the real tokens of each patch only, so a partly padded patch is
    the mean of its real tokens and an all-padding patch is zero (it is masked from attention and loss anyway).
    """
    batch, length, hidden = token_embeds.shape
    grouped = token_embeds.view(batch, length // patch_size, patch_size, hidden)
    if token_mask is None or bool(token_mask.all()):
        return grouped.mean(2)
    mask = token_mask.view(batch, length // patch_size, patch_size, 1).to(token_embeds.dtype)
    return (grouped * mask).sum(2) / mask.sum(2).clamp_min(1.0)


def patch_targets(
    labels: torch.Tensor, patch_size: int, patch_mask: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """Targets (B, T-1, K) of patches 0..T-2: the K tokens of the next patch, `ignore_index` where not scored.

    `labels` (B, K*T) are unshifted token ids with `ignore_index` at tokens that must not be predicted (padding);
    patches that are all padding (`patch_mask` False) predict nothing.
    """
    batch, length = labels.shape
    targets = labels.view(batch, length // patch_size, patch_size)[:, 1:]
    if patch_mask is not None:
        targets = targets.masked_fill(~patch_mask[:, :-1, None], ignore_index)
    return targets


def multi_target_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """`(1/K) * sum_k` of the mean CE of one logit row per position against K targets.

    Args:
        hidden (`torch.Tensor` of shape `(N, H)`): final hidden states.
        weight (`torch.Tensor` of shape `(V, H)`): the LM head weight (`bias` its optional bias).
        targets (`torch.LongTensor` of shape `(N, K)`): target ids, `ignore_index` where not scored.
        softcap (`float`, *optional*): `tanh` logit soft-capping of models like gemma2, applied before the softmax.
        scale (`float`, defaults to 1): factor applied to the logits first (Cohere's `logit_scale`, Granite's
            `1 / logits_scaling`; see `hf_effitrain.ops.logit_transform`).

    Returns:
        The scalar loss. Column k's CE is averaged over its non-ignored rows, then the K columns are averaged: the
        official code's loss, and for K=1 the stock causal-LM cross-entropy. The logits are computed once in float32
        and one log-softmax serves all K targets (no K full-vocabulary log-softmaxes). Same contract as
        `hf_effitrain.ops.fused_linear_cross_entropy(..., reduction="mean")`, which can replace this call.
    """
    return _cross_entropy_from_logits(F.linear(hidden, weight, bias), targets, ignore_index, softcap, scale)


def _cross_entropy_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    logits = logits.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    valid = targets != ignore_index
    # one log-softmax serves all K targets (its backward is cheaper than logsumexp's, measured on CPU)
    nll = -logits.log_softmax(dim=-1).gather(1, targets.masked_fill(~valid, 0)) * valid
    per_column = nll.sum(0) / valid.sum(0).clamp_min(1)
    return per_column.mean()


# Model types whose patch-level loss is not defined without changing the architecture (mostly: the forward needs
# token ids, and a patch, a mean of embeddings, has none). Type -> why.
_PATCH_UNSUPPORTED_TYPES = {
    "deepseek_v4": "its MoE routes hash-assigned experts by token id, and a patch (a mean of embeddings) has none",
    "prophetnet": "its causal LM predicts n-gram streams with its own loss, not one next-token distribution",
    "cpmant": "its forward builds its segment, position and prompt inputs from `input_ids`, which a patch has not",
}


def check_patch_architecture(model: nn.Module) -> None:
    """Refuse the architectures whose forward cannot take patch embeddings in place of tokens.

    Raises:
        ValueError: naming the model type and why (per-layer inputs looked up by token id, hash routing, ...).
    """
    config = getattr(extract_model_from_parallel(model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    reason = _PATCH_UNSUPPORTED_TYPES.get(model_type) or _PATCH_UNSUPPORTED_TYPES.get(
        getattr(config, "model_type", None)
    )
    if reason is None and getattr(text_config, "hidden_size_per_layer_input", None):
        reason = "its per-layer inputs are looked up by token id (`hidden_size_per_layer_input`), and a patch has none"
    if reason is None and getattr(text_config, "causal", None) is False:  # XLM's default
        reason = (
            "its config makes it attend bidirectionally (`causal=False`), so a patch would see the tokens it predicts"
        )
    if (
        reason is None
        and getattr(text_config, "is_decoder", None) is False
        and hasattr(text_config, "add_cross_attention")
    ):
        reason = (
            "its config makes it attend bidirectionally (`is_decoder=False`; set it to True to train it as a causal LM)"
        )
    if reason is not None:
        raise ValueError(
            f"patch-level training cannot run {type(extract_model_from_parallel(model)).__name__} (model_type "
            f"{model_type!r}): {reason}."
        )


def _patch_forward(
    model: nn.Module, head: nn.Module, inputs_embeds: torch.Tensor, patch_mask: torch.Tensor | None, keep_head: bool
) -> torch.Tensor:
    """Run `model` on patch embeddings; return its own logits (B, T, V) if `keep_head`, else the hidden states its LM
    head receives (B, T, H), the head being handed an empty slice so that no logits are computed.

    Position ids are left to the model, as in its own causal-LM loss: 0..T-1 for most, `padding_idx + 1`.. for the
    RoBERTa family, which derives them from `inputs_embeds`. The model's logits already carry whatever its forward
    does after the head (Cohere / Granite scaling, soft-capping under any config name).
    """
    captured: dict[str, torch.Tensor] = {}

    def grab_and_skip(module, args, kwargs):
        captured["hidden"] = args[0]
        # the head still runs, on zero positions: the full-vocabulary logits are computed once, by the fused loss
        return (args[0][..., :0, :], *args[1:]), kwargs

    attention_mask = None if patch_mask is None or bool(patch_mask.all()) else patch_mask.long()
    handle = None if keep_head else head.register_forward_pre_hook(grab_and_skip, with_kwargs=True)
    try:
        outputs = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    if keep_head:
        logits = outputs.logits
        if logits.shape[1] != inputs_embeds.shape[1]:  # e.g. a config that keeps only the last positions' logits
            raise ValueError(
                f"{type(extract_model_from_parallel(model)).__name__} returned logits for {logits.shape[1]} of "
                f"{inputs_embeds.shape[1]} patches (does its config set `num_logits_to_keep` / `logits_to_keep`?); "
                "the patch-level loss needs every position's logits."
            )
        return logits
    if "hidden" not in captured:
        raise ValueError(
            f"{type(extract_model_from_parallel(model)).__name__}.forward never called its output embeddings; "
            "patch-level training needs a causal LM whose forward applies get_output_embeddings() to the hidden states."
        )
    return captured["hidden"]


def patch_level_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    patch_size: int,
    attention_mask: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    use_fused_loss: bool | None = None,
) -> torch.Tensor:
    """The patch-level training loss of `model` on `input_ids` of K*T tokens (T patches).

    Args:
        model (`nn.Module`): any causal LM of transformers, optionally peft-, DDP- or compile-wrapped.
        input_ids (`torch.LongTensor` of shape `(B, K*T)`): token ids; the length must be a multiple of K, T >= 2.
        patch_size (`int`): K >= 1. K=1 gives the stock causal-LM loss (up to float rounding).
        attention_mask (`torch.Tensor` of shape `(B, K*T)`, *optional*): 1 for real tokens, 0 for padding. A patch
            that is all padding is masked from attention and predicts nothing; padding tokens are never targets.
        labels (`torch.LongTensor` of shape `(B, K*T)`, *optional*): unshifted targets with -100 at tokens not to
            predict, as collators produce them; defaults to `input_ids`.
        use_fused_loss (`bool`, *optional*): score the K targets with `hf_effitrain.ops.fused_linear_cross_entropy`
            (same loss, no (positions, vocab) logits); `None`: on when the model is on CUDA.

    Returns:
        The scalar loss `(1/K) sum_k CE(logits_i, x_{(i+1)K+k})` averaged over the scored patches.

    Example:

    >>> loss = patch_level_loss(model, batch["input_ids"], patch_size=4)   # doctest: +SKIP
    """
    validate_patch_options(patch_size, 0.0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, K*T), got shape {tuple(input_ids.shape)}.")
    length = input_ids.shape[1]
    if length % patch_size or length // patch_size < 2:
        raise ValueError(
            f"Sequence length {length} does not fit patch_size={patch_size}: it must be a multiple of K with at least "
            f"2 patches (K*T tokens, T >= 2); pack the data into blocks of K*T tokens."
        )
    embed, head = check_causal_lm(model)
    check_patch_architecture(model)
    token_mask = None if attention_mask is None else attention_mask.bool()
    patch_mask = None if token_mask is None else token_mask.view(input_ids.shape[0], -1, patch_size).any(-1)
    targets = input_ids if labels is None else labels
    if token_mask is not None:
        targets = targets.masked_fill(~token_mask, -100)
    targets = patch_targets(targets, patch_size, patch_mask).reshape(-1, patch_size)
    fused_head = fusable_lm_head(model) if fused_loss_enabled(use_fused_loss, model) else None
    out = _patch_forward(
        model, head, patch_embeddings(embed(input_ids), patch_size, token_mask), patch_mask, fused_head is None
    )
    out = out[:, :-1].reshape(-1, out.shape[-1])
    if fused_head is not None:
        return fused_linear_cross_entropy(out.to(fused_head.weight.dtype), fused_head.weight, targets)
    return _cross_entropy_from_logits(out, targets)
