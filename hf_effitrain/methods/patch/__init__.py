"""Patch-level training (Shao et al., 2024): pre-train on the mean of K token embeddings predicting the next K
tokens, then finish at token level."""

from .config import EQUAL_POSITIONS, EQUAL_TOKENS, PATCH_BATCHINGS, PatchTrainingArguments
from .job import PretrainArguments, run_pretrain
from .loss import patch_embeddings, patch_level_loss, patch_targets
from .schedule import PatchSchedule, training_flops_per_position
from .trainer import PatchTrainer

__all__ = [
    "EQUAL_POSITIONS",
    "EQUAL_TOKENS",
    "PATCH_BATCHINGS",
    "PatchSchedule",
    "PatchTrainer",
    "PatchTrainingArguments",
    "PretrainArguments",
    "patch_embeddings",
    "patch_level_loss",
    "patch_targets",
    "run_pretrain",
    "training_flops_per_position",
]
