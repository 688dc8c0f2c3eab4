"""`PatchTrainer`: stage switch by tokens, optimizer/scheduler reset, resume in either stage, stock equivalence, LoRA."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_effitrain import PatchTrainer, PatchTrainingArguments
from hf_effitrain.training.patch_data import StagedBlockDataset, collate_blocks
from hf_effitrain.training.patch_schedule import PatchSchedule
from hf_effitrain.training.patch_trainer import PATCH_STATE_NAME
from tests.testing_utils import TINY_VOCAB, tiny_model

BLOCK = 8
K = 4


def blocks(n, seed=0, block=BLOCK):
    ids = torch.randint(0, TINY_VOCAB, (n, block), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist()})


def patch_args(tmp_path, **overrides):
    # global batch 2 x 2 = 4 blocks; budget 24 token-level steps -> 4 patch steps (16 steps' tokens) + 8 token steps
    values = dict(
        output_dir=str(tmp_path), patch_size=K, patch_fraction=2 / 3, max_steps=24, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-3, lr_scheduler_type="linear", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    values.update(overrides)
    return PatchTrainingArguments(**values)


def make_trainer(tmp_path, model=None, train=None, callbacks=(), **overrides):
    return PatchTrainer(
        model=model if model is not None else tiny_model("llama").train(),
        args=patch_args(tmp_path, **overrides),
        train_dataset=train if train is not None else blocks(64),
        eval_dataset=blocks(8, seed=1),
        callbacks=list(callbacks),
    )


class Recorder(TrainerCallback):
    """Per optimizer step: learning rate used, optimizer step count of one parameter, scheduler position."""

    def __init__(self):
        self.rows = []

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        param = next(p for g in optimizer.param_groups for p in g["params"])
        step = optimizer.state[param]["step"]
        self.rows.append((state.global_step, float(step), lr_scheduler.last_epoch))


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def test_schedule_splits_the_token_budget():
    s = PatchSchedule.plan(patch_size=4, patch_fraction=2 / 3, block_size=8, global_batch=4, budget_steps=24)
    assert (s.patch_steps, s.token_steps, s.total_steps) == (4, 8, 12)
    assert s.budget_tokens == 24 * 4 * 8 and s.tokens_after(12) == s.budget_tokens
    assert s.tokens_after(4) == round(2 / 3 * s.budget_tokens)
    assert [s.stage_of_next_step(i) for i in (0, 3, 4)] == ["patch", "patch", "token"]
    only_patch = PatchSchedule.plan(patch_size=4, patch_fraction=1.0, block_size=8, global_batch=4, budget_steps=24)
    assert (only_patch.patch_steps, only_patch.token_steps) == (6, 0)
    with pytest.raises(ValueError, match="less than one patch-level step"):
        PatchSchedule.plan(patch_size=4, patch_fraction=0.1, block_size=8, global_batch=4, budget_steps=8)


def test_stream_gives_each_block_once_per_pass_and_patches_of_consecutive_blocks():
    data = blocks(16)
    run = StagedBlockDataset(data, patch_size=4, num_patch_items=2, num_token_items=8, seed=3)
    rows = {tuple(r) for r in data["input_ids"]}
    patch_rows = [run[i]["input_ids"].view(4, BLOCK) for i in range(2)]
    index = {tuple(r): i for i, r in enumerate(data["input_ids"])}
    for seq in patch_rows:  # K consecutive dataset blocks, in order
        ids = [index[tuple(r.tolist())] for r in seq]
        assert ids == list(range(ids[0], ids[0] + 4)) and ids[0] % 4 == 0
    token_rows = [tuple(run[i]["input_ids"].tolist()) for i in range(2, 10)]
    seen = [tuple(r.tolist()) for seq in patch_rows for r in seq] + token_rows
    assert len(set(seen)) == 16 and set(seen) == rows  # first pass: every block exactly once, stages disjoint


def test_switch_happens_at_the_right_token_count(tmp_path):
    shapes = []

    def recording_collator(features):
        batch = collate_blocks(features)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    trainer = make_trainer(tmp_path)
    trainer.data_collator = recording_collator
    trainer.train()
    s = trainer.patch_schedule
    assert trainer.state.global_step == 12 == s.total_steps
    # micro-batches: 4 patch steps x 2 of (2, K*T), then 8 token steps x 2 of (2, T)
    assert shapes == [(2, K * BLOCK)] * 8 + [(2, BLOCK)] * 16
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["patch_stage"] for r in logs] == [1.0] * 4 + [0.0] * 8
    assert logs[3]["train_tokens"] == 2 / 3 * s.budget_tokens == 512
    assert logs[-1]["train_tokens"] == s.budget_tokens == 24 * 4 * BLOCK
    flops = trainer.state.log_history[-1]["train_flops"]
    assert flops == pytest.approx(trainer.state.total_flos) and flops == pytest.approx(12 * 4 * BLOCK * s.flops_per_position)


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_and_scheduler_reset_as_configured(tmp_path, reset):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder], patch_reset_optimizer=reset)
    trainer.train()
    adam_steps = [row[1] for row in recorder.rows]
    sched_steps = [row[2] for row in recorder.rows]
    lrs = [r["learning_rate"] for r in trainer.state.log_history if "loss" in r]
    if reset:
        # the switch at the end of step 4 clears the Adam state and restarts the schedule for the 8 token steps
        assert adam_steps == [1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 8]
        assert sched_steps == [1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 8]
        assert lrs[0] == lrs[4] == pytest.approx(1e-3)  # both linear schedules start at the peak (no warmup)
        assert lrs[3] == pytest.approx(1e-3 * 1 / 4)  # patch stage decays over its own 4 steps
    else:
        assert adam_steps == list(range(1, 13)) and sched_steps == list(range(1, 13))
        assert lrs == pytest.approx([1e-3 * (12 - i) / 12 for i in range(12)])


def test_patch_size_one_trains_exactly_like_the_stock_trainer(tmp_path):
    def params_after(trainer_cls, args_cls, **extra):
        torch.manual_seed(0)
        model = tiny_model("llama").train()
        args = args_cls(
            output_dir=str(tmp_path / trainer_cls.__name__), max_steps=5, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", seed=0,
            disable_tqdm=True, **extra,
        )
        trainer = trainer_cls(model=model, args=args, train_dataset=blocks(64), data_collator=collate_blocks)
        trainer.train()
        return [p.detach().clone() for p in model.parameters()], [r.get("loss") for r in trainer.state.log_history]

    stock_params, stock_losses = params_after(Trainer, TrainingArguments)
    for extra in ({}, {"patch_size": 4, "patch_fraction": 0.0}):
        params, losses = params_after(PatchTrainer, PatchTrainingArguments, **extra)
        assert losses == stock_losses
        for a, b in zip(params, stock_params):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _final_params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("stop_at, stage", [(2, "patch"), (6, "token")])
def test_resume_in_either_stage(tmp_path, stop_at, stage):
    full = make_trainer(tmp_path / "full")
    full.train()
    interrupted = make_trainer(tmp_path / "run", callbacks=[StopAt(stop_at)])
    interrupted.train()
    checkpoint = tmp_path / "run" / f"checkpoint-{stop_at}"
    record = json.loads((checkpoint / PATCH_STATE_NAME).read_text())
    assert record["stage"] == stage and record["global_step"] == stop_at
    assert record["tokens_consumed"] == interrupted.patch_schedule.tokens_after(stop_at)

    resumed = make_trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 12
    assert resumed.state.log_history[-1]["train_tokens"] == full.patch_schedule.budget_tokens
    resumed_logs = [r for r in resumed.state.log_history if "loss" in r and r["step"] > stop_at]
    assert [r["patch_stage"] for r in resumed_logs] == [float(s <= 4) for s in range(stop_at + 1, 13)]
    for name, value in _final_params(full).items():
        torch.testing.assert_close(_final_params(resumed)[name], value, rtol=1e-5, atol=1e-6)


def test_resume_with_another_schedule_is_refused(tmp_path):
    make_trainer(tmp_path, callbacks=[StopAt(2)]).train()
    other = make_trainer(tmp_path, patch_fraction=0.5)
    with pytest.raises(ValueError, match="patch-level schedule differs"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_eval_reports_token_loss_in_both_stages_and_patch_loss_in_the_patch_stage(tmp_path):
    trainer = make_trainer(tmp_path, eval_strategy="steps", eval_steps=2)
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    patch_evals = [r for r in trainer.state.log_history if "eval_patch_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in patch_evals] == [2, 4]
    assert all(r["patch_stage"] == 1.0 for r in patch_evals)


def test_lora_model_trains_through_both_stages(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model=model)
    trainer.train()
    assert trainer.state.global_step == 12
    after = dict(model.named_parameters())
    lora_changed = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n])]
    frozen_changed = [n for n in before if "lora_" not in n and not torch.equal(before[n], after[n])]
    assert lora_changed and not frozen_changed


def test_epoch_budget_is_translated_into_tokens(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=-1, num_train_epochs=1.5)
    trainer.train()
    s = trainer.patch_schedule
    assert s.budget_steps == int(1.5 * 64 // 4) == 24 and trainer.state.global_step == s.total_steps == 12


# ---- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"patch_size": 0}, ValueError, "patch_size must be >= 1"),
        ({"patch_size": 2.5}, TypeError, "patch_size must be an int"),
        ({"patch_fraction": 1.5}, ValueError, r"patch_fraction must be in \[0, 1\]"),
        ({"patch_fraction": -0.1}, ValueError, r"patch_fraction must be in \[0, 1\]"),
        ({"patch_size": 1, "patch_fraction": 0.5}, ValueError, "needs patch_size >= 2"),
    ],
)
def test_bad_arguments(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        patch_args(tmp_path, **overrides)


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="needs PatchTrainingArguments"):
        PatchTrainer(model=tiny_model("llama"), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_model_without_lm_head_is_refused(tmp_path):
    from transformers import AutoModel

    from hf_effitrain.models.presets import build_config

    with pytest.raises(ValueError, match="no LM head"):
        make_trainer(tmp_path, model=AutoModel.from_config(build_config("tiny", "llama", vocab_size=TINY_VOCAB)))


@pytest.mark.parametrize(
    "train, error, match",
    [
        (Dataset.from_dict({"input_ids": [[1, 2, 3]] * 40 + [[1, 2]] * 24}), ValueError, "every row must be one block"),
        (blocks(64, block=1), ValueError, "block_size must be >= 2"),
        (blocks(3), ValueError, "fewer than patch_size=4"),
    ],
)
def test_data_that_does_not_fit(tmp_path, train, error, match):
    with pytest.raises(error, match=match):
        make_trainer(tmp_path, train=train).train()


def test_iterable_dataset_is_refused(tmp_path):
    stream = blocks(64).to_iterable_dataset()
    with pytest.raises(TypeError, match="map-style dataset"):
        make_trainer(tmp_path, train=stream).train()


def test_budget_without_a_patch_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="less than one patch-level step"):
        make_trainer(tmp_path, max_steps=3).train()


def test_named_eval_sets_each_get_token_and_patch_loss(tmp_path):
    trainer = PatchTrainer(
        model=tiny_model("llama").train(), args=patch_args(tmp_path, eval_strategy="steps", eval_steps=2),
        train_dataset=blocks(64), eval_dataset={"code": blocks(8, seed=1), "docs": blocks(8, seed=2)},
    )
    trainer.train()
    logged = set().union(*(r.keys() for r in trainer.state.log_history))
    assert {"eval_code_loss", "eval_docs_loss", "eval_code_patch_loss", "eval_docs_patch_loss"} <= logged


@pytest.mark.parametrize("strategy", ["eval_strategy", "save_strategy", "logging_strategy"])
def test_epoch_strategies_are_refused_with_patch_training(tmp_path, strategy):
    with pytest.raises(ValueError, match=f"{strategy}=epoch is not supported with patch-level training"):
        patch_args(tmp_path, **{strategy: "epoch"})
    assert patch_args(tmp_path, patch_fraction=0.0, **{strategy: "epoch"}).patch_training_enabled is False  # stock run: fine


def test_resume_without_data_skip_is_refused(tmp_path):
    make_trainer(tmp_path, callbacks=[StopAt(6)]).train()
    with pytest.raises(ValueError, match="ignore_data_skip=True cannot resume patch-level training"):
        make_trainer(tmp_path, ignore_data_skip=True).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_a_scheduler_passed_by_the_user_is_kept_at_the_switch(tmp_path):
    model = tiny_model("llama").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    recorder = Recorder()
    trainer = PatchTrainer(
        model=model, args=patch_args(tmp_path), train_dataset=blocks(64), optimizers=(optimizer, constant), callbacks=[recorder],
    )
    trainer.train()
    assert trainer.lr_scheduler is constant
    assert [r["learning_rate"] for r in trainer.state.log_history if "loss" in r] == [1e-3] * 12
    assert [row[1] for row in recorder.rows] == [1.0, 2.0, 3.0, 4.0, *range(1, 9)]  # optimizer state still restarts


def test_stock_run_on_unequal_rows_logs_no_token_accounting(tmp_path):
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8 + [[1, 2]] * 8})
    args = patch_args(tmp_path, patch_fraction=0.0, max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=1)
    collate = lambda batch: {"input_ids": torch.tensor([r["input_ids"] for r in batch]), "labels": torch.tensor([r["input_ids"] for r in batch])}
    trainer = PatchTrainer(model=tiny_model("llama").train(), args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    assert trainer.patch_schedule is None
    assert not any("train_tokens" in r for r in trainer.state.log_history)
