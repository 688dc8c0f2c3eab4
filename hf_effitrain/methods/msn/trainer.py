"""`NoisySFTTrainer`: trl's `SFTTrainer` with "Make Some Noise" input corruption on training batches.

The noise is drawn in the data collator (`MSNNoiseCollator`), on the CPU tensors of each training batch, before the
batch reaches the device: no host-device synchronisation in the training step. The trainer

- wraps the collator `SFTTrainer` would use (trl's `DataCollatorForLanguageModeling`, padded or padding-free as the
  `SFTConfig` dictates) or the `data_collator` the user passes, which must return `input_ids` / `labels` tensors with
  one row per example (a user collator that does not is refused with a clear error at its first batch; passing an
  `MSNNoiseCollator` is refused at once, since the trainer builds it from `NoisySFTConfig`);
- adds each training row's index as the `msn_sample_index` column (kept through `remove_unused_columns`, removed by
  the collator before the model sees the batch) and tells the collator the epoch at each epoch start, so the noise of
  a sample depends only on (`args.seed`, its index in the prepared training set, the epoch): a resumed run draws what
  the uninterrupted run drew (see `hf_effitrain.methods.msn.collator` for exactly what is hashed);
- builds the evaluation / prediction dataloaders with a noise-free copy of the collator, so evaluation batches are
  never touched, and logs the share of corrupted sequences of each training batch as `noised_samples`.

Every loss path of `SFTTrainer` (fused LM head, `compute_loss_func`, label smoothing) sees the corrupted ids, with
clean labels.
"""

from __future__ import annotations

import contextlib

from trl import SFTTrainer

from .collator import INDEX_COLUMN, NOISE_STATS_KEY, MSNEpochCallback, MSNNoiseCollator, add_noise, add_sample_index
from .config import NoisySFTConfig

__all__ = ["NoisySFTTrainer", "add_noise"]


class NoisySFTTrainer(SFTTrainer):
    """`SFTTrainer` that trains with MSN noise (see `NoisySFTConfig` and `MSNNoiseCollator`); everything else is trl's
    SFT.

    Args:
        args (`NoisySFTConfig`): the SFT arguments plus `noise_length`, `noise_fraction`, `noise_kind`.
        *others: as for `trl.SFTTrainer` (`peft_config=`, datasets, `data_collator` (wrapped, see the module
            docstring)...).

    Raises:
        TypeError: if `args` is not a `NoisySFTConfig`, or `data_collator` is already an `MSNNoiseCollator`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, NoisySFTConfig):
            raise TypeError(f"NoisySFTTrainer needs args=NoisySFTConfig(...), got {type(self.args).__name__}.")
        if isinstance(self.data_collator, MSNNoiseCollator):
            raise TypeError(
                "NoisySFTTrainer builds its MSNNoiseCollator from NoisySFTConfig: pass the collator to wrap (or none)."
            )
        self.data_collator = MSNNoiseCollator(
            self.data_collator,
            self.args.noise_length,
            noise_fraction=self.args.noise_fraction,
            noise_kind=self.args.noise_kind,
            vocab_size=self.model.config.get_text_config().vocab_size,
            seed=self.args.seed,
            return_noise_stats=True,
        )
        if self.train_dataset is not None:
            self.train_dataset = add_sample_index(self.train_dataset)
        self.add_callback(MSNEpochCallback(self.data_collator))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if INDEX_COLUMN not in self._signature_columns:  # keep the noise key through `remove_unused_columns`
            self._signature_columns = [*self._signature_columns, INDEX_COLUMN]

    @contextlib.contextmanager
    def _collator_without_noise(self):
        noisy = self.data_collator
        self.data_collator = noisy.without_noise() if isinstance(noisy, MSNNoiseCollator) else noisy
        try:
            yield
        finally:
            self.data_collator = noisy

    def get_eval_dataloader(self, eval_dataset=None):
        with self._collator_without_noise():  # evaluation batches are never corrupted, even on the training set
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._collator_without_noise():
            return super().get_test_dataloader(test_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if NOISE_STATS_KEY in inputs:  # a Python float from the collator; never reaches the model
            self._metrics["train"]["noised_samples"].append(inputs[NOISE_STATS_KEY])
            inputs = {key: value for key, value in inputs.items() if key != NOISE_STATS_KEY}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
