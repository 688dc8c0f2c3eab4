"""MSNNoiseCollator / add_noise: one segment of L tokens inside each completion, keyed on (seed, index, epoch)."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import TrainerState
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_effitrain import MSNNoiseCollator
from hf_effitrain.methods.msn.collator import (
    INDEX_COLUMN,
    NOISE_STATS_KEY,
    MSNEpochCallback,
    add_noise,
    add_sample_index,
)

L = 3


def _runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    runs, start = [], None
    for i, bit in enumerate(mask_row.tolist() + [False]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def _examples(n=6, seed=0, packed=False):
    """Tokenized examples as trl's prepared dataset yields them: input_ids, labels (-100 on the prompt), an index."""
    rng = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(n):
        parts = int(torch.randint(2, 4, (), generator=rng)) if packed else 1
        ids, labels, lengths = [], [], []
        for _ in range(parts):
            prompt, completion = (
                int(torch.randint(1, 6, (), generator=rng)),
                int(torch.randint(L, 10, (), generator=rng)),
            )
            tokens = torch.randint(3, 100, (prompt + completion,), generator=rng).tolist()
            ids += tokens
            labels += [-100] * prompt + tokens[prompt:]
            lengths.append(prompt + completion)
        example = {"input_ids": ids, "labels": labels, INDEX_COLUMN: 10 * index + 3}
        if packed:
            example["seq_lengths"] = lengths
        examples.append(example)
    return examples


def _collator(padding_free=False, **kwargs):
    return MSNNoiseCollator(
        DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free), L, seed=7, **kwargs
    )


def _rows_by_example(batch, examples, padding_free=False):
    """The input ids of each example in a collated batch, keyed by its dataset index."""
    ids = batch["input_ids"]
    if not padding_free:
        return {ex[INDEX_COLUMN]: ids[row, : len(ex["input_ids"])] for row, ex in enumerate(examples)}
    out, offset = {}, 0
    for ex in examples:
        out[ex[INDEX_COLUMN]] = ids[0, offset : offset + len(ex["input_ids"])]
        offset += len(ex["input_ids"])
    return out


def test_add_noise_one_segment_per_row_inside_the_completion_with_ahead_copies():
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (6, 20))
    labels = ids.clone()
    for row, p in enumerate([2, 5, 9, 0, 12, 15]):
        labels[row, :p] = -100
    labels[5, 18:] = -100  # right padding: completion of 3 tokens = L
    labels[4, 14:] = -100  # completion of 2 tokens < L: stays clean
    noisy, mask, seen = add_noise(ids, labels, L, seed=1)
    assert seen == 6
    for row in range(6):
        runs = _runs(mask[row])
        if row == 4:
            assert runs == [] and torch.equal(noisy[row], ids[row])
            continue
        assert len(runs) == 1 and runs[0][1] == L
        assert (labels[row][mask[row]] != -100).all()
        assert torch.equal(noisy[row][~mask[row]], ids[row][~mask[row]])
        start = runs[0][0]
        for pos in range(start, start + L):  # "ahead": a copy of a token of the same row before the position
            assert noisy[row, pos] in noisy[row, :pos].tolist() + [ids[row, 0].item()]
    assert torch.equal(add_noise(ids, labels, L, seed=1)[0], noisy)  # a pure function of its keys


def test_add_noise_packed_rows_uniform_and_no_fraction():
    ids = torch.arange(3, 33)[None]
    position_ids = torch.tensor([[*range(10), *range(12), *range(8)]])
    labels = ids.clone()
    labels[0, [0, 1, 10, 11, 12, 22]] = -100  # prompts / sequence starts
    noisy, mask, seen = add_noise(ids, labels, L, noise_kind="uniform", vocab_size=7, position_ids=position_ids)
    assert seen == 3
    runs = _runs(mask[0])
    assert [length for _, length in runs] == [L, L, L]
    for (start, _), (lo, hi) in zip(runs, [(0, 10), (10, 22), (22, 30)]):
        assert lo <= start and start + L <= hi  # never crosses a sequence boundary
    assert (noisy[0][mask[0]] < 7).all() and (labels[0][mask[0]] != -100).all()
    _, none, _ = add_noise(ids, labels, L, noise_fraction=0.0, position_ids=position_ids)
    assert not none.any()
    with pytest.raises(ValueError, match="vocab_size"):
        add_noise(ids, labels, L, noise_kind="uniform")
    with pytest.raises(ValueError, match="noise_kind must be one of"):
        add_noise(ids, labels, L, noise_kind="gaussian")


def test_add_noise_fraction_of_rows_and_uniform_start_over_the_eligible_positions():
    ids = torch.randint(3, 100, (400, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100  # completion = positions 4..11: eligible starts 4..9
    _, mask, seen = add_noise(ids, labels, L, noise_fraction=0.3, seed=5)
    corrupted = int(mask.any(dim=1).sum())
    assert seen == 400 and 80 < corrupted < 160  # binomial(400, 0.3): mean 120, sd 9
    starts = [_runs(mask[0:1].view(-1)) for mask in [add_noise(ids[:1], labels[:1], L, epoch=e)[1] for e in range(120)]]
    assert {run[0][0] for run in starts} == set(range(4, 10))  # every eligible start is drawn, nothing else
    _, clean, _ = add_noise(ids, labels, 0)
    assert not clean.any()
    with pytest.raises(ValueError, match="noise_length must be >= 0, got -1"):
        add_noise(ids, labels, -1)


def test_collator_noise_depends_on_seed_index_epoch_not_on_the_batch():
    examples = _examples(6)
    collator = _collator(return_noise_stats=True)
    whole = collator(examples)
    assert INDEX_COLUMN not in whole and whole[NOISE_STATS_KEY] == 1.0
    clean = DataCollatorForLanguageModeling(pad_token_id=0)(
        [{k: v for k, v in ex.items() if k != INDEX_COLUMN} for ex in examples]
    )
    assert torch.equal(whole["labels"], clean["labels"])  # labels untouched
    changed = whole["input_ids"] != clean["input_ids"]
    for row in range(len(examples)):
        positions = changed[row].nonzero().flatten().tolist()
        assert positions and positions[-1] - positions[0] < L and (clean["labels"][row, positions] != -100).all()
    reference = _rows_by_example(whole, examples)
    for subset in ([examples[4], examples[1]], [examples[2]], examples[::-1]):
        for index, row in _rows_by_example(collator(subset), subset).items():
            assert torch.equal(row, reference[index]), index
    collator.set_epoch(1)
    assert collator.epoch == 1
    later = _rows_by_example(collator(examples), examples)
    assert any(not torch.equal(later[i], reference[i]) for i in reference)  # new noise in a new epoch
    other_seed = MSNNoiseCollator(collator.collator, L, seed=8)
    assert any(
        not torch.equal(row, reference[i]) for i, row in _rows_by_example(other_seed(examples), examples).items()
    )


def test_collator_padding_free_packed_batches_one_segment_per_sequence():
    examples = _examples(4, seed=1, packed=True)
    collator = _collator(padding_free=True)
    batch = collator(examples)
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch and INDEX_COLUMN not in batch
    clean = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{k: v for k, v in ex.items() if k != INDEX_COLUMN} for ex in examples]
    )
    assert torch.equal(batch["labels"], clean["labels"]) and torch.equal(batch["position_ids"], clean["position_ids"])
    changed = (batch["input_ids"] != clean["input_ids"])[0]
    bounds = clean["cu_seq_lens_q"].tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # each packed sequence: changes only inside one window of L
        positions = [p for p in changed.nonzero().flatten().tolist() if lo <= p < hi]
        assert not positions or (positions[-1] - positions[0] < L and (clean["labels"][0, positions] != -100).all())
    assert changed.any()
    reference = _rows_by_example(batch, examples, padding_free=True)
    swapped = [examples[2], examples[0]]
    for index, row in _rows_by_example(collator(swapped), swapped, padding_free=True).items():
        assert torch.equal(row, reference[index])


def test_collator_refuses_what_it_cannot_key_or_map_and_eval_copy_only_strips_the_index():
    examples = _examples(3)
    collator = _collator()
    with pytest.raises(ValueError, match=INDEX_COLUMN):
        collator([{k: v for k, v in ex.items() if k != INDEX_COLUMN} for ex in examples])
    clean = collator.without_noise()(examples)
    assert INDEX_COLUMN not in clean
    assert torch.equal(
        clean["input_ids"],
        DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": ex["input_ids"]} for ex in examples])[
            "input_ids"
        ],
    )
    with pytest.raises(ValueError, match="input_ids.*labels"):
        MSNNoiseCollator(lambda batch: {"input_ids": torch.zeros(3, 4, dtype=torch.long)}, L)(examples)
    with pytest.raises(ValueError, match="cannot map"):
        MSNNoiseCollator(
            lambda batch: {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "labels": torch.zeros(2, 4, dtype=torch.long),
            },
            L,
        )(examples)
    with pytest.raises(ValueError, match="noise_fraction"):
        MSNNoiseCollator(collator.collator, L, noise_fraction=2.0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        collator.set_epoch(-1)


def test_collator_warns_once_when_a_sample_is_too_short(caplog):
    short = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], INDEX_COLUMN: 0}]
    collator = MSNNoiseCollator(DataCollatorForLanguageModeling(pad_token_id=0), 7)  # noise_length unique to this test
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert torch.equal(collator(short)["input_ids"], torch.tensor([[5, 6, 7, 8]]))
    assert sum("noise_length=7" in record.getMessage() for record in caplog.records) == 1


def test_epoch_reaches_persistent_dataloader_workers_and_the_callback_floors_state_epoch():
    examples = _examples(4)
    collator = _collator()
    loader = torch.utils.data.DataLoader(
        examples, batch_size=2, collate_fn=collator, num_workers=1, persistent_workers=True
    )
    seen = []
    for epoch in range(2):
        MSNEpochCallback(collator).on_epoch_begin(None, TrainerState(epoch=float(epoch)), None)
        seen.append([batch["input_ids"] for batch in loader])
    for epoch in range(2):
        collator.set_epoch(epoch)
        assert all(
            torch.equal(got, collator(examples[2 * i : 2 * i + 2])["input_ids"]) for i, got in enumerate(seen[epoch])
        )
    callback = MSNEpochCallback(collator)
    for state_epoch, expected in [(0.0, 0), (1.5, 1), (2.0, 2), (2.9999999999, 3)]:
        callback.on_epoch_begin(None, TrainerState(epoch=state_epoch), None)
        assert collator.epoch == expected


def test_add_sample_index_on_map_style_and_iterable_sets():
    data = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6]]})
    assert add_sample_index(data)[INDEX_COLUMN] == [0, 1, 2]
    streamed = add_sample_index(data.to_iterable_dataset())
    assert isinstance(streamed, IterableDataset) and [row[INDEX_COLUMN] for row in streamed] == [0, 1, 2]
    with pytest.raises(ValueError, match="already has"):
        add_sample_index(add_sample_index(data))
    with pytest.raises(TypeError, match="datasets.Dataset"):
        add_sample_index([{"input_ids": [1]}])
