"""`NoisySFTTrainer`: trl's `SFTTrainer` with "Make Some Noise" input corruption on training batches.

Only the `compute_loss` hook changes: on a training batch (the model is in train mode) it replaces the input ids of one
contiguous segment per corrupted sample and hands the batch on to `SFTTrainer.compute_loss`, so the corrupted ids are
what every loss path sees (trl's fused LM head, `compute_loss_func`, label smoothing) while the labels stay clean.
Evaluation batches (the model is in eval mode) are never touched.

What a "sample" is: one original sequence. In a padded batch that is a row; with packing / padding-free batches
(rows holding several sequences, whose `position_ids` restart at 0) each original sequence gets its own segment,
found from the `position_ids` resets (trl's default "bfd" packing is padding-free). Rows without `position_ids`
(the "wrapped" packing strategy) are one sample each. A segment lies where the labels are not -100 (the
completion, or the assistant turns) and never crosses a sequence boundary or a masked stretch. A sample whose
completion is shorter than `noise_length` is left clean and counted in the logged `noised_samples` share.

Reproducibility: each training micro-batch draws its noise from a fresh generator seeded from (`args.seed`, global
step, micro-batch index within the gradient accumulation, process index), so the noise depends on where the batch
sits in training only; a run resumed from a checkpoint draws the same noise as the uninterrupted run (there is no
generator state to save).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from trl import SFTTrainer

from .noisy_sft_config import NoisySFTConfig

__all__ = ["NoisySFTTrainer", "add_noise"]

logger = logging.getLogger(__name__)


def _sequence_ids(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """`(batch, seq)` id of the original sequence of each token: the row, split further where `position_ids` restart."""
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None] * labels.shape[1]
    if position_ids is None:
        return rows.expand_as(labels)
    starts = (position_ids == 0).long()
    starts[:, 0] = 0
    return rows + starts.cumsum(dim=1)


def add_noise(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    noise_length: int,
    *,
    noise_fraction: float = 1.0,
    noise_kind: str = "ahead",
    vocab_size: int | None = None,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Corrupt one segment of `noise_length` tokens in the completion of each sampled sequence.

    Args:
        input_ids, labels (`torch.LongTensor` of shape `(batch, seq)`): unshifted, as trl's collator emits them.
        noise_length (`int`): tokens per segment.
        noise_fraction (`float`): probability that a sequence is corrupted.
        noise_kind (`str`): "ahead" (copy of a random earlier token of the same sequence) or "uniform".
        vocab_size (`int`): needed for "uniform".
        position_ids (`torch.LongTensor`, *optional*): for packed rows, where each restart at 0 begins a sequence.
    Returns:
        (corrupted copy of `input_ids`, boolean mask of the replaced positions, number of sequences seen). A
        replaced token may by chance equal the original one; the mask still marks it.
    """
    if noise_kind == "uniform" and vocab_size is None:
        raise ValueError("noise_kind='uniform' needs vocab_size.")
    noisy, mask = input_ids.clone(), torch.zeros_like(labels, dtype=torch.bool)
    if noise_length < 0:
        raise ValueError(f"noise_length must be >= 0, got {noise_length}.")
    if noise_length == 0 or labels.numel() < noise_length:  # 0: plain SFT, nothing to corrupt
        return noisy, mask, 0
    flat_ids, flat_mask, flat_seq = noisy.view(-1), mask.view(-1), _sequence_ids(labels, position_ids).reshape(-1)
    trainable = (labels != -100).reshape(-1)
    seq_len = labels.shape[1]
    # A start s is eligible when s .. s+L-1 are trainable, in one sequence and one row.
    window = trainable.unfold(0, noise_length, 1).all(dim=1)
    same = flat_seq[noise_length - 1 :] == flat_seq[: flat_seq.numel() - noise_length + 1]
    starts = torch.arange(window.numel(), device=labels.device)
    same_row = (starts % seq_len) + noise_length <= seq_len
    eligible = window & same & same_row
    sequences = torch.unique(flat_seq[trainable]) if trainable.any() else flat_seq[:0]
    for sequence in sequences.tolist():
        if torch.rand((), generator=generator).item() >= noise_fraction:
            continue
        candidates = starts[eligible & (flat_seq[: window.numel()] == sequence)]
        if candidates.numel() == 0:
            continue
        start = int(candidates[torch.randint(candidates.numel(), (), generator=generator)])
        first = int((flat_seq == sequence).nonzero()[0])  # first token of the sequence (prompt included)
        for position in range(start, start + noise_length):  # in order, like the paper: earlier noise can be copied
            if noise_kind == "ahead":
                source = int(torch.randint(first, position, (), generator=generator)) if position > first else first
                flat_ids[position] = flat_ids[source]
            else:
                flat_ids[position] = int(torch.randint(vocab_size, (), generator=generator))
        flat_mask[start : start + noise_length] = True
    return noisy, mask, len(sequences)


class NoisySFTTrainer(SFTTrainer):
    """`SFTTrainer` that trains with MSN noise (see `NoisySFTConfig`); everything else is trl's SFT.

    Args:
        args (`NoisySFTConfig`): the SFT arguments plus `noise_length`, `noise_fraction`, `noise_kind`.
        *others: as for `trl.SFTTrainer` (`peft_config=`, datasets, collator...).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, NoisySFTConfig):
            raise TypeError(f"NoisySFTTrainer needs args=NoisySFTConfig(...), got {type(self.args).__name__}.")
        self._noise_position = (-1, 0)  # (global step, micro-batches already corrupted in it)
        self._warned_short = False

    def _noise_generator(self) -> torch.Generator:
        """A generator for this training micro-batch, seeded from (seed, global step, micro-batch, process).

        Within one optimizer step `state.global_step` stays put while the micro-batches of the gradient accumulation
        go by, so they are counted; a resumed run starts at the checkpoint's step with micro-batch 0, like the
        uninterrupted run did, and therefore draws the same noise.
        """
        step, micro = self._noise_position
        micro = micro + 1 if step == self.state.global_step else 0
        self._noise_position = (self.state.global_step, micro)
        entropy = [int(self.args.seed) & 0xFFFFFFFF, self.state.global_step, micro, self.args.process_index]
        words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.args.noise_length > 0:
            inputs = self._corrupt(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _corrupt(self, inputs: dict) -> dict:
        labels, ids = inputs["labels"], inputs["input_ids"]
        vocab_size = self.model.config.get_text_config().vocab_size
        noisy, mask, seen = add_noise(
            ids.cpu(),
            labels.cpu(),
            self.args.noise_length,
            noise_fraction=self.args.noise_fraction,
            noise_kind=self.args.noise_kind,
            vocab_size=vocab_size,
            position_ids=inputs["position_ids"].cpu() if "position_ids" in inputs else None,
            generator=self._noise_generator(),
        )
        corrupted = int(mask.sum()) // self.args.noise_length
        if self.args.noise_fraction == 1.0 and corrupted < seen and not self._warned_short:
            logger.warning(
                "MSN: %d of %d sequences in a batch have fewer than noise_length=%d consecutive completion tokens and "
                "stay clean (logged as `noised_samples`).", seen - corrupted, seen, self.args.noise_length,
            )
            self._warned_short = True
        self._metrics["train"]["noised_samples"].append(corrupted / max(seen, 1))
        return {**inputs, "input_ids": noisy.to(ids.device)}
