"""The one job runner behind `effitrain pretrain`, `sft` and `cascade-train`: train (resuming from the last complete
checkpoint), save, evaluate, log, and export Hub-ready.

Each method's job function loads its model and data and builds its trainer; everything after that is the same for
every method and lives here, so that every job resumes, reports and exports (model card, `custom_generate/`) alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from .resume import resolve_resume_checkpoint, train_or_restore

logger = logging.getLogger(__name__)

__all__ = ["ExportPlan", "run_training_job"]


def _unchanged(model: PreTrainedModel) -> PreTrainedModel:
    return model


@dataclass
class ExportPlan:
    """Where and how a job exports its trained model (through `hf_effitrain.export_pretrained`).

    Args:
        export_dir (`str` or `Path`): the export folder.
        tokenizer (`PreTrainedTokenizerBase`): saved next to the weights.
        model_card (`Callable[[dict], dict]`): the job's final metrics -> the model card fields (`method`,
            `hyperparameters`, `data`, `results`) that `export_pretrained` writes.
        overwrite (`bool`, *optional*, defaults to `False`): allow a non-empty `export_dir`.
        model_to_export (`Callable`, *optional*): the trained model (peft adapters already merged) -> the model to
            export, e.g. the cascade built around a trained small model.
    """

    export_dir: str | Path
    tokenizer: PreTrainedTokenizerBase
    model_card: Callable[[dict[str, Any]], dict[str, Any]]
    overwrite: bool = False
    model_to_export: Callable[[PreTrainedModel], PreTrainedModel] = field(default=_unchanged)


def run_training_job(trainer: Trainer, export: ExportPlan | None = None) -> dict[str, Any]:
    """Train `trainer` (from `args.resume_from_checkpoint`, `"latest"` = the newest complete checkpoint), save it
    (safetensors), evaluate it when it has an eval set, log and save the metrics, and export on the main process.

    Returns:
        `{"output_dir", "global_step", "metrics"}`, plus `"export_dir"` when `export` is given.
    """
    result = train_or_restore(trainer, resolve_resume_checkpoint(trainer.args))
    trainer.save_model()  # safetensors: the only format transformers 5 writes
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    summary: dict[str, Any] = {
        "output_dir": trainer.args.output_dir,
        "global_step": trainer.state.global_step,
        "metrics": metrics,
    }
    if export is not None and trainer.is_world_process_zero():
        summary["export_dir"] = str(_export(trainer.model, export, metrics))
    return summary


def _export(model: PreTrainedModel, plan: ExportPlan, metrics: dict[str, Any]) -> Path:
    from hf_effitrain.export import export_pretrained

    if hasattr(model, "merge_and_unload"):  # a peft model ships merged weights
        model = model.merge_and_unload()
    model = plan.model_to_export(model)
    return export_pretrained(
        model, plan.export_dir, tokenizer=plan.tokenizer, model_card=plan.model_card(metrics), overwrite=plan.overwrite
    )
