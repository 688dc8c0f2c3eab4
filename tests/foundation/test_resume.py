"""`train_or_restore`: resuming a finished run loads its checkpoint instead of training one step too many."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_effitrain.training.resume import train_or_restore


def _trainer(model, output_dir, max_steps):
    rows = [[1, 2, 3, 4, 5, 6, 7, 8]] * 32
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        save_steps=1,
        save_total_limit=1,
        report_to="none",
        logging_steps=1,
        use_cpu=True,
    )
    return Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}))


def _model(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def test_a_finished_checkpoint_is_restored_not_trained_further(tmp_path):
    trained = _model(0)
    _trainer(trained, tmp_path, max_steps=3).train()
    fresh = _model(1)
    trainer = _trainer(fresh, tmp_path, max_steps=3)
    result = train_or_restore(trainer, str(tmp_path / "checkpoint-3"))
    assert result.global_step == 3 and trainer.state.global_step == 3
    for name, param in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], param), name


def test_an_unfinished_checkpoint_resumes_training(tmp_path):
    _trainer(_model(0), tmp_path, max_steps=2).train()
    trainer = _trainer(_model(1), tmp_path, max_steps=4)
    assert train_or_restore(trainer, str(tmp_path / "checkpoint-2")).global_step == 4
