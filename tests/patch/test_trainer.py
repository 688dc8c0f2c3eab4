"""`PatchTrainer`: stage switch by tokens, both batchings, optimizer/scheduler reset and warmup per stage, resume in
either stage, stock equivalence, LoRA."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_effitrain import PatchTrainer, PatchTrainingArguments
from hf_effitrain.methods.patch.data import MicroBatchDataset, StagedBlockDataset, collate_blocks
from hf_effitrain.methods.patch.schedule import PatchSchedule
from hf_effitrain.methods.patch.trainer import PATCH_STATE_NAME
from tests.testing_utils import TINY_VOCAB, tiny_model

BLOCK = 8
K = 4


def blocks(n, seed=0, block=BLOCK):
    ids = torch.randint(0, TINY_VOCAB, (n, block), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist()})


# the default, equal-tokens batching: global batch 4 x 2 = 8 blocks (64 tokens per optimizer step in both stages);
# 12 steps -> 8 patch steps (micro-batches of 1 sequence of K*T tokens) + 4 token steps (micro-batches of 4 blocks)
EQUAL_TOKENS_STEPS = (8, 4)
# the equal-positions batching: global batch 2 x 2 = 4 blocks; budget 24 token-level steps -> 4 patch steps
# (16 steps' tokens, micro-batches of 2 sequences of K*T tokens) + 8 token steps
EQUAL_POSITIONS = dict(patch_batching="equal_positions", per_device_train_batch_size=2, max_steps=24)


def patch_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        patch_size=K,
        patch_fraction=2 / 3,
        max_steps=12,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
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
    s = PatchSchedule.plan(patch_size=4, patch_fraction=2 / 3, block_size=8, global_batch=8, budget_steps=12)
    assert s.batching == "equal_tokens" and (s.patch_steps, s.token_steps, s.total_steps) == (8, 4, 12)
    assert s.patch_sequences_per_step == 2 and s.patch_step_cost == 1
    assert s.budget_tokens == 12 * 8 * 8 and s.tokens_after(12) == s.budget_tokens
    assert [s.tokens_after(i) for i in range(13)] == [i * 64 for i in range(13)]  # the same tokens every step
    assert s.positions_after(8) == 8 * 16 and s.positions_after(12) == 8 * 16 + 4 * 64  # 1/K positions per patch step
    assert [s.stage_of_next_step(i) for i in (0, 7, 8)] == ["patch", "patch", "token"]
    old = PatchSchedule.plan(
        patch_size=4, patch_fraction=2 / 3, block_size=8, global_batch=4, budget_steps=24, batching="equal_positions"
    )
    assert (old.patch_steps, old.token_steps, old.total_steps) == (4, 8, 12)
    assert old.budget_tokens == 24 * 4 * 8 and old.tokens_after(12) == old.budget_tokens
    assert old.tokens_after(4) == round(2 / 3 * old.budget_tokens) and old.positions_after(4) == 4 * 32
    only_patch = PatchSchedule.plan(patch_size=4, patch_fraction=1.0, block_size=8, global_batch=4, budget_steps=24)
    assert (only_patch.patch_steps, only_patch.token_steps) == (24, 0)
    with pytest.raises(ValueError, match="less than one patch-level step"):
        PatchSchedule.plan(
            patch_size=4, patch_fraction=0.1, block_size=8, global_batch=4, budget_steps=8, batching="equal_positions"
        )
    with pytest.raises(ValueError, match="less than one patch-level step"):
        PatchSchedule.plan(patch_size=4, patch_fraction=0.1, block_size=8, global_batch=4, budget_steps=4)
    with pytest.raises(ValueError, match=r"global batch \(6 sequences\) to be a multiple of patch_size=4"):
        PatchSchedule.plan(patch_size=4, patch_fraction=0.5, block_size=8, global_batch=6, budget_steps=8)
    with pytest.raises(
        ValueError, match=r"batching must be one of \['equal_tokens', 'equal_positions'\], got 'tokens'"
    ):
        PatchSchedule.plan(
            patch_size=4, patch_fraction=0.5, block_size=8, global_batch=8, budget_steps=8, batching="tokens"
        )


def test_warmup_in_steps_counts_tokens():
    new = PatchSchedule.plan(patch_size=4, patch_fraction=2 / 3, block_size=8, global_batch=8, budget_steps=12)
    assert [new.steps_for_budget(w) for w in (1, 5, 8, 10)] == [1, 5, 8, 10]
    old = PatchSchedule.plan(
        patch_size=4, patch_fraction=2 / 3, block_size=8, global_batch=4, budget_steps=24, batching="equal_positions"
    )
    # a patch step holds 4 token steps' worth of tokens: 5 steps' worth = 2 patch steps; past 16, one per token step
    assert [old.steps_for_budget(w) for w in (1, 4, 5, 16, 18)] == [1, 1, 2, 4, 6]
    assert old.steps_for_budget(3, start_step=old.patch_steps) == 3  # the token stage's own warmup


def test_legacy_schedule_record_reads_as_equal_positions():
    old = PatchSchedule.plan(
        patch_size=4, patch_fraction=2 / 3, block_size=8, global_batch=4, budget_steps=24, batching="equal_positions"
    )
    record = {k: v for k, v in old.to_dict().items() if k != "batching"}  # a checkpoint written before batching existed
    assert old.mismatches(record) == []
    new = PatchSchedule.plan(patch_size=4, patch_fraction=2 / 3, block_size=8, global_batch=4, budget_steps=24)
    assert "batching: checkpoint 'equal_positions', now 'equal_tokens'" in new.mismatches(record)


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


def test_micro_batches_follow_the_stage():
    run = StagedBlockDataset(blocks(16), patch_size=4, num_patch_items=2, num_token_items=8, seed=3)
    micro = MicroBatchDataset(run, patch_batch=1, token_batch=4, collator=collate_blocks)
    assert len(micro) == 4 and [list(micro.sequence_indices(j)) for j in range(4)] == [
        [0],
        [1],
        [2, 3, 4, 5],
        [6, 7, 8, 9],
    ]
    assert micro[0]["input_ids"].shape == (1, 4 * BLOCK) and micro[3]["input_ids"].shape == (4, BLOCK)
    torch.testing.assert_close(micro[3]["input_ids"][1], run[7]["input_ids"])
    with pytest.raises(ValueError, match="token stage's 8 sequences do not split into micro-batches of 3"):
        MicroBatchDataset(run, patch_batch=1, token_batch=3, collator=collate_blocks)


def _recording_collator(shapes):
    def collate(features):
        batch = collate_blocks(features)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    return collate


def _train_logs(trainer):
    return [r for r in trainer.state.log_history if "loss" in r]


def test_equal_tokens_default_keeps_tokens_per_step_and_counts_max_steps(tmp_path):
    shapes = []
    trainer = make_trainer(tmp_path)
    trainer.data_collator = _recording_collator(shapes)
    assert trainer.args.patch_batching == "equal_tokens"
    trainer.train()
    s = trainer.patch_schedule
    assert trainer.state.global_step == 12 == s.total_steps == trainer.args.max_steps
    assert (s.patch_steps, s.token_steps) == EQUAL_TOKENS_STEPS
    # micro-batches: 8 patch steps x 2 of (1, K*T), then 4 token steps x 2 of (4, T): the same 32 tokens each,
    # a quarter of the positions in the patch stage (memory never above the token stage's)
    assert shapes == [(1, K * BLOCK)] * 16 + [(4, BLOCK)] * 8
    logs = _train_logs(trainer)
    assert [r["patch_stage"] for r in logs] == [1.0] * 8 + [0.0] * 4
    tokens = [0.0] + [r["train_tokens"] for r in logs]
    assert [b - a for a, b in zip(tokens, tokens[1:])] == [8.0 * BLOCK] * 12  # 8 blocks of T tokens in every step
    assert logs[7]["train_tokens"] == 2 / 3 * s.budget_tokens == 512 and logs[-1]["train_tokens"] == 12 * 8 * BLOCK
    flops = trainer.state.log_history[-1]["train_flops"]
    positions = 8 * 2 * BLOCK + 4 * 8 * BLOCK  # patch steps: 2 sequences of T positions; token steps: 8 blocks
    assert flops == pytest.approx(trainer.state.total_flos) and flops == pytest.approx(positions * s.flops_per_position)


def test_equal_positions_option_keeps_the_old_batching(tmp_path):
    shapes = []
    trainer = make_trainer(tmp_path, **EQUAL_POSITIONS)
    trainer.data_collator = _recording_collator(shapes)
    trainer.train()
    s = trainer.patch_schedule
    assert trainer.state.global_step == 12 == s.total_steps and (s.patch_steps, s.token_steps) == (4, 8)
    # micro-batches: 4 patch steps x 2 of (2, K*T), then 8 token steps x 2 of (2, T)
    assert shapes == [(2, K * BLOCK)] * 8 + [(2, BLOCK)] * 16
    logs = _train_logs(trainer)
    assert [r["patch_stage"] for r in logs] == [1.0] * 4 + [0.0] * 8
    assert logs[3]["train_tokens"] == 2 / 3 * s.budget_tokens == 512
    assert logs[-1]["train_tokens"] == s.budget_tokens == 24 * 4 * BLOCK
    flops = trainer.state.log_history[-1]["train_flops"]
    assert flops == pytest.approx(trainer.state.total_flos) and flops == pytest.approx(
        12 * 4 * BLOCK * s.flops_per_position
    )


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_and_scheduler_reset_as_configured(tmp_path, reset):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder], patch_reset_optimizer=reset)
    trainer.train()
    adam_steps = [row[1] for row in recorder.rows]
    sched_steps = [row[2] for row in recorder.rows]
    lrs = [r["learning_rate"] for r in _train_logs(trainer)]
    if reset:
        # the switch at the end of step 8 clears the Adam state; the patch schedule has decayed to its minimum and
        # a new one starts at the peak for the 4 token steps (the authors' shape)
        assert adam_steps == [*range(1, 9), 1, 2, 3, 4] and sched_steps == adam_steps
        assert lrs == pytest.approx([1e-3 * (8 - i) / 8 for i in range(8)] + [1e-3 * (4 - i) / 4 for i in range(4)])
        assert trainer.lr_scheduler.get_last_lr()[0] == 0.0  # each schedule ends at its minimum
    else:
        assert adam_steps == list(range(1, 13)) and sched_steps == list(range(1, 13))
        assert lrs == pytest.approx([1e-3 * (12 - i) / 12 for i in range(12)])


def _linear_warmup(steps, warmup):
    return [1e-3 * (i / warmup if i < warmup else (steps - i) / (steps - warmup)) for i in range(steps)]


@pytest.mark.parametrize(
    "overrides, patch_warmup, token_warmup",
    [
        ({"warmup_steps": 2}, 2, 2),  # equal tokens: the same steps in each stage (the authors: 2000 in both)
        ({"warmup_steps": 0.25}, 2, 1),  # a share of each stage's steps
        ({"warmup_steps": 4, **EQUAL_POSITIONS}, 1, 4),  # 4 steps' worth of tokens = 1 patch step of K x the tokens
    ],
)
def test_warmup_per_stage(tmp_path, overrides, patch_warmup, token_warmup):
    trainer = make_trainer(tmp_path, **overrides)
    trainer.train()
    s = trainer.patch_schedule
    lrs = [r["learning_rate"] for r in _train_logs(trainer)]
    expected = _linear_warmup(s.patch_steps, patch_warmup) + _linear_warmup(s.token_steps, token_warmup)
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_warmup_in_steps_spans_the_stages_without_reset(tmp_path):
    # one schedule over 12 steps; 8 token steps' worth of warmup = the first 2 patch steps (4 steps' worth each)
    trainer = make_trainer(tmp_path, warmup_steps=8, patch_reset_optimizer=False, **EQUAL_POSITIONS)
    trainer.train()
    assert [r["learning_rate"] for r in _train_logs(trainer)] == pytest.approx(_linear_warmup(12, 2), abs=1e-12)


def test_patch_size_one_trains_exactly_like_the_stock_trainer(tmp_path):
    def params_after(trainer_cls, args_cls, **extra):
        torch.manual_seed(0)
        model = tiny_model("llama").train()
        args = args_cls(
            output_dir=str(tmp_path / trainer_cls.__name__),
            max_steps=5,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
            **extra,
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


@pytest.mark.parametrize(
    "stop_at, stage, batching",
    [(3, "patch", {}), (10, "token", {}), (2, "patch", EQUAL_POSITIONS), (6, "token", EQUAL_POSITIONS)],
    ids=["equal_tokens-patch", "equal_tokens-token", "equal_positions-patch", "equal_positions-token"],
)
def test_resume_in_either_stage(tmp_path, stop_at, stage, batching):
    full = make_trainer(tmp_path / "full", **batching)
    full.train()
    interrupted = make_trainer(tmp_path / "run", callbacks=[StopAt(stop_at)], **batching)
    interrupted.train()
    checkpoint = tmp_path / "run" / f"checkpoint-{stop_at}"
    record = json.loads((checkpoint / PATCH_STATE_NAME).read_text())
    assert record["stage"] == stage and record["global_step"] == stop_at
    assert record["tokens_consumed"] == interrupted.patch_schedule.tokens_after(stop_at)
    assert record["schedule"]["batching"] == full.args.patch_batching

    resumed = make_trainer(tmp_path / "run", **batching)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    patch_steps = full.patch_schedule.patch_steps
    assert resumed.state.global_step == full.state.global_step == 12
    assert resumed.state.log_history[-1]["train_tokens"] == full.patch_schedule.budget_tokens
    assert resumed.state.log_history[-1]["train_flops"] == pytest.approx(full.state.log_history[-1]["train_flops"])
    resumed_logs = [r for r in _train_logs(resumed) if r["step"] > stop_at]
    assert [r["patch_stage"] for r in resumed_logs] == [float(s <= patch_steps) for s in range(stop_at + 1, 13)]
    full_lrs = [r["learning_rate"] for r in _train_logs(full) if r["step"] > stop_at]
    assert [r["learning_rate"] for r in resumed_logs] == pytest.approx(full_lrs)
    for name, value in _final_params(full).items():
        torch.testing.assert_close(_final_params(resumed)[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "other, diff",
    [
        ({"patch_fraction": 0.5}, "patch_steps"),
        ({"patch_batching": "equal_positions"}, "batching: checkpoint 'equal_tokens'"),
    ],
)
def test_resume_with_another_schedule_is_refused(tmp_path, other, diff):
    make_trainer(tmp_path, callbacks=[StopAt(2)]).train()
    with pytest.raises(ValueError, match=f"patch-level schedule differs.*{diff}"):
        make_trainer(tmp_path, **other).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_eval_reports_token_loss_in_both_stages_and_patch_loss_in_the_patch_stage(tmp_path):
    trainer = make_trainer(tmp_path, eval_strategy="steps", eval_steps=2)
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    patch_evals = [r for r in trainer.state.log_history if "eval_patch_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in patch_evals] == [2, 4, 6, 8]
    assert all(r["patch_stage"] == 1.0 for r in patch_evals)


def test_lora_model_trains_through_both_stages(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model=model)
    trainer.train()
    assert trainer.state.global_step == 12
    assert [r["patch_stage"] for r in _train_logs(trainer)] == [1.0] * 8 + [0.0] * 4
    after = dict(model.named_parameters())
    lora_changed = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n])]
    frozen_changed = [n for n in before if "lora_" not in n and not torch.equal(before[n], after[n])]
    assert lora_changed and not frozen_changed


def test_epoch_budget_is_translated_into_tokens(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=-1, num_train_epochs=1.5)
    trainer.train()
    s = trainer.patch_schedule
    assert s.budget_steps == int(1.5 * 64 // 8) == 12 and trainer.state.global_step == s.total_steps == 12
    old = make_trainer(tmp_path / "old", num_train_epochs=1.5, **{**EQUAL_POSITIONS, "max_steps": -1})
    old.train()
    assert old.patch_schedule.budget_steps == 24 and old.state.global_step == old.patch_schedule.total_steps == 12


# ---- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"patch_size": 0}, ValueError, "patch_size must be >= 1"),
        ({"patch_size": 2.5}, TypeError, "patch_size must be an int"),
        ({"patch_fraction": 1.5}, ValueError, r"patch_fraction must be in \[0, 1\]"),
        ({"patch_fraction": -0.1}, ValueError, r"patch_fraction must be in \[0, 1\]"),
        ({"patch_size": 1, "patch_fraction": 0.5}, ValueError, "needs patch_size >= 2"),
        (
            {"patch_batching": "tokens"},
            ValueError,
            r"patch_batching must be one of \['equal_tokens', 'equal_positions'\], got 'tokens'",
        ),
        ({"patch_batching": "tokens", "patch_fraction": 0.0}, ValueError, "patch_batching must be one of"),
        (
            {"per_device_train_batch_size": 6},
            ValueError,
            r"per_device_train_batch_size \(6\) to be a multiple of patch_size \(4\)",
        ),
    ],
)
def test_bad_arguments(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        patch_args(tmp_path, **overrides)


def test_batch_size_rule_applies_only_to_equal_tokens_with_a_patch_stage(tmp_path):
    assert (
        patch_args(tmp_path, per_device_train_batch_size=6, patch_batching="equal_positions").patch_batching
        == "equal_positions"
    )
    assert not patch_args(tmp_path, per_device_train_batch_size=6, patch_fraction=0.0).patch_training_enabled


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
        make_trainer(tmp_path, max_steps=3, patch_fraction=0.1).train()  # 0.3 of a step at patch level


def test_named_eval_sets_each_get_token_and_patch_loss(tmp_path):
    trainer = PatchTrainer(
        model=tiny_model("llama").train(),
        args=patch_args(tmp_path, eval_strategy="steps", eval_steps=2),
        train_dataset=blocks(64),
        eval_dataset={"code": blocks(8, seed=1), "docs": blocks(8, seed=2)},
    )
    trainer.train()
    logged = set().union(*(r.keys() for r in trainer.state.log_history))
    assert {"eval_code_loss", "eval_docs_loss", "eval_code_patch_loss", "eval_docs_patch_loss"} <= logged


@pytest.mark.parametrize("strategy", ["eval_strategy", "save_strategy", "logging_strategy"])
def test_epoch_strategies_are_refused_with_patch_training(tmp_path, strategy):
    with pytest.raises(ValueError, match=f"{strategy}=epoch is not supported with patch-level training"):
        patch_args(tmp_path, **{strategy: "epoch"})
    assert (
        patch_args(tmp_path, patch_fraction=0.0, **{strategy: "epoch"}).patch_training_enabled is False
    )  # stock run: fine


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
        model=model,
        args=patch_args(tmp_path),
        train_dataset=blocks(64),
        optimizers=(optimizer, constant),
        callbacks=[recorder],
    )
    trainer.train()
    assert trainer.lr_scheduler is constant
    assert [r["learning_rate"] for r in trainer.state.log_history if "loss" in r] == [1e-3] * 12
    assert [row[1] for row in recorder.rows] == [*range(1, 9), *range(1, 5)]  # optimizer state still restarts


def test_stock_run_on_unequal_rows_logs_no_token_accounting(tmp_path):
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8 + [[1, 2]] * 8})
    args = patch_args(
        tmp_path, patch_fraction=0.0, max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=1
    )

    def collate(batch):
        return {
            "input_ids": torch.tensor([r["input_ids"] for r in batch]),
            "labels": torch.tensor([r["input_ids"] for r in batch]),
        }

    trainer = PatchTrainer(model=tiny_model("llama").train(), args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    assert trainer.patch_schedule is None
    assert not any("train_tokens" in r for r in trainer.state.log_history)
