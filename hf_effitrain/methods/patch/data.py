"""Data side of patch-level training: one packed dataset of T-token blocks feeds both stages.

The user passes the blocks `hf_effitrain.data.pack_dataset` produces (every row `block_size` tokens, documents joined
with EOS). The run reads them as one stream: the blocks grouped into K consecutive blocks (contiguous text), groups in
a seeded random order, a fresh order for each pass over the data. The patch stage takes the stream's first groups,
one group per K*T-token sequence (T patches); the token stage continues the stream from there, one block per
sequence, shuffled within the stage. So with a one-pass budget the two stages see disjoint data (the paper: the
first lambda of the data at patch level, the rest at token level), and a multi-pass budget repeats the data as the
paper's multi-epoch variant does. The trailing `num_blocks % K` blocks are left out of the stream.

`StagedBlockDataset` lays the whole run out as one map-style dataset, item i being the i-th training sequence;
`MicroBatchDataset` groups it into the run's micro-batches (item j = micro-batch j, already collated), because the two
stages' micro-batches may hold different numbers of sequences (equal-tokens batching: B/K sequences of K*T tokens,
then B blocks). Read one item per batch in order, `accelerate`'s per-process sharding (micro-batch j goes to process
j mod world size) and the Trainer's resume skipping (in micro-batches) apply as is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "BLOCK_COLUMNS",
    "GroupedBlockDataset",
    "MicroBatchDataset",
    "StagedBlockDataset",
    "block_size_of",
    "collate_blocks",
    "single_item",
]

logger = logging.getLogger(__name__)

BLOCK_COLUMNS = ("input_ids", "attention_mask", "labels")


def block_size_of(dataset: Any) -> int:
    """Tokens per row of a packed dataset (read from its first row).

    Raises:
        TypeError: for a dataset without `__len__`/indexing (e.g. an `IterableDataset`).
        ValueError: for an empty dataset, one without `input_ids`, or blocks shorter than 2 tokens.
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"Patch-level training needs a map-style dataset of packed blocks (len() and indexing), got "
            f"{type(dataset).__name__}; pack it with hf_effitrain.pack_dataset."
        )
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty.")
    row = dataset[0]
    if "input_ids" not in row:
        raise ValueError(f"Dataset rows need an 'input_ids' column, got columns {sorted(row)}.")
    size = len(row["input_ids"])
    if size < 2:
        raise ValueError(f"Blocks of {size} token(s) do not fit patch-level training: block_size must be >= 2.")
    return size


def _read_blocks(dataset: Any, indices: Sequence[int], block_size: int) -> dict[str, torch.Tensor]:
    """Rows `indices` of `dataset` concatenated along the sequence, one tensor per present block column."""
    rows = [dataset[int(i)] for i in indices]
    out = {}
    for name in BLOCK_COLUMNS:
        if name not in rows[0]:
            continue
        parts = [torch.as_tensor(row[name]) for row in rows]
        for i, part in zip(indices, parts):
            if part.shape != (block_size,):
                raise ValueError(
                    f"Row {int(i)} has {name} of shape {tuple(part.shape)}; every row must be one block of "
                    f"{block_size} tokens (pack the data with hf_effitrain.pack_dataset)."
                )
        out[name] = torch.cat(parts)
    return out


class GroupedBlockDataset(Dataset):
    """Item j = blocks jK .. jK+K-1 joined into one K*T-token sequence (patch-level evaluation)."""

    def __init__(self, blocks: Any, patch_size: int):
        self.blocks, self.patch_size = blocks, patch_size
        self.block_size = block_size_of(blocks)

    def __len__(self) -> int:
        return len(self.blocks) // self.patch_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.patch_size
        return _read_blocks(self.blocks, range(start, start + self.patch_size), self.block_size)


class StagedBlockDataset(Dataset):
    """The whole run as one dataset: `num_patch_items` K*T-token sequences, then `num_token_items` T-token blocks.

    Args:
        blocks: map-style dataset of `block_size`-token rows with `input_ids` (optionally `attention_mask`, `labels`).
        patch_size: K.
        num_patch_items / num_token_items: sequences of each stage (steps x global batch).
        seed: seed of the group order of each pass and of the token-stage shuffle.
    """

    def __init__(self, blocks: Any, patch_size: int, num_patch_items: int, num_token_items: int, seed: int = 0):
        self.blocks, self.patch_size, self.seed = blocks, patch_size, seed
        self.block_size = block_size_of(blocks)
        self.num_groups = len(blocks) // patch_size
        if self.num_groups == 0:
            raise ValueError(f"The dataset has {len(blocks)} blocks, fewer than patch_size={patch_size}.")
        if len(blocks) % patch_size:
            logger.info(
                "Leaving out the last %d of %d blocks (not a whole group of %d).",
                len(blocks) % patch_size,
                len(blocks),
                patch_size,
            )
        self.num_patch_items, self.num_token_items = num_patch_items, num_token_items
        self._orders: dict[int, torch.Tensor] = {}
        generator = torch.Generator().manual_seed(seed + 1_000_003)
        self._token_order = torch.randperm(num_token_items, generator=generator)

    def __len__(self) -> int:
        return self.num_patch_items + self.num_token_items

    def _group_order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders[epoch] = torch.randperm(
                self.num_groups, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
        return self._orders[epoch]

    def _stream_block(self, position: int) -> int:
        """Dataset row at `position` of the block stream."""
        per_epoch = self.num_groups * self.patch_size
        epoch, offset = divmod(position, per_epoch)
        group = int(self._group_order(epoch)[offset // self.patch_size])
        return group * self.patch_size + offset % self.patch_size

    def is_patch_item(self, index: int) -> bool:
        return index < self.num_patch_items

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0 or index >= len(self):
            raise IndexError(index)
        if self.is_patch_item(index):
            start = index * self.patch_size
            rows = [self._stream_block(start + k) for k in range(self.patch_size)]
        else:
            position = self.num_patch_items * self.patch_size + int(self._token_order[index - self.num_patch_items])
            rows = [self._stream_block(position)]
        return _read_blocks(self.blocks, rows, self.block_size)


class MicroBatchDataset(Dataset):
    """Item j = micro-batch j of a `StagedBlockDataset`, collated: `patch_batch` consecutive patch sequences while
    in the patch part, then `token_batch` consecutive blocks.

    Args:
        run (`StagedBlockDataset`): the run's sequences in order.
        patch_batch (`int`): sequences per patch-stage micro-batch (must divide `run.num_patch_items`).
        token_batch (`int`): sequences per token-stage micro-batch (must divide `run.num_token_items`).
        collator (`Callable`): turns a list of rows into a batch (the trainer's data collator).

    Raises:
        ValueError: when a stage does not split into whole micro-batches.
    """

    def __init__(self, run: StagedBlockDataset, patch_batch: int, token_batch: int, collator: Callable[[list], Any]):
        for name, items, size in (
            ("patch", run.num_patch_items, patch_batch),
            ("token", run.num_token_items, token_batch),
        ):
            if size < 1 or items % size:
                raise ValueError(f"The {name} stage's {items} sequences do not split into micro-batches of {size}.")
        self.run, self.patch_batch, self.token_batch, self.collator = run, patch_batch, token_batch, collator
        self.num_patch_batches = run.num_patch_items // patch_batch
        self.num_token_batches = run.num_token_items // token_batch

    def __len__(self) -> int:
        return self.num_patch_batches + self.num_token_batches

    def sequence_indices(self, index: int) -> range:
        """Indices into `run` of the sequences of micro-batch `index`."""
        if index < 0 or index >= len(self):
            raise IndexError(index)
        if index < self.num_patch_batches:
            return range(index * self.patch_batch, (index + 1) * self.patch_batch)
        start = self.run.num_patch_items + (index - self.num_patch_batches) * self.token_batch
        return range(start, start + self.token_batch)

    def __getitem__(self, index: int) -> Any:
        return self.collator([self.run[i] for i in self.sequence_indices(index)])


def single_item(items: list[Any]) -> Any:
    """Collate function of a dataloader with batch size 1 over already-collated micro-batches."""
    return items[0]


def collate_blocks(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack equal-length rows; add `labels = input_ids` (-100 where `attention_mask` is 0) when rows carry none.

    For packed blocks this is `default_data_collator` plus the causal-LM labels the loss needs.
    """
    batch = {
        name: torch.stack([torch.as_tensor(f[name]) for f in features]) for name in BLOCK_COLUMNS if name in features[0]
    }
    if "labels" not in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        batch["labels"] = labels
    return batch
