"""`PatchTrainer`: patch-level then token-level training of any causal LM in one `Trainer.train()` call.

Only narrow `Trainer` hooks are overridden, never the loop:

- `get_train_dataloader` lays the run out as one `StagedBlockDataset` (patch sequences of K blocks, then blocks)
  read as collated micro-batches (`MicroBatchDataset`: with equal-tokens batching a patch-stage micro-batch holds
  1/K of the sequences of a token-stage one), `set_initial_training_values` tells the loop the run's real number
  of optimizer steps;
- `compute_loss` uses `patch_level_loss` on patch-stage batches and the stock loss otherwise;
- `PatchStageCallback.on_step_end` switches stage after the patch steps, resetting optimizer state and LR schedule
  when `patch_reset_optimizer` (and `create_scheduler` gives each stage its own schedule length, with a warmup in
  steps counted in tokens);
- `_save_checkpoint` writes `patch_training_state.json` (schedule, stage, tokens consumed) next to
  `trainer_state.json`, `_load_optimizer_and_scheduler` checks it on resume;
- `log` adds stage, tokens and FLOPs to every log; `evaluate` adds the patch-level validation loss in the patch stage;
- `floating_point_ops` counts positions, not tokens, so `total_flos` is right in both stages.

With `patch_size=1` or `patch_fraction=0` none of the data, loss or optimizer hooks change anything: the run is the
stock `Trainer` run (plus the logged tokens / FLOPs when the training data are packed blocks).
"""

from __future__ import annotations

import json
import logging
import math
import os
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer, TrainerCallback, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, seed_worker

from hf_effitrain.integrations.lm_head import fused_causal_lm_loss, fused_loss_enabled

from .config import PatchTrainingArguments
from .data import GroupedBlockDataset, MicroBatchDataset, StagedBlockDataset, block_size_of, collate_blocks, single_item
from .loss import check_causal_lm, patch_level_loss
from .schedule import PATCH, PatchSchedule, training_flops_per_position

__all__ = ["PATCH_STATE_NAME", "PatchStageCallback", "PatchTrainer"]

logger = logging.getLogger(__name__)

PATCH_STATE_NAME = "patch_training_state.json"


def _rows_look_like_blocks(dataset: Any, block_size: int, samples: int = 64) -> bool:
    """Whether evenly spaced rows of `dataset` all hold `block_size` tokens (a cheap check for a stock run, whose
    tokens / FLOPs logging assumes packed blocks; a patch run checks every row it reads)."""
    indices = sorted({round(i * (len(dataset) - 1) / max(samples - 1, 1)) for i in range(samples)})
    return all(len(dataset[int(i)]["input_ids"]) == block_size for i in indices)


class PatchStageCallback(TrainerCallback):
    """Switches its trainer from the patch to the token stage at the end of the last patch-level step."""

    def __init__(self, trainer: PatchTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        schedule = self.trainer.patch_schedule
        if (
            schedule is not None
            and schedule.patch_steps
            and state.global_step == schedule.patch_steps
            and schedule.token_steps
        ):
            self.trainer.enter_token_stage()
        return control


class PatchTrainer(Trainer):
    """
    `Trainer` that consumes the first `args.patch_fraction` of the token budget at patch level (K = `args.patch_size`
    token embeddings averaged per position, the next K tokens predicted by the ordinary LM head), then switches to
    token level inside the same `train()` call. Works with any `AutoModelForCausalLM`, peft models and DDP.

    `train_dataset` is ONE packed dataset of T-token blocks (`hf_effitrain.pack_dataset`); a patch-stage sequence is K
    consecutive blocks (K*T tokens, T positions), a token-stage sequence one block. `max_steps` / `num_train_epochs`
    set the TOKEN budget, i.e. what token-level training would consume. With `patch_batching="equal_tokens"` (the
    default, the authors' batching) every optimizer step consumes those `global_batch x T` tokens in both stages, so
    the run takes exactly `max_steps` steps; a patch-stage micro-batch holds `per_device_train_batch_size / K`
    sequences (the same tokens, 1/K of the positions: peak memory stays the token stage's). With
    `"equal_positions"` a patch step processes a token step's positions (K times its tokens) and the run takes fewer
    optimizer steps (see `hf_effitrain.methods.patch.schedule`). `save_steps`, `eval_steps` and `logging_steps`
    count real optimizer steps. `eval_dataset` holds T-token blocks: `eval_loss` is always the token-level loss, and in the
    patch stage `eval_patch_loss` (K consecutive validation blocks per sequence) is logged too. Without a
    `data_collator`, rows are stacked and `labels = input_ids` added.

    Example:

    >>> args = PatchTrainingArguments(output_dir="runs/p", patch_size=4, patch_fraction=2 / 3, max_steps=300)
    >>> trainer = PatchTrainer(model=model, args=args, train_dataset=blocks, eval_dataset=val_blocks)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, model=None, args: PatchTrainingArguments | None = None, data_collator=None, *pargs, **kwargs):
        if args is None:
            args = PatchTrainingArguments(output_dir="trainer_output")  # the stock Trainer's default folder
        elif not isinstance(args, PatchTrainingArguments):
            raise TypeError(f"PatchTrainer needs PatchTrainingArguments, got {type(args).__name__}.")
        super().__init__(model, args, data_collator if data_collator is not None else collate_blocks, *pargs, **kwargs)
        if self.patch_enabled:
            check_causal_lm(self.model)
        self.patch_schedule: PatchSchedule | None = None
        self._patch_eval = False
        self.add_callback(PatchStageCallback(self))

    # ---- schedule -------------------------------------------------------------------------------------------------

    @property
    def patch_enabled(self) -> bool:
        return getattr(self.args, "patch_training_enabled", False)

    @property
    def in_patch_stage(self) -> bool:
        """Whether the optimizer step being computed is a patch-level one."""
        s = self.patch_schedule
        return self.patch_enabled and s is not None and s.stage_of_next_step(self.state.global_step) == PATCH

    @property
    def loss_is_scaled_for_ga(self) -> bool | None:
        # the patch loss is a per-micro-batch mean: the Trainer divides it by the accumulation steps
        return False if self.in_patch_stage and self.model.training else None

    def _plan_schedule(self) -> PatchSchedule | None:
        """The run's schedule from the arguments and the packed training data (None when the data are not blocks)."""
        args = self.args
        try:
            block_size = block_size_of(self.train_dataset)
        except (TypeError, ValueError):
            if self.patch_enabled:
                raise
            return None  # stock run on unpacked data: nothing to plan, nothing extra to log
        if not self.patch_enabled and not _rows_look_like_blocks(self.train_dataset, block_size):
            logger.info(
                "Training rows are not equal-length blocks: no train_tokens / train_flops logging for this run."
            )
            return None
        global_batch = self.get_total_train_batch_size(args)
        if args.max_steps > 0:
            budget_steps = args.max_steps
        else:
            budget_steps = int(args.num_train_epochs * len(self.train_dataset) // global_batch)
        if not self.patch_enabled:
            budget_steps = max(budget_steps, 1)  # only used for logging: the stock loop decides the steps
        return PatchSchedule.plan(
            patch_size=args.patch_size if self.patch_enabled else 1,
            patch_fraction=args.patch_fraction if self.patch_enabled else 0.0,
            block_size=block_size,
            global_batch=global_batch,
            budget_steps=budget_steps,
            batching=args.patch_batching,
            flops_per_position=training_flops_per_position(self.model, block_size),
        )

    def enter_token_stage(self) -> None:
        """Called once the last patch-level step is done: restart optimizer state and LR schedule if configured."""
        s = self.patch_schedule
        logger.info(
            "Patch stage done after %d steps (%d tokens): token stage for %d steps.",
            s.patch_steps,
            s.tokens_after(s.patch_steps),
            s.token_steps,
        )
        if self.args.patch_reset_optimizer:
            self.optimizer.state.clear()
            if not self._created_lr_scheduler:
                logger.warning(
                    "patch_reset_optimizer: optimizer state cleared at the switch, but the LR scheduler passed in "
                    "`optimizers=` is kept as it is (only a scheduler the Trainer creates restarts per stage)."
                )
                return
            self.lr_scheduler = None
            self.create_scheduler(num_training_steps=s.token_steps, optimizer=self.optimizer)
            self.callback_handler.lr_scheduler = self.lr_scheduler

    # ---- data -----------------------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        self.patch_schedule = self._plan_schedule()
        if not self.patch_enabled:
            return super().get_train_dataloader()
        s = self.patch_schedule
        logger.info(
            "Patch-level training (%s batching): budget %d tokens (%d token-level steps); %d patch steps of %d "
            "sequences x %d x %d tokens (lambda %.4f), then %d token steps of %d sequences x %d tokens.",
            s.batching,
            s.budget_tokens,
            s.budget_steps,
            s.patch_steps,
            s.patch_sequences_per_step,
            s.patch_size,
            s.block_size,
            s.effective_fraction,
            s.token_steps,
            s.global_batch,
            s.block_size,
        )
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        run = StagedBlockDataset(
            self.train_dataset,
            s.patch_size,
            s.patch_steps * s.patch_sequences_per_step,
            s.token_steps * s.global_batch,
            seed=seed,
        )
        patch_batch = self._train_batch_size * s.patch_step_cost // s.patch_size  # B/K (equal tokens) or B
        micro = MicroBatchDataset(
            run,
            patch_batch,
            self._train_batch_size,
            self._get_collator_with_removed_columns(self.data_collator, "Training"),
        )
        return self._micro_batch_dataloader(micro)

    def _micro_batch_dataloader(self, micro: MicroBatchDataset) -> DataLoader:
        """One collated micro-batch per item, read in order (the run's order is laid out in `micro` itself), so each
        optimizer step gets its `gradient_accumulation_steps` micro-batches per process whatever their size."""
        args = self.args
        loader = DataLoader(
            micro,
            batch_size=1,
            collate_fn=single_item,
            sampler=SequentialSampler(micro),
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        return self.accelerator.prepare(loader)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        if not self.patch_enabled:
            return values
        _, _, num_examples, _, total_batch, steps_in_epoch, _ = values
        steps = self.patch_schedule.total_steps
        return 1, steps, num_examples, steps * total_batch, total_batch, steps_in_epoch, steps

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        s = self.patch_schedule
        if self.lr_scheduler is not None or not self.patch_enabled or s is None:
            return super().create_scheduler(num_training_steps, optimizer)
        start, num_training_steps = 0, s.total_steps
        if self.args.patch_reset_optimizer:
            # one schedule per stage (resuming in the token stage recreates the token stage's): the patch stage's
            # decays to its minimum at the switch, the token stage's starts over with its own warmup
            if s.stage_of_next_step(self.state.global_step) == PATCH:
                num_training_steps = s.patch_steps
            else:
                start, num_training_steps = s.patch_steps, s.token_steps
        warmup = self.args.warmup_steps
        # a share (< 1) is a share of this schedule's steps; steps (>= 1) count tokens, so with equal-positions
        # batching a patch step (K steps' worth of tokens) does not make the warmup a K times larger share
        warmup_steps = math.ceil(num_training_steps * warmup) if warmup < 1 else s.steps_for_budget(int(warmup), start)
        if warmup_steps >= num_training_steps > 0 and warmup > 0:
            logger.warning(
                "warmup_steps=%s covers all %d steps of this schedule: the learning rate never reaches its peak.",
                warmup,
                num_training_steps,
            )
        self.lr_scheduler = get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=optimizer if optimizer is not None else self.optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- loss and compute -----------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self._patch_eval or (self.in_patch_stage and model.training)):
            loss = self._fused_token_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss if loss is not None else super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = patch_level_loss(
            model,
            inputs["input_ids"],
            self.args.patch_size,
            inputs.get("attention_mask"),
            labels=inputs.get("labels"),
            use_fused_loss=self.args.use_fused_loss,
        )
        return (loss, {"loss": loss}) if return_outputs else loss

    def _fused_token_loss(self, model, inputs, return_outputs, num_items_in_batch) -> torch.Tensor | None:
        """The token stage's stock causal-LM loss through the fused linear cross-entropy (`use_fused_loss`), or None
        for the stock path (evaluation, label smoothing, a custom loss, or a head that cannot be fused)."""
        if (
            return_outputs
            or not model.training
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        ):
            return None
        if not fused_loss_enabled(self.args.use_fused_loss, model):
            return None
        num_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = fused_causal_lm_loss(model, inputs, num_items)
        if loss is not None and self.args.average_tokens_across_devices and num_items is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss
        return loss

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        if self.patch_schedule is None:
            return super().floating_point_ops(inputs)
        ids = inputs["input_ids"]
        positions = ids.numel() // (self.args.patch_size if ids.shape[-1] > self.patch_schedule.block_size else 1)
        return int(positions * self.patch_schedule.flops_per_position)

    # ---- logging and evaluation -----------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.patch_schedule is not None:
            logs.update(self.patch_schedule.progress(self.state.global_step))
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        s = self.patch_schedule
        # a dict of eval sets: the stock evaluate has called this method once per named set, patch loss included
        named_sets = isinstance(
            eval_dataset if eval_dataset is not None else self.eval_dataset, dict
        ) and not isinstance(eval_dataset, str)
        if self.patch_enabled and s is not None and s.stage_after(self.state.global_step) == PATCH and not named_sets:
            metrics.update(self._evaluate_patch_loss(eval_dataset, metric_key_prefix))
        return metrics

    def _evaluate_patch_loss(self, eval_dataset, metric_key_prefix: str) -> dict[str, float]:
        blocks = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(blocks, str):
            blocks = self.eval_dataset[blocks]
        grouped = GroupedBlockDataset(blocks, self.args.patch_size)
        if len(grouped) == 0:
            logger.warning(
                "Validation set has fewer than patch_size=%d blocks: no patch-level eval loss.", self.args.patch_size
            )
            return {}
        dataloader = self._get_dataloader(
            grouped, "Patch-level evaluation", self.args.eval_batch_size, sampler_fn=self._get_eval_sampler
        )
        self._patch_eval = True
        try:
            output = self.evaluation_loop(
                dataloader,
                "Patch-level evaluation",
                prediction_loss_only=True,
                metric_key_prefix=f"{metric_key_prefix}_patch",
            )
        finally:
            self._patch_eval = False
        metrics = {k: v for k, v in output.metrics.items() if k.endswith("_loss")}
        self.log(dict(metrics))
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        s = self.patch_schedule
        if s is None or not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        step = self.state.global_step
        record = {
            "schedule": s.to_dict(),
            "global_step": step,
            "stage": s.stage_of_next_step(step),
            "tokens_consumed": s.tokens_after(step),
            "train_flops": s.flops_after(step),
        }
        with open(os.path.join(folder, PATCH_STATE_NAME), "w") as f:
            json.dump(record, f, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.patch_enabled:
            if self.args.ignore_data_skip:
                raise ValueError(
                    "ignore_data_skip=True cannot resume patch-level training: the run is one staged sequence of "
                    "patch-level then token-level batches, so without skipping the consumed part a resumed token stage "
                    "would read patch-stage sequences. Resume with ignore_data_skip=False."
                )
            self._check_resumed_schedule(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def _check_resumed_schedule(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, PATCH_STATE_NAME)
        s, step = self.patch_schedule, self.state.global_step
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s: resuming in the %s stage from global_step %d.",
                checkpoint,
                PATCH_STATE_NAME,
                s.stage_of_next_step(step),
                step,
            )
            return
        with open(path) as f:
            record = json.load(f)
        diffs = s.mismatches(record["schedule"])
        if diffs:
            raise ValueError(
                f"Cannot resume from {checkpoint}: its patch-level schedule differs from this run's ({'; '.join(diffs)}). "
                "Resume with the same patch_size, patch_fraction, batch sizes, block size and budget."
            )
        if record["global_step"] != step or record["stage"] != s.stage_of_next_step(step):
            raise ValueError(
                f"{path} records step {record['global_step']} ({record['stage']} stage) but trainer_state.json step {step}."
            )
        logger.info(
            "Resuming in the %s stage at step %d, %d tokens consumed.", record["stage"], step, record["tokens_consumed"]
        )
