"""Resume a `Trainer` run from its last complete checkpoint, without training past the end.

`Trainer.train(resume_from_checkpoint=...)` on a checkpoint that already reached `max_steps` runs one more optimizer
step (checked with transformers 5.20.2, 5.22.2 and 5.24.0: the step loop tests for the end only after a step), so a
job killed between its last checkpoint and its export would finish with other weights than an uninterrupted run.
`train_or_restore` loads such a checkpoint's weights and state instead of training.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

logger = logging.getLogger(__name__)

__all__ = ["last_complete_checkpoint", "resolve_resume_checkpoint", "train_or_restore"]


def _finished_state(checkpoint: str | None, max_steps: int) -> TrainerState | None:
    if checkpoint is None or max_steps <= 0:
        return None
    state_file = os.path.join(checkpoint, "trainer_state.json")
    state = TrainerState.load_from_json(state_file) if os.path.isfile(state_file) else None
    return state if state is not None and state.global_step >= max_steps else None


def train_or_restore(trainer: Trainer, checkpoint: str | None) -> TrainOutput:
    """`trainer.train(resume_from_checkpoint=checkpoint)`, or, when `checkpoint` already holds the last of
    `max_steps` steps, its weights and trainer state loaded into `trainer` (no further step).

    Returns:
        The `TrainOutput` of the training, or one with the checkpoint's step and no new metrics.
    """
    state = _finished_state(checkpoint, trainer.args.max_steps)
    if state is None:
        return trainer.train(resume_from_checkpoint=checkpoint)
    logger.info(
        "%s already holds all %d steps: loading it instead of training further.", checkpoint, trainer.args.max_steps
    )
    trainer._load_from_checkpoint(checkpoint)  # weights (plain, sharded or peft adapters) exactly as train() would
    trainer.state = state
    return TrainOutput(state.global_step, 0.0, {})


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that holds `trainer_state.json` and safetensors weights.

    `Trainer` writes a checkpoint folder in place, so a run killed while saving leaves a newest folder without its
    state or weights; transformers' `get_last_checkpoint` goes by folder names only. Skipped folders are logged.
    """
    folders = [
        p
        for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()
    ]
    for candidate in sorted(folders, key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True):
        if (candidate / "trainer_state.json").is_file() and any(candidate.glob("*.safetensors")):
            return str(candidate)
        logger.warning("Skipping incomplete checkpoint %s (no trainer_state.json or safetensors weights).", candidate)
    return None


def resolve_resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint latest` picks the newest complete checkpoint in `output_dir` (None when there is none)."""
    value = training_args.resume_from_checkpoint
    if value in (None, ""):
        return None
    if value == "latest":
        found = last_complete_checkpoint(training_args.output_dir)
        if found is None:
            logger.warning("No checkpoint found in %s: starting from scratch.", training_args.output_dir)
        return found
    if not os.path.isdir(value):
        raise ValueError(f"resume_from_checkpoint {value!r} is not a folder; give a checkpoint folder or 'latest'.")
    return value
