"""Make-Some-Noise corruption drawn in the data collator, on the CPU tensors of a batch before they reach the device.

`MSNNoiseCollator` wraps the collator trl's `SFTTrainer` uses (`DataCollatorForLanguageModeling`, padded or
padding-free) and replaces, in `input_ids`, one contiguous segment of `noise_length` tokens inside the completion of
each corrupted sample; the labels stay clean. `add_noise` is the pure function behind it.

What a "sample" is: one original sequence. In a padded batch that is a row; in a packed or padding-free batch (rows
holding several sequences, whose `position_ids` restart at 0) each sequence gets its own segment, found from the
`position_ids` resets. A row without `position_ids` (the "wrapped" packing strategy) is one sample. A segment lies
where the labels are not -100 (the completion, or the assistant turns) and never crosses a sequence boundary or a
masked stretch. A sample without `noise_length` consecutive trainable tokens stays clean.

Seeding: every random number of a sample is a counter-based hash of (`seed`, `epoch`, the sample's dataset index,
the ordinal of the sequence within that dataset row (0 unless the row is packed), a stream number: 0 = "is it
corrupted", 1 = "where does the segment start", 2 + j = "the j-th noisy token"). Nothing depends on the batch
composition, the batch order, the process or a generator state, so a resumed run (or one with another batch size or
number of processes) draws the same noise for the same sample in the same epoch, and no state is saved.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .config import NOISE_KINDS

__all__ = ["INDEX_COLUMN", "MSNEpochCallback", "MSNNoiseCollator", "NOISE_STATS_KEY", "add_noise", "add_sample_index"]

logger = logging.get_logger(__name__)

INDEX_COLUMN = "msn_sample_index"  # dataset column with each training row's index: the noise key
NOISE_STATS_KEY = "msn_noised_samples"  # batch entry (a float) with the share of sequences corrupted

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """`x * c mod 2**32` for int64 tensors holding 32-bit values, split in 16-bit halves so nothing overflows int64."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' "lowbias32" integer hash, a bijection on 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform(*keys: torch.Tensor | int) -> torch.Tensor:
    """Float64 uniform in [0, 1) per element: a hash of the (broadcast) integer keys, each folded in as two 32-bit
    words."""
    h = torch.zeros((), dtype=torch.int64)
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.int64)
        for word in (key & _MASK32, (key >> 32) & _MASK32):
            h = _mix32(((h ^ word) + _GOLDEN32) & _MASK32)
    return h.double() / 2.0**32


def _check_noise_options(noise_length: int, noise_fraction: float, noise_kind: str, vocab_size: int | None) -> None:
    if isinstance(noise_length, bool) or not isinstance(noise_length, int) or noise_length < 0:
        raise ValueError(f"noise_length must be >= 0, got {noise_length!r}.")
    if not 0.0 <= float(noise_fraction) <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction!r}.")
    if noise_kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {list(NOISE_KINDS)}, got {noise_kind!r}.")
    if noise_kind == "uniform" and noise_length > 0 and vocab_size is None:
        raise ValueError("noise_kind='uniform' needs vocab_size.")


def add_noise(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    noise_length: int,
    *,
    noise_fraction: float = 1.0,
    noise_kind: str = "ahead",
    vocab_size: int | None = None,
    position_ids: torch.Tensor | None = None,
    sample_ids: torch.Tensor | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Corrupt one segment of `noise_length` tokens in the completion of each sampled sequence (vectorised).

    Each sequence is corrupted with probability `noise_fraction`; its segment start is uniform over the positions `s`
    where `s .. s+noise_length-1` are trainable and in that sequence; the segment's tokens are replaced in order, so
    with "ahead" noise a token can copy an earlier noisy one (as in the paper). All draws are keyed as described in
    the module docstring.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, seq)`): unshifted, as trl's collator emits them.
        labels (`torch.LongTensor` of shape `(batch, seq)`): -100 where there is no loss; never modified.
        noise_length (`int`): tokens per segment; 0 returns the input unchanged.
        noise_fraction (`float`, *optional*, defaults to `1.0`): probability that a sequence is corrupted.
        noise_kind (`str`, *optional*, defaults to `"ahead"`): `"ahead"` (copy of a uniformly random earlier token
            of the same sequence, prompt included) or `"uniform"` (a uniformly random id below `vocab_size`).
        vocab_size (`int`, *optional*): needed for `"uniform"`.
        position_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*): for packed rows, each restart at 0
            begins a sequence.
        sample_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*): the dataset index of the example each
            token comes from (the noise key; a change also begins a sequence). Defaults to the row number.
        seed (`int`, *optional*, defaults to `0`): the noise seed.
        epoch (`int`, *optional*, defaults to `0`): the training epoch (the same sample gets new noise each epoch).

    Returns:
        `tuple[torch.LongTensor, torch.BoolTensor, int]`: a corrupted copy of `input_ids`, the mask of the replaced
        positions (a replaced token may by chance equal the original one; the mask still marks it), and the number of
        sequences with at least one trainable token.

    Raises:
        ValueError: on a negative `noise_length`, a `noise_fraction` outside [0, 1], an unknown `noise_kind`, or
            `"uniform"` without `vocab_size`.
    """
    _check_noise_options(noise_length, noise_fraction, noise_kind, vocab_size)
    noisy, mask = input_ids.clone(), torch.zeros_like(labels, dtype=torch.bool)
    if noise_length == 0:  # plain SFT
        return noisy, mask, 0
    batch, seq_len = labels.shape
    n = labels.numel()
    flat_ids, flat_mask = noisy.view(-1), mask.view(-1)
    positions = torch.arange(n, device=labels.device)
    samples = (
        torch.arange(batch, device=labels.device)[:, None].expand(batch, seq_len) if sample_ids is None else sample_ids
    ).reshape(-1)

    # Sequences and examples, in flat (row-major) order: both start at a row start or where the sample id changes;
    # a sequence also starts where position_ids restart.
    new_example = positions % seq_len == 0
    new_example[1:] |= samples[1:] != samples[:-1]
    new_sequence = new_example.clone()
    if position_ids is not None:
        new_sequence |= position_ids.reshape(-1) == 0
    sequence = new_sequence.long().cumsum(0) - 1  # (n,) sequence number of each token
    num_sequences = int(sequence[-1]) + 1
    first_token = positions[new_sequence]  # (num_sequences,) first token of each sequence, prompt included
    ordinal = (sequence - torch.cummax(torch.where(new_example, sequence, 0), 0).values)[new_sequence]

    # A start s is eligible when s .. s+L-1 are trainable and in one sequence (hence in one row).
    trainable = labels.reshape(-1) != -100
    eligible = torch.zeros(n, dtype=torch.bool, device=labels.device)
    if n >= noise_length:
        eligible[: n - noise_length + 1] = trainable.unfold(0, noise_length, 1).all(dim=1) & (
            sequence[noise_length - 1 :] == sequence[: n - noise_length + 1]
        )
    num_eligible = torch.bincount(sequence[eligible], minlength=num_sequences)
    seen = int((torch.bincount(sequence[trainable], minlength=num_sequences) > 0).sum())

    key = (seed, epoch, samples[new_sequence], ordinal)
    corrupt = (_uniform(*key, 0) < noise_fraction) & (num_eligible > 0)
    rank = torch.minimum((_uniform(*key, 1) * num_eligible).long(), (num_eligible - 1).clamp(min=0))
    before = eligible.long().cumsum(0) - eligible.long()  # eligible starts before each token
    rank_in_sequence = before - before[first_token][sequence]
    chosen = eligible & corrupt[sequence] & (rank_in_sequence == rank[sequence])
    starts = chosen.nonzero().flatten()  # at most one per sequence
    owner = sequence[starts]
    first, owner_key = first_token[owner], (seed, epoch, key[2][owner], ordinal[owner])
    for j in range(noise_length):  # L vectorised steps over all segments, in order: earlier noise can be copied
        position = starts + j
        u = _uniform(*owner_key, 2 + j)
        if noise_kind == "ahead":
            span = position - first  # earlier tokens of the sequence; none for its very first token
            source = first + torch.minimum((u * span).long(), (span - 1).clamp(min=0))
            flat_ids[position] = flat_ids[source]
        else:
            flat_ids[position] = (u * vocab_size).long().clamp(max=vocab_size - 1)
        flat_mask[position] = True
    return noisy, mask, seen


class MSNNoiseCollator:
    """Collator that corrupts the `input_ids` of a training batch with MSN noise, after the wrapped collator.

    The wrapped collator (trl's `DataCollatorForLanguageModeling` as `SFTTrainer` builds it, or a user's) must return
    `input_ids` and `labels` tensors of the same shape with one row per example (padded), or a single row holding
    all the examples one after the other (padding-free); `position_ids`, when present, mark packed sequences.

    Each example must carry its dataset index in the `index_column` field (`add_sample_index` adds it; so does
    `NoisySFTTrainer` for its training set). The field is removed before the wrapped collator runs, so neither it nor
    the model sees it. The epoch comes from `set_epoch` (`MSNEpochCallback` calls it at each epoch start); it is kept
    in shared memory, so dataloader worker processes, persistent or not, see the update.

    Args:
        collator (`Callable[[list[dict]], dict]`): the collator to wrap.
        noise_length (`int`, *optional*, defaults to `5`): tokens per segment; 0 passes batches through unchanged
            (the index field, if any, is still removed).
        noise_fraction (`float`, *optional*, defaults to `1.0`): probability that a sample is corrupted.
        noise_kind (`str`, *optional*, defaults to `"ahead"`): `"ahead"` or `"uniform"` (see `add_noise`).
        vocab_size (`int`, *optional*): the model's vocabulary size, needed for `"uniform"`.
        seed (`int`, *optional*, defaults to `42`): the noise seed (`NoisySFTTrainer` passes `args.seed`).
        index_column (`str`, *optional*, defaults to `"msn_sample_index"`): the example field with the dataset index.
        return_noise_stats (`bool`, *optional*, defaults to `False`): add `NOISE_STATS_KEY` (a Python float: share of
            the batch's sequences corrupted) to the batch; the consumer must remove it before the model call
            (`NoisySFTTrainer` logs it as `noised_samples`).

    Raises:
        ValueError: on bad noise options, and at call time when an example lacks the index field or the wrapped
            collator's output cannot be mapped back to its examples.
        TypeError: if `collator` is not callable.
    """

    def __init__(
        self,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        noise_length: int = 5,
        *,
        noise_fraction: float = 1.0,
        noise_kind: str = "ahead",
        vocab_size: int | None = None,
        seed: int = 42,
        index_column: str = INDEX_COLUMN,
        return_noise_stats: bool = False,
    ):
        _check_noise_options(noise_length, noise_fraction, noise_kind, vocab_size)
        if not callable(collator):
            raise TypeError(f"collator must be callable, got {type(collator).__name__}.")
        self.collator = collator
        self.noise_length = noise_length
        self.noise_fraction = float(noise_fraction)
        self.noise_kind = noise_kind
        self.vocab_size = vocab_size
        self.seed = int(seed)
        self.index_column = index_column
        self.return_noise_stats = return_noise_stats
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # visible to dataloader workers

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that keys the noise of the following batches."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        self._epoch.fill_(int(epoch))

    def without_noise(self) -> MSNNoiseCollator:
        """A copy that only removes the index field (for evaluation batches)."""
        clean = copy.copy(self)
        clean.noise_length, clean.return_noise_stats = 0, False
        return clean

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples or not all(isinstance(example, Mapping) for example in examples):
            raise ValueError("MSNNoiseCollator expects a non-empty list of dict examples.")
        indices = [example.get(self.index_column) for example in examples]
        batch = self.collator([{k: v for k, v in example.items() if k != self.index_column} for example in examples])
        if self.noise_length == 0:
            return batch
        if any(index is None for index in indices):
            raise ValueError(
                f"MSNNoiseCollator: an example has no {self.index_column!r} field, the dataset index that keys its "
                "noise. NoisySFTTrainer adds it to its training set; elsewhere use add_sample_index(dataset)."
            )
        input_ids, labels = self._check_batch(batch)
        sample_ids = self._sample_ids(input_ids, torch.as_tensor(indices, dtype=torch.int64), examples)
        noisy, mask, seen = add_noise(
            input_ids,
            labels,
            self.noise_length,
            noise_fraction=self.noise_fraction,
            noise_kind=self.noise_kind,
            vocab_size=self.vocab_size,
            position_ids=batch.get("position_ids"),
            sample_ids=sample_ids,
            seed=self.seed,
            epoch=self.epoch,
        )
        corrupted = int(mask.sum()) // self.noise_length
        if self.noise_fraction == 1.0 and corrupted < seen:
            logger.warning_once(
                f"MSN: some sequences have fewer than noise_length={self.noise_length} consecutive completion tokens "
                "and stay clean (the logged `noised_samples` is the share actually corrupted)."
            )
        batch["input_ids"] = noisy
        if self.return_noise_stats:
            batch[NOISE_STATS_KEY] = corrupted / max(seen, 1)
        return batch

    @staticmethod
    def _check_batch(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = batch.get("input_ids"), batch.get("labels")
        if not isinstance(input_ids, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ValueError(
                "MSNNoiseCollator: the wrapped collator must return `input_ids` and `labels` torch tensors (unshifted "
                f"labels, -100 where there is no loss), got keys {sorted(batch)}."
            )
        if input_ids.dim() != 2 or input_ids.shape != labels.shape or input_ids.is_floating_point():
            raise ValueError(
                "MSNNoiseCollator: `input_ids` and `labels` must be integer tensors of the same (batch, seq) shape, got "
                f"{tuple(input_ids.shape)} and {tuple(labels.shape)}."
            )
        return input_ids, labels

    @staticmethod
    def _sample_ids(input_ids: torch.Tensor, indices: torch.Tensor, examples: list[dict[str, Any]]) -> torch.Tensor:
        """`(batch, seq)` dataset index of each token: per row when padded, per example run when padding-free."""
        rows, seq_len = input_ids.shape
        if rows == len(examples):
            return indices[:, None].expand(rows, seq_len)
        lengths = [len(example["input_ids"]) if "input_ids" in example else -1 for example in examples]
        if rows != 1 or min(lengths) < 0 or sum(lengths) > seq_len:
            raise ValueError(
                f"MSNNoiseCollator: cannot map the wrapped collator's batch of {rows} rows x {seq_len} tokens back to "
                f"its {len(examples)} examples: it must have one row per example (padded) or one row holding the "
                "examples' input_ids one after the other (padding-free)."
            )
        ids = torch.repeat_interleave(indices, torch.tensor(lengths))
        return torch.cat([ids, ids.new_full((seq_len - ids.numel(),), -1)])[None]  # -1: padding after the examples


def add_sample_index(dataset, column: str = INDEX_COLUMN):
    """Add each row's index as `column`, the key of its noise.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): the prepared (tokenized) training set. For an
            `IterableDataset` the index is the position in the stream as `datasets` numbers it: with several
            dataloader workers each numbers its own shards, so two samples may share a key (same noise pattern);
            the noise is still reproducible.
        column (`str`, *optional*, defaults to `"msn_sample_index"`): the column name.

    Returns:
        The dataset with the column added.

    Raises:
        ValueError: if the column exists already.
        TypeError: if `dataset` is neither a `datasets.Dataset` nor a `datasets.IterableDataset`.
    """
    import datasets

    if isinstance(dataset, datasets.Dataset):
        if column in dataset.column_names:
            raise ValueError(f"The training set already has a {column!r} column; rename it (MSN keys its noise on it).")
        return dataset.add_column(column, np.arange(len(dataset), dtype=np.int64))
    if isinstance(dataset, datasets.IterableDataset):
        if column in (dataset.column_names or ()):
            raise ValueError(f"The training set already has a {column!r} column; rename it (MSN keys its noise on it).")
        return dataset.map(lambda _, index: {column: index}, with_indices=True)
    raise TypeError(
        f"MSN noise needs a datasets.Dataset or datasets.IterableDataset training set, got {type(dataset).__name__}."
    )


class MSNEpochCallback(TrainerCallback):
    """Tells an `MSNNoiseCollator` the epoch at each epoch start (`Trainer` calls `on_epoch_begin` before it iterates
    the epoch's dataloader). On a resumed run `state.epoch` is the checkpoint's (e.g. 1.5 in epoch 1)."""

    def __init__(self, collator: MSNNoiseCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is exactly e after epoch e-1 (epoch + steps/steps); the margin guards a float a hair below it
        self.collator.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))
