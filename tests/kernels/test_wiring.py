"""The fused loss wired into training: `patch_level_loss(use_fused_loss=True)` equals the logits path (loss and
gradients), and a `PatchTrainer` run with `use_fused_loss=True` (patch then token stage) logs the same losses as
with `use_fused_loss=False`."""

import pytest
import torch
from datasets import Dataset

from hf_effitrain.methods.patch.config import PatchTrainingArguments
from hf_effitrain.methods.patch.loss import patch_level_loss
from hf_effitrain.methods.patch.trainer import PatchTrainer
from tests.testing_utils import TINY_VOCAB, tiny_model


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("patch_size", [1, 4])
def test_patch_level_loss_fused_equals_logits_path(architecture, patch_size):
    input_ids = torch.randint(0, TINY_VOCAB, (2, 4 * patch_size), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -patch_size - 1 :] = 0  # padding at the end of one row
    results = []
    for fused in (False, True):
        model = tiny_model(architecture).train()
        loss = patch_level_loss(model, input_ids, patch_size, attention_mask, use_fused_loss=fused)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for fused_grad, logits_grad in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(fused_grad, logits_grad, atol=1e-6, rtol=1e-4)


def _train_losses(tmp_path, use_fused_loss):
    ids = torch.randint(0, TINY_VOCAB, (32, 8), generator=torch.Generator().manual_seed(0))
    args = PatchTrainingArguments(
        output_dir=str(tmp_path), patch_size=4, patch_fraction=0.5, max_steps=6, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, use_fused_loss=use_fused_loss,
    )  # fmt: skip
    train = Dataset.from_dict({"input_ids": ids.tolist()})
    trainer = PatchTrainer(model=tiny_model("llama").train(), args=args, train_dataset=train)
    trainer.train()
    return [(row["patch_stage"], row["loss"]) for row in trainer.state.log_history if "loss" in row]


def _counting(module, name, monkeypatch):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


def test_patch_trainer_with_fused_loss_logs_the_same_losses(tmp_path, monkeypatch):
    import hf_effitrain.methods.patch.loss as patch_loss_module
    import hf_effitrain.methods.patch.trainer as patch_trainer_module

    patch_calls = _counting(patch_loss_module, "fused_linear_cross_entropy", monkeypatch)
    token_calls = _counting(patch_trainer_module, "fused_causal_lm_loss", monkeypatch)
    fused = _train_losses(tmp_path / "fused", True)
    assert patch_calls and token_calls  # both stages went through the fused loss
    patch_calls.clear(), token_calls.clear()
    stock = _train_losses(tmp_path / "stock", False)
    assert not patch_calls and not token_calls
    assert {stage for stage, _ in fused} == {0, 1}  # a patch stage, then a token stage
    assert [stage for stage, _ in fused] == [stage for stage, _ in stock]
    assert [loss for _, loss in fused] == pytest.approx([loss for _, loss in stock], rel=1e-4)


@pytest.mark.parametrize("preset", ["paper", "standard", "defer_aware"])
def test_cascade_trainer_fused_loss_equals_logits_path(tmp_path, preset, monkeypatch):
    from transformers import default_data_collator

    import hf_effitrain.methods.cascade.trainer as cascade_trainer_module
    from hf_effitrain.methods.cascade.config import CascadeAwareTrainingArguments

    small, large = tiny_model("llama", seed=0), tiny_model("llama", seed=1, hidden_size=64, intermediate_size=128)
    ids = torch.randint(3, TINY_VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    batch = default_data_collator([{"input_ids": i, "labels": l} for i, l in zip(ids.tolist(), labels.tolist())])
    calls = _counting(cascade_trainer_module, "lm_head_hidden_states", monkeypatch)
    results = []
    for fused in (True, False):
        args = CascadeAwareTrainingArguments(
            output_dir=str(tmp_path), cascade_preset=preset, use_fused_loss=fused, report_to=[], use_cpu=True
        )
        trainer = cascade_trainer_module.CascadeAwareTrainer(model=small.train(), args=args, large_model=large)
        small.zero_grad()
        loss = trainer.compute_loss(small, dict(batch), num_items_in_batch=torch.tensor(30))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in small.parameters()]))
        assert len(calls) == 1  # only the fused run skipped the LM head
    torch.testing.assert_close(results[0][0], results[1][0])
    for fused_grad, logits_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fused_grad, logits_grad, atol=1e-6, rtol=1e-4)
