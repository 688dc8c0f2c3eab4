"""`CascadeAwareTrainer`: trains a cascade's small model with the cascade-aware loss, given a frozen large model."""

from __future__ import annotations

import logging
from typing import Any

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import PreTrainedModel, Trainer

from hf_effitrain.hub.modeling_cascade import check_cascade_members
from hf_effitrain.integrations.lm_head import fusable_lm_head, fused_loss_enabled, lm_head_hidden_states

from .config import CascadeAwareTrainingArguments
from .loss import CascadeLossWeights, cascade_aware_loss

logger = logging.getLogger(__name__)

LARGE_PREDICTIONS = "large_predictions"


@torch.no_grad()
def large_model_outputs(
    large_model: PreTrainedModel, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
):
    """Greedy predictions `(batch, seq)` and logits of the frozen large model (no grad, eval mode)."""
    logits = large_model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits.argmax(-1), logits


def add_large_predictions(dataset: Dataset, large_model: PreTrainedModel, batch_size: int = 16) -> Dataset:
    """Add a `large_predictions` column (the large model's greedy next-token prediction at every position).

    Runs once with `datasets.map`; the result is cached with the dataset, keyed by the dataset's fingerprint and a
    hash of the large model's config and weights, so later runs (and later epochs) skip the large forward.
    """
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"Precomputing large-model predictions needs an `input_ids` column; got {dataset.column_names}."
        )
    device = next(large_model.parameters()).device
    weights_digest = Hasher.hash(
        [large_model.config.to_json_string(), [float(p.detach().double().sum()) for p in large_model.parameters()]]
    )
    has_mask = "attention_mask" in dataset.column_names

    def predict(batch: dict[str, list]) -> dict[str, list]:
        if len({len(ids) for ids in batch["input_ids"]}) == 1:  # packed blocks: one forward for the whole batch
            mask = torch.tensor(batch["attention_mask"], device=device) if has_mask else None
            preds, _ = large_model_outputs(large_model, torch.tensor(batch["input_ids"], device=device), mask)
            return {LARGE_PREDICTIONS: preds.tolist()}
        predictions = []
        for i, ids in enumerate(batch["input_ids"]):  # rows of different lengths: one at a time, no padding
            mask = torch.tensor([batch["attention_mask"][i]], device=device) if has_mask else None
            preds, _ = large_model_outputs(large_model, torch.tensor([ids], device=device), mask)
            predictions.append(preds[0].tolist())
        return {LARGE_PREDICTIONS: predictions}

    return dataset.map(
        predict,
        batched=True,
        batch_size=batch_size,
        new_fingerprint=Hasher.hash([dataset._fingerprint, weights_digest, "large_predictions_v2"]),
        desc="large-model predictions",
    )


class _PadLargePredictions:
    """Wraps a data collator: lays the `large_predictions` lists of a batch out like its `input_ids` (value -100).

    Each row's predictions go to the positions where the collated batch's `attention_mask` is 1, in order, so the
    result is right whatever side the collator pads on (a tokenizer's `padding_side`, a custom collator, ...).
    Predictions that a row's own `attention_mask` marks as padding (rows padded before collation) are dropped first.
    Without an `attention_mask` in the batch, rows must already have the batch's width.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if LARGE_PREDICTIONS not in features[0]:
            return self.collator(features)
        predictions = []
        for feature in features:
            row = torch.as_tensor(feature.pop(LARGE_PREDICTIONS), dtype=torch.long).reshape(-1)
            own_mask = feature.get("attention_mask")
            if own_mask is not None:
                own_mask = torch.as_tensor(own_mask).reshape(-1).bool()
                if own_mask.shape[0] == row.shape[0]:
                    row = row[own_mask]
            predictions.append(row)
        batch = self.collator(features)
        width = batch["input_ids"].shape[1]
        padded = torch.full((len(predictions), width), -100, dtype=torch.long)
        mask = batch.get("attention_mask")
        if mask is None:
            lengths = sorted({row.shape[0] for row in predictions})
            if lengths != [width]:
                raise ValueError(
                    f"Cannot place the precomputed `{LARGE_PREDICTIONS}` in the batch: its rows have lengths {lengths}, "
                    f"the collated `input_ids` width {width}, and the collator returned no `attention_mask` telling "
                    "where each row's tokens are. Use a collator that returns `attention_mask`, or precompute_large_predictions=False."
                )
            for i, row in enumerate(predictions):
                padded[i] = row
        else:
            mask = torch.as_tensor(mask).bool()
            for i, row in enumerate(predictions):
                positions = mask[i].nonzero().flatten()
                if positions.shape[0] != row.shape[0]:
                    raise ValueError(
                        f"Cannot place the precomputed `{LARGE_PREDICTIONS}` of batch row {i}: {row.shape[0]} predictions "
                        f"for {positions.shape[0]} attended tokens (did the collator truncate or add tokens?). Use "
                        "precompute_large_predictions=False with such a collator."
                    )
                padded[i, positions] = row
        batch[LARGE_PREDICTIONS] = padded
        return batch


class CascadeAwareTrainer(Trainer):
    """[`Trainer`] for the small model of a cascade: the cascade-aware loss of `args.cascade_loss_weights`.

    Args:
        model (`PreTrainedModel`): the small causal LM being trained.
        args (`CascadeAwareTrainingArguments`): training and loss settings.
        large_model (`PreTrainedModel`, *optional*): the frozen large causal LM (same vocabulary). It is put in eval
            mode, frozen (`requires_grad=False`), moved to the training device and run under `torch.no_grad`.
            Optional only for losses that do not look at it (the `"standard"` preset).
        kwargs: everything else of [`Trainer`] (`train_dataset`, `data_collator`, `processing_class`, ...).
            `large_tokenizer=` may be given to check that the two tokenizers agree.

    Raises:
        ValueError: vocabulary or tokenizer mismatch, a missing large model, or invalid loss weights.
    """

    def __init__(
        self,
        model=None,
        args: CascadeAwareTrainingArguments | None = None,
        large_model: PreTrainedModel | None = None,
        large_tokenizer=None,
        **kwargs,
    ):
        if args is None or not isinstance(args, CascadeAwareTrainingArguments):
            raise TypeError(f"CascadeAwareTrainer needs CascadeAwareTrainingArguments, got {type(args).__name__}.")
        self.loss_weights: CascadeLossWeights = args.cascade_loss_weights
        if large_model is None and (self.loss_weights.needs_large_predictions or self.loss_weights.needs_large_logits):
            raise ValueError(
                f"The cascade loss {self.loss_weights} looks at the large model's predictions: pass `large_model=`."
            )
        if large_model is not None:
            check_cascade_members(model, large_model, kwargs.get("processing_class"), large_tokenizer)
        super().__init__(model=model, args=args, **kwargs)
        self.large_model = large_model
        if large_model is not None:
            large_model.requires_grad_(False)
            large_model.eval()
            large_model.to(self.args.device)
        if args.precompute_large_predictions and self.loss_weights.needs_large_predictions:
            if self.train_dataset is not None:
                self.train_dataset = add_large_predictions(self.train_dataset, large_model, args.large_batch_size)
            if isinstance(self.eval_dataset, Dataset):
                self.eval_dataset = add_large_predictions(self.eval_dataset, large_model, args.large_batch_size)
            self.data_collator = _PadLargePredictions(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if LARGE_PREDICTIONS not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, LARGE_PREDICTIONS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cascade-aware loss; the `"standard"` weights use the stock `Trainer.compute_loss` unchanged."""
        inputs = dict(inputs)
        large_predictions = inputs.pop(LARGE_PREDICTIONS, None)
        fused_head = self._fused_loss_head(model, return_outputs)
        if self.loss_weights.is_standard and fused_head is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(
                "CascadeAwareTrainer needs `labels` in each batch (e.g. DataCollatorForLanguageModeling(mlm=False))."
            )
        large_logits = None
        if self.loss_weights.needs_large_logits or (
            self.loss_weights.needs_large_predictions and large_predictions is None
        ):
            if self.large_model.training:
                self.large_model.eval()
            large_predictions, large_logits = large_model_outputs(
                self.large_model, inputs["input_ids"], inputs.get("attention_mask")
            )
        if fused_head is not None:  # the LM head is skipped: the fused loss takes the hidden states
            hidden, outputs = lm_head_hidden_states(model, fused_head, **inputs)
            logits_or_hidden = {"logits": None, "hidden_states": hidden, "lm_head_weight": fused_head.weight}
        else:
            outputs = model(**inputs)
            logits_or_hidden = {"logits": outputs.logits}
        loss = cascade_aware_loss(
            labels=labels,
            large_predictions=large_predictions,
            weights=self.loss_weights,
            large_logits=large_logits,
            num_items_in_batch=num_items_in_batch,
            **logits_or_hidden,
        )
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def _fused_loss_head(self, model, return_outputs: bool):
        """The LM head the fused linear cross-entropy replaces (`args.use_fused_loss`), or None for the logits path."""
        if return_outputs or not model.training or self.loss_weights.needs_large_logits:
            return None
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return None
        if not fused_loss_enabled(getattr(self.args, "use_fused_loss", None), model):
            return None
        return fusable_lm_head(model)


__all__ = ["CascadeAwareTrainer", "add_large_predictions", "large_model_outputs"]
