"""Run a causal LM without its LM head, so a fused linear + cross-entropy can take the head's place.

`lm_head_hidden_states` hooks the output embeddings (`get_output_embeddings()`), records the hidden states they
receive and hands them an empty slice instead: the model returns logits of length 0 and the (N, V) logits are never
computed. `fused_causal_lm_loss` builds the stock causal-LM training loss on that, `linear_argmax` gives the greedy
prediction of each row of `hidden @ weight.T` in chunks, for losses that need the model's own predictions (the
cascade-aware loss) without the logits. `fused_loss_enabled` resolves the trainers' `use_fused_loss` argument.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers.utils import logging

from hf_effitrain.ops.linear_cross_entropy import default_chunk_size, fused_linear_cross_entropy

__all__ = [
    "fusable_lm_head",
    "fused_causal_lm_loss",
    "fused_loss_enabled",
    "linear_argmax",
    "lm_head_hidden_states",
    "logit_transform",
]

logger = logging.get_logger(__name__)  # transformers' logger: `info_once` reports each reason once per process


def fused_loss_enabled(use_fused_loss: bool | None, model: nn.Module) -> bool:
    """A trainer's `use_fused_loss`: `None` means on when the model's parameters are on CUDA."""
    if use_fused_loss is not None:
        return bool(use_fused_loss)
    return next(model.parameters()).device.type == "cuda"


# Config names under which architectures soft-cap their output logits (`tanh(logits / c) * c`).
SOFTCAP_NAMES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# Where the scaling is applied to the hidden states before the head (the head's input already carries it).
_SCALES_HIDDEN_STATES = {"minicpm3": "logits_scaling"}


def _text_config(model: nn.Module):
    config = getattr(extract_model_from_parallel(model), "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """`(scale, softcap)`: what the model's forward does to `lm_head(hidden)` before its loss.

    A loss computed from the head's input must do the same: Cohere multiplies the logits by `logit_scale`, Granite
    divides them by `logits_scaling`, Gemma 2 / 3, RecurrentGemma and xLSTM soft-cap them (`SOFTCAP_NAMES`,
    `tanh(logits / c) * c`, applied after the scale). MiniCPM3 divides the hidden states by `logits_scaling` before
    the head, so its logits are not scaled again. `(1.0, None)` for the plain models.
    """
    text_config = _text_config(model)
    scale = float(getattr(text_config, "logit_scale", None) or 1.0)
    if _SCALES_HIDDEN_STATES.get(getattr(text_config, "model_type", None)) != "logits_scaling":
        scale /= float(getattr(text_config, "logits_scaling", None) or 1.0)
    softcap = next((getattr(text_config, name) for name in SOFTCAP_NAMES if getattr(text_config, name, None)), None)
    return scale, softcap


def _unknown_logit_setting(model: nn.Module) -> str | None:
    """A set config entry that looks like a logit transform this module does not know (named `*logit*` with `cap`
    or `scal` in it): the fused loss is then not used, so that the model's own logits are scored."""
    text_config = _text_config(model)
    known = {"logit_scale", "logits_scaling", *SOFTCAP_NAMES}
    for name, value in vars(text_config).items() if text_config is not None else ():
        if (
            "logit" in name
            and ("cap" in name or "scal" in name)
            and name not in known
            and value not in (None, 0, 1, 1.0, False)
        ):
            return name
    return None


def fusable_lm_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head if a fused linear cross-entropy can replace it (a plain bias-free `nn.Linear`, logits not
    scaled or soft-capped), else None after logging once why."""
    head = extract_model_from_parallel(model).get_output_embeddings()
    scale, softcap = logit_transform(model)
    reason = None
    if type(head) is not nn.Linear:
        reason = f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    elif head.bias is not None:
        reason = "the LM head has a bias"
    elif softcap:
        reason = "the model soft-caps its logits"
    elif scale != 1.0:
        reason = f"the model scales its logits (by {scale:g})"
    elif _unknown_logit_setting(model):
        reason = f"the model's config sets `{_unknown_logit_setting(model)}`, which may transform its logits"
    if reason is None:
        return head
    logger.info_once("fused linear cross-entropy not used: %s; computing the logits instead", reason)
    return None


def lm_head_hidden_states(model: nn.Module, head: nn.Module, **forward_kwargs):
    """`model(**forward_kwargs)` with `head` skipped: returns (hidden states `head` would receive (B, T, H), outputs).

    Do not pass `labels` (the model would compute its loss on the empty logits).
    """
    captured: dict[str, torch.Tensor] = {}

    def grab_and_skip(module, args, kwargs):
        captured["hidden"] = args[0]
        return (args[0][..., :0, :], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(grab_and_skip, with_kwargs=True)
    try:
        outputs = model(**forward_kwargs)
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise ValueError(
            f"{type(extract_model_from_parallel(model)).__name__}.forward never called its output embeddings, so its "
            "hidden states cannot be taken for the fused loss; set use_fused_loss=False"
        )
    return captured["hidden"], outputs


@torch.no_grad()
def linear_argmax(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """(N,) argmax of each row of `hidden (N, H) @ weight (V, H).T`, one chunk of rows at a time."""
    num_rows = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(num_rows, weight.shape[0], weight.shape[1])
    pieces = [(hidden[start : start + chunk] @ weight.T).argmax(-1) for start in range(0, num_rows, chunk)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.long)


def fused_causal_lm_loss(
    model: nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100
) -> torch.Tensor | None:
    """The stock causal-LM loss of `model(**inputs)` (labels shifted inside, `sum / num_items_in_batch`, or the mean
    over trained tokens without it, as transformers' `ForCausalLMLoss`) through `fused_linear_cross_entropy`.

    Returns None when the batch has no `labels` or the LM head cannot be fused (logged once): compute it the stock way.
    """
    labels = inputs.get("labels")
    head = fusable_lm_head(model) if labels is not None else None
    if head is None:
        return None
    hidden, _ = lm_head_hidden_states(model, head, **{k: v for k, v in inputs.items() if k != "labels"})
    targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1, 1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
    if num_items_in_batch is None:
        return fused_linear_cross_entropy(hidden, head.weight, targets, ignore_index=ignore_index)
    loss = fused_linear_cross_entropy(hidden, head.weight, targets, ignore_index=ignore_index, reduction="sum")
    return loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
