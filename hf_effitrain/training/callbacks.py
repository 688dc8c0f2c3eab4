"""Trainer callbacks shared by the package's jobs."""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = ["TimeBudgetCallback"]


class TimeBudgetCallback(TrainerCallback):
    """Stops training once `seconds` have passed and saves a checkpoint, so a job's duration does not depend on the
    machine's speed (the demo, each stage of the recipe); the run resumes from that checkpoint like any other."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            logger.info("Time budget of %.0f s reached at step %d: stopping training.", self.seconds, state.global_step)
            control.should_training_stop = True
            control.should_save = True
