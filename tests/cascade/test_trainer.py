"""CascadeAwareTrainer: frozen large model, precomputed predictions, the standard preset, mismatch errors."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from hf_effitrain.methods.cascade.config import CascadeAwareTrainingArguments
from hf_effitrain.methods.cascade.trainer import CascadeAwareTrainer, add_large_predictions
from tests.cascade.cascade_helpers import tiny_pair, word_tokenizer
from tests.testing_utils import tiny_model


def _data(rows: int = 8, length: int = 12) -> Dataset:
    ids = torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(tmp_path, **kwargs) -> CascadeAwareTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return CascadeAwareTrainingArguments(**{**defaults, **kwargs})


def _batch(dataset: Dataset) -> dict[str, torch.Tensor]:
    return default_data_collator([dataset[i] for i in range(4)])


def test_large_model_frozen_in_eval_mode_and_small_learns(tmp_path):
    small, large = tiny_pair("llama")
    large.train()  # the trainer must switch it to eval mode itself
    large_before = {k: v.clone() for k, v in large.state_dict().items()}
    small_before = {k: v.clone() for k, v in small.state_dict().items()}
    trainer = CascadeAwareTrainer(
        model=small,
        args=_args(tmp_path, cascade_preset="paper_kd"),
        large_model=large,
        train_dataset=_data(),
        data_collator=default_data_collator,
    )
    trainer.train()
    assert not large.training
    assert all(not p.requires_grad and p.grad is None for p in large.parameters())
    assert all(torch.equal(v, large_before[k]) for k, v in large.state_dict().items())
    assert any(not torch.equal(v, small_before[k]) for k, v in small.state_dict().items())


def test_precomputed_predictions_give_the_same_loss(tmp_path):
    small, large = tiny_pair("llama")
    data = _data()
    on_the_fly = CascadeAwareTrainer(
        model=small, args=_args(tmp_path / "a", cascade_preset="paper"), large_model=large, train_dataset=data
    )
    cached = CascadeAwareTrainer(
        model=small,
        args=_args(tmp_path / "b", cascade_preset="paper", precompute_large_predictions=True),
        large_model=large,
        train_dataset=data,
    )
    assert "large_predictions" in cached.train_dataset.column_names
    expected = large(input_ids=torch.tensor(data["input_ids"])).logits.argmax(-1)
    assert torch.equal(torch.tensor(cached.train_dataset["large_predictions"]), expected)
    batch = cached.data_collator([cached.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss_cached = cached.compute_loss(small, batch)
        loss_fly = on_the_fly.compute_loss(small, _batch(data))
    torch.testing.assert_close(loss_cached, loss_fly)


def test_add_large_predictions_is_cached_by_fingerprint():
    _, large = tiny_pair("llama")
    data = _data(rows=4)
    first = add_large_predictions(data, large)
    again = add_large_predictions(data, large)
    assert first._fingerprint == again._fingerprint
    with torch.no_grad():
        large.model.norm.weight.mul_(2.0)
    assert add_large_predictions(data, large)._fingerprint != first._fingerprint


def test_standard_preset_matches_stock_trainer(tmp_path):
    small = tiny_model("llama")
    data = _data()
    batch = _batch(data)
    ours = CascadeAwareTrainer(model=small, args=_args(tmp_path / "a", cascade_preset="standard"), train_dataset=data)
    stock = Trainer(
        model=small,
        args=TrainingArguments(output_dir=str(tmp_path / "b"), report_to=[], use_cpu=True),
        train_dataset=data,
    )
    with torch.no_grad():
        assert torch.equal(
            ours.compute_loss(small, dict(batch), num_items_in_batch=torch.tensor(40)),
            stock.compute_loss(small, dict(batch), num_items_in_batch=torch.tensor(40)),
        )
        assert torch.equal(ours.compute_loss(small, dict(batch)), stock.compute_loss(small, dict(batch)))


def test_vocabulary_mismatch_raises(tmp_path):
    small = tiny_model("llama")
    other = tiny_model("llama", vocab_size=96, seed=1, hidden_size=64)
    with pytest.raises(ValueError, match="vocabulary"):
        CascadeAwareTrainer(model=small, args=_args(tmp_path), large_model=other, train_dataset=_data())


def test_tokenizer_mismatch_raises(tmp_path):
    small, large = tiny_pair("llama")
    tokenizer = word_tokenizer()
    other = word_tokenizer()
    other.add_tokens(["extra"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        CascadeAwareTrainer(
            model=small,
            args=_args(tmp_path),
            large_model=large,
            processing_class=tokenizer,
            large_tokenizer=other,
            train_dataset=_data(),
        )


def test_large_smaller_than_small_warns(tmp_path, caplog):
    small, large = tiny_pair("llama")
    with caplog.at_level(logging.WARNING):
        CascadeAwareTrainer(model=large, args=_args(tmp_path), large_model=small, train_dataset=_data())
    assert "smaller than the small one" in caplog.text


def test_argument_errors(tmp_path):
    small = tiny_model("llama")
    with pytest.raises(ValueError, match="large_model"):
        CascadeAwareTrainer(model=small, args=_args(tmp_path, cascade_preset="paper"), train_dataset=_data())
    with pytest.raises(ValueError, match="precompute_large_predictions"):
        _args(tmp_path, cascade_preset="paper_kd", precompute_large_predictions=True)
    with pytest.raises(ValueError, match="both_wrong"):
        _args(tmp_path, weight_both_wrong=-1.0)
    with pytest.raises(TypeError, match="CascadeAwareTrainingArguments"):
        CascadeAwareTrainer(
            model=small, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]), train_dataset=_data()
        )


class _StopAfterFirstStep(TrainerCallback):
    """Simulates a run killed after its first step (and its checkpoint)."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True
        return control


def test_resume_from_checkpoint_reaches_the_same_weights(tmp_path):
    data = _data()

    def run(out, resume=None, callbacks=()):
        small, large = tiny_pair("llama")
        args = _args(out, max_steps=2, save_strategy="steps", save_steps=1, cascade_preset="paper")
        trainer = CascadeAwareTrainer(
            model=small, args=args, large_model=large, train_dataset=data, callbacks=list(callbacks)
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model.state_dict()

    straight = run(tmp_path / "straight")
    run(tmp_path / "killed", callbacks=[_StopAfterFirstStep()])
    resumed = run(tmp_path / "killed", resume=str(tmp_path / "killed" / "checkpoint-1"))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value)


def test_precomputed_predictions_for_rows_of_different_lengths():
    _, large = tiny_pair("llama")
    rows = [[5, 9, 14, 3], [7, 8], [11, 12, 13]]
    data = add_large_predictions(Dataset.from_dict({"input_ids": rows}), large, batch_size=3)
    for ids, predictions in zip(rows, data["large_predictions"]):
        assert predictions == large(input_ids=torch.tensor([ids])).logits.argmax(-1)[0].tolist()


def test_precomputed_predictions_follow_a_left_padding_collator_without_processing_class(tmp_path):
    # Regression: the padding side used to be read from `processing_class`; with only a left-padding collator the
    # predictions landed on pad positions and real tokens got -100, silently changing the case weights.
    from transformers import DataCollatorForLanguageModeling

    small, large = tiny_pair("llama")
    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    rows = [[5, 9, 14, 3, 20, 21], [7, 8, 30], [11, 12, 13, 14]]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    common = dict(large_model=large, train_dataset=data, data_collator=collator)
    cached = CascadeAwareTrainer(
        model=small, args=_args(tmp_path / "a", cascade_preset="paper", precompute_large_predictions=True), **common
    )
    on_the_fly = CascadeAwareTrainer(model=small, args=_args(tmp_path / "b", cascade_preset="paper"), **common)
    batch = cached.data_collator([cached.train_dataset[i] for i in range(len(rows))])
    for i, row in enumerate(rows):  # each row's predictions sit on its real (right-aligned) tokens
        expected = large(input_ids=torch.tensor([row])).logits.argmax(-1)[0]
        assert torch.equal(batch["large_predictions"][i, -len(row) :], expected)
        assert (batch["large_predictions"][i, : -len(row)] == -100).all()
    plain_batch = on_the_fly.data_collator([data[i] for i in range(len(rows))])
    assert "large_predictions" not in plain_batch
    with torch.no_grad():
        loss_cached = cached.compute_loss(small, batch)
        loss_fly = on_the_fly.compute_loss(small, plain_batch)
    torch.testing.assert_close(loss_cached, loss_fly)


def test_precomputed_predictions_without_attention_mask_need_equal_lengths(tmp_path):
    small, large = tiny_pair("llama")

    def collate_without_mask(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.tensor([[0] * (width - len(f["input_ids"])) + list(f["input_ids"]) for f in features])
        return {"input_ids": ids, "labels": ids.masked_fill(ids == 0, -100)}

    data = Dataset.from_dict({"input_ids": [[5, 9, 14, 3], [7, 8]]})
    trainer = CascadeAwareTrainer(
        model=small,
        args=_args(tmp_path, cascade_preset="paper", precompute_large_predictions=True),
        large_model=large,
        train_dataset=data,
        data_collator=collate_without_mask,
    )
    with pytest.raises(ValueError, match="attention_mask"):
        trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    equal = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[0]])
    assert torch.equal(
        equal["large_predictions"][1], large(input_ids=torch.tensor([[5, 9, 14, 3]])).logits.argmax(-1)[0]
    )
