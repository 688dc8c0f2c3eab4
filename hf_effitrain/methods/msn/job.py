"""The job behind `effitrain sft`: supervised fine-tuning with trl, with Make-Some-Noise input corruption by default.

Every `NoisySFTConfig` field (so every `SFTConfig` / `TrainingArguments` field, plus `--noise_length`,
`--noise_fraction`, `--noise_kind`) is an option; `--noise_length 0` trains plain SFT with the same code path.
The data is the package's code SFT set (docstring -> body from local Python source) or any prompt-completion /
conversational set from a jsonl file or a `datasets` name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from hf_effitrain.data.tokenizer import load_tokenizer

from .config import NoisySFTConfig
from .trainer import NoisySFTTrainer

logger = logging.getLogger(__name__)


@dataclass
class SftArguments:
    """Model and data options of `effitrain sft` (training options are `NoisySFTConfig`).

    Args:
        model (`str`): checkpoint folder of the pre-trained model (e.g. `effitrain pretrain`'s output or export),
            with safetensors weights (checked before any data work; pickled `.bin` weights are refused).
        tokenizer (`str`, *optional*): tokenizer folder; default: the model folder.
        dataset (`str`, *optional*, defaults to `"python"`): `python` builds the code SFT set from this
            interpreter's source (`build_code_sft_dataset`); else a jsonl file or a `datasets` name with
            prompt/completion (or messages) columns.
        scope (`str`, *optional*, defaults to `"stdlib"`): for `dataset="python"`: stdlib, site or all.
        max_files (`int`, *optional*): cap on source files for `dataset="python"`.
        max_train_samples / max_eval_samples (`int`, *optional*): take the first N rows of each split.
        export_dir (`str`, *optional*): export the fine-tuned model Hub-ready there, with the Jacobi / TR-Jacobi
            defaults in its generation config.
        overwrite_export (`bool`, *optional*, defaults to `False`): allow a non-empty `export_dir` (checked before
            training, so a long run does not end in an error).
    """

    model: str = field(metadata={"help": "Checkpoint folder of the pre-trained model."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder; default: the model folder."})
    dataset: str = field(
        default="python",
        metadata={"help": "'python' (code SFT set from local Python source), a jsonl file, or a datasets name."},
    )
    scope: str = field(default="stdlib", metadata={"help": "For --dataset python: stdlib, site or all."})
    max_files: int | None = field(default=None, metadata={"help": "For --dataset python: use at most this many files."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=256, metadata={"help": "Use the first N validation rows."})
    export_dir: str | None = field(default=None, metadata={"help": "Export the fine-tuned model Hub-ready here."})
    overwrite_export: bool = field(default=False, metadata={"help": "Allow --export_dir to be a non-empty folder."})

    def __post_init__(self) -> None:
        from hf_effitrain.export import check_export_dir, require_safetensors

        for name in ("max_train_samples", "max_eval_samples", "max_files"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {value}.")
        if self.export_dir:
            check_export_dir(self.export_dir, self.overwrite_export, "--overwrite_export")
        try:
            require_safetensors(self.model)
        except ValueError as error:
            raise ValueError(f"--model: {error}") from None


def load_sft_splits(args: SftArguments):
    """(train, validation) datasets for the run; validation is None when the source has no such split or it is empty."""
    import datasets

    if args.dataset == "python":
        try:
            from hf_effitrain.data import build_code_sft_dataset
        except ImportError as error:  # the data layer is optional for users who bring their own set
            raise ImportError(f"--dataset python needs hf_effitrain.data.build_code_sft_dataset: {error}") from error
        splits = build_code_sft_dataset("python", scope=args.scope, max_files=args.max_files)
    elif args.dataset.endswith((".jsonl", ".json")):
        if not Path(args.dataset).is_file():
            raise ValueError(f"--dataset {args.dataset!r} is not a file.")
        splits = datasets.load_dataset("json", data_files=args.dataset)
    else:
        splits = datasets.load_dataset(args.dataset)
    train = splits["train"]
    validation = splits.get("validation", splits.get("test"))
    if validation is not None and len(validation) == 0:  # trl cannot prepare an empty set; evaluate on nothing
        logger.info("The validation split of --dataset %s is empty: training without evaluation.", args.dataset)
        validation = None
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if validation is not None and args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return train, validation


def run_sft(args: SftArguments, config: NoisySFTConfig, callbacks: tuple = ()) -> dict[str, Any]:
    """Fine-tune (resuming from `--resume_from_checkpoint`), evaluate, save (safetensors) and optionally export;
    `callbacks` are extra `TrainerCallback`s (e.g. a time budget)."""
    from hf_effitrain.training.runner import ExportPlan, run_training_job

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, use_safetensors=True)
    train, validation = load_sft_splits(args)
    trainer = NoisySFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    export = None
    if args.export_dir:
        export = ExportPlan(
            args.export_dir,
            tokenizer,
            model_card=lambda metrics: sft_model_card(args, config, metrics),
            overwrite=args.overwrite_export,
            model_to_export=_with_strategy_defaults,
        )
    return run_training_job(trainer, export)


def _with_strategy_defaults(model):
    """The model with the Jacobi / TR-Jacobi defaults written into its generation config."""
    from hf_effitrain.hub.generation_jacobi import add_strategy_defaults

    add_strategy_defaults(model.generation_config)
    return model


def sft_model_card(args: SftArguments, config: NoisySFTConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """Model card fields of an SFT / MSN export: the method and its noise settings."""
    method = f"msn (noise_length={config.noise_length}, {config.noise_kind})" if config.noise_length else "sft"
    return {
        "method": method,
        "hyperparameters": {
            "noise_length": config.noise_length,
            "noise_fraction": config.noise_fraction,
            "noise_kind": config.noise_kind,
            "learning_rate": config.learning_rate,
            "max_steps": config.max_steps,
            "per_device_train_batch_size": config.per_device_train_batch_size,
        },
        "data": f"{args.dataset} (scope={args.scope})" if args.dataset == "python" else args.dataset,
        "results": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
