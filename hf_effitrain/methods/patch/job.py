"""Pre-training of any causal LM on a corpus with the stock `Trainer`: the job behind `effitrain pretrain`.

The model and data choices live in `PretrainArguments`; every `TrainingArguments` field comes from the command line
through `HfArgumentParser`, so a user who knows `run_clm.py` knows this command.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import set_seed

from hf_effitrain.models.presets import (
    PRESETS,
    build_config,
    build_model,
    parse_config_overrides,
    supported_architectures,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainArguments:
    """Model and data options of `effitrain pretrain` (training options are `TrainingArguments`).

    Args:
        preset (`str`, *optional*, defaults to `"small"`): model size, one of `PRESETS`.
        architecture (`str`, *optional*, defaults to `"llama"`): llama, qwen2, mistral, gpt2 or ode_shared.
        config_overrides (`str`, *optional*): comma-separated `key=value` config fields, e.g. `"num_steps=4"`.
        init_from (`str`, *optional*): a checkpoint folder to continue from instead of a fresh model; with
            `architecture="ode_shared"` and a Llama checkpoint, the ODE-shared model started from it
            (`ode_shared_from_llama`, with `config_overrides` such as `num_pre_layers=1,num_post_layers=1`).
        corpus (`str`, *optional*, defaults to `"python"`): `python` (this interpreter's source), a local
            text / jsonl file or folder, or a `datasets` dataset name.
        scope (`str`, *optional*, defaults to `"stdlib"`): for `corpus="python"`: stdlib, site or all.
        max_files (`int`, *optional*): cap on corpus files, taken deterministically.
        tokenizer (`str`, *optional*): an existing tokenizer folder; default trains a byte-level BPE on the corpus.
        vocab_size (`int`, *optional*, defaults to 8192): size of the trained tokenizer (ignored with `tokenizer`).
        block_size (`int`, *optional*, defaults to 512): tokens per training sequence.
        max_eval_blocks (`int`, *optional*, defaults to 256): validation blocks used for eval loss.
        export_dir (`str`, *optional*): export the final model Hub-ready there (`export_pretrained`).
        overwrite_export (`bool`, *optional*, defaults to `False`): allow a non-empty `export_dir` (checked before
            training, so a long run does not end in an error).
    """

    # model
    preset: str = field(default="small", metadata={"help": f"Model size preset: one of {sorted(PRESETS)}."})
    architecture: str = field(
        default="llama",
        metadata={"aliases": ["--model"], "help": "Architecture: llama, qwen2, mistral, gpt2 or ode_shared."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated key=value config fields, e.g. 'num_steps=4,solver=heun'."}
    )
    init_from: str | None = field(default=None, metadata={"help": "Checkpoint folder to continue training from."})
    # data
    corpus: str = field(
        default="python",
        metadata={
            "help": "'python' (this interpreter's source code), a local text/jsonl file or folder, or a datasets name."
        },
    )
    scope: str = field(default="stdlib", metadata={"help": "For --corpus python: stdlib, site or all."})
    text_column: str = field(default="text", metadata={"help": "Text column of jsonl / datasets corpora."})
    max_files: int | None = field(
        default=None, metadata={"help": "Use at most this many corpus files (deterministic)."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Existing tokenizer folder; default: train a BPE."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size of the trained BPE tokenizer."})
    block_size: int = field(default=512, metadata={"help": "Tokens per training sequence."})
    max_eval_blocks: int | None = field(default=256, metadata={"help": "Validation blocks used for the eval loss."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization (datasets.map)."})
    export_dir: str | None = field(default=None, metadata={"help": "Export the final model Hub-ready to this folder."})
    overwrite_export: bool = field(default=False, metadata={"help": "Allow --export_dir to be a non-empty folder."})

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}; valid presets are {sorted(PRESETS)}.")
        if self.architecture not in supported_architectures():
            raise ValueError(
                f"Unknown architecture {self.architecture!r}; valid architectures are {supported_architectures()}."
            )
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}.")
        if self.max_eval_blocks is not None and self.max_eval_blocks < 1:
            raise ValueError(f"max_eval_blocks must be >= 1 or None, got {self.max_eval_blocks}.")
        from hf_effitrain.export import check_export_dir, require_safetensors

        if self.export_dir:
            check_export_dir(self.export_dir, self.overwrite_export, "--overwrite_export")
        if self.init_from:
            require_safetensors(self.init_from)
            if self.config_overrides and not self.converts_to_ode():
                raise ValueError(
                    f"config_overrides {self.config_overrides!r} cannot change the init_from checkpoint "
                    f"{self.init_from!r}: its config.json defines the model (--preset is ignored too; only "
                    "--architecture ode_shared from a Llama checkpoint converts it, taking the conversion's overrides)."
                )
        if self.converts_to_ode() and self.config_overrides:  # a typo or a bad type fails now, not after the corpus
            from hf_effitrain.methods.ode.conversion import check_conversion_overrides

            check_conversion_overrides(parse_config_overrides(self.config_overrides))
        if self.config_overrides and not self.init_from:  # checked now (a typo or a bad type), not after the corpus
            build_config(self.preset, self.architecture, **parse_config_overrides(self.config_overrides))
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise ValueError(
                f"tokenizer {self.tokenizer!r} is not a folder; give a saved tokenizer folder or leave it unset to train one."
            )

    def converts_to_ode(self) -> bool:
        """Whether the run starts an ODE-shared model from the `init_from` Llama checkpoint (`ode_shared_from_llama`)."""
        if not (self.init_from and self.architecture == "ode_shared"):
            return False
        config_file = Path(self.init_from, "config.json")
        return config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "llama"


class PerplexityCallback(TrainerCallback):
    """Adds `eval_perplexity = exp(eval_loss)` to the metrics that `evaluate()` returns."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))


def load_or_train_tokenizer(args: PretrainArguments, corpus) -> PreTrainedTokenizerBase:
    """The user's tokenizer folder if given, else the `init_from` checkpoint's own tokenizer (its ids are what the
    loaded embeddings mean), else a byte-level BPE trained (and cached) on the corpus."""
    from hf_effitrain.data import load_tokenizer, train_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if args.init_from and Path(args.init_from, "tokenizer.json").is_file():
        logger.info("Using the tokenizer of the init_from checkpoint %s (--vocab_size is ignored).", args.init_from)
        return load_tokenizer(args.init_from)
    return train_tokenizer(corpus, vocab_size=args.vocab_size)


def build_pretrain_model(args: PretrainArguments, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh model of the chosen preset sized for the tokenizer, the `init_from` checkpoint, or an ODE-shared model
    started from the `init_from` Llama (`--architecture ode_shared`; the overrides are the conversion's)."""
    if args.converts_to_ode():
        from hf_effitrain.methods.ode.conversion import ode_shared_from_llama

        llama = AutoModelForCausalLM.from_pretrained(args.init_from, use_safetensors=True)
        model = ode_shared_from_llama(llama, **parse_config_overrides(args.config_overrides))
        logger.info("Started an ODE-shared model from the Llama %s: %s", args.init_from, model.config.to_diff_dict())
    elif args.init_from:
        model = AutoModelForCausalLM.from_pretrained(args.init_from, trust_remote_code=True)
    else:
        config_kwargs = {
            "vocab_size": len(tokenizer),
            "max_position_embeddings": max(args.block_size, 1024),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **parse_config_overrides(args.config_overrides),
        }
        model = build_model(args.preset, args.architecture, **config_kwargs)
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > model_vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model {args.init_from!r} embeds only {model_vocab}; "
            "use the checkpoint's own tokenizer (--tokenizer) or a smaller --vocab_size."
        )
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions is not None and args.block_size > max_positions:
        raise ValueError(
            f"block_size {args.block_size} is larger than the model's max_position_embeddings {max_positions}; "
            f"use --block_size <= {max_positions}."
        )
    return model


def prepare_datasets(args: PretrainArguments, tokenizer: PreTrainedTokenizerBase, corpus):
    """Pack the train and validation splits into blocks of `block_size` tokens."""
    from hf_effitrain.data import pack_dataset

    train = pack_dataset(
        corpus["train"], tokenizer, args.block_size, num_proc=args.num_proc, text_column=args.text_column
    )
    validation = pack_dataset(
        corpus["validation"], tokenizer, args.block_size, num_proc=args.num_proc, text_column=args.text_column
    )
    if args.max_eval_blocks is not None and len(validation) > args.max_eval_blocks:
        validation = validation.select(range(args.max_eval_blocks))
    if len(train) == 0:
        raise ValueError(
            f"The training split holds fewer than block_size={args.block_size} tokens; lower --block_size."
        )
    return train, validation


def training_arguments_class() -> type[TrainingArguments]:
    """The `TrainingArguments` subclass that `effitrain pretrain` parses (it carries the patch-level options)."""
    from .config import PatchTrainingArguments

    return PatchTrainingArguments


def make_trainer(
    args: PretrainArguments, training_args: TrainingArguments, model, tokenizer, train, validation, callbacks=()
) -> Trainer:
    """The trainer for this run: `PatchTrainer` when the arguments ask for patch-level training, else `Trainer`."""
    from .config import PatchTrainingArguments
    from .trainer import PatchTrainer

    # with patch_size=1 / patch_fraction=0 (the defaults) PatchTrainer trains exactly like the stock Trainer, and it
    # logs tokens and FLOPs in both cases
    trainer_class = PatchTrainer if isinstance(training_args, PatchTrainingArguments) else Trainer
    return trainer_class(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation if len(validation) else None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[PerplexityCallback(), *callbacks],
    )


def run_pretrain(
    args: PretrainArguments, training_args: TrainingArguments, callbacks: tuple[TrainerCallback, ...] = ()
) -> dict[str, Any]:
    """Train, evaluate, save (safetensors) and optionally export; returns a summary of the run."""
    from hf_effitrain.data import corpus_stats, format_corpus_stats, load_corpus
    from hf_effitrain.training.runner import ExportPlan, run_training_job

    # Rank 0 builds and caches corpus, tokenizer and packed blocks; the other ranks then read the caches.
    with training_args.main_process_first(desc="corpus, tokenizer and packing"):
        corpus = load_corpus(args.corpus, scope=args.scope, text_column=args.text_column, max_files=args.max_files)
        tokenizer = load_or_train_tokenizer(args, corpus)
        train, validation = prepare_datasets(args, tokenizer, corpus)
    # Token counts come from the packed blocks: tokenizing the corpus a second time just to count would double the cost.
    stats = corpus_stats(corpus, text_column=args.text_column)
    stats["packed_tokens"] = {"train": len(train) * args.block_size, "validation": len(validation) * args.block_size}
    logger.info("Corpus: %s | packed train tokens %d", format_corpus_stats(stats), stats["packed_tokens"]["train"])
    set_seed(training_args.seed)  # the fresh model's initialisation follows --seed, as Trainer's model_init would
    model = build_pretrain_model(args, tokenizer)
    trainer = make_trainer(args, training_args, model, tokenizer, train, validation, callbacks)
    export = None
    if args.export_dir:
        export = ExportPlan(
            args.export_dir,
            tokenizer,
            model_card=lambda metrics: pretrain_model_card(model, args, training_args, metrics),
            overwrite=args.overwrite_export,
        )
    summary = run_training_job(trainer, export)
    summary.update(
        parameters=sum(p.numel() for p in model.parameters()), tokens_seen=_tokens_seen(trainer, args), corpus=stats
    )
    schedule = getattr(trainer, "patch_schedule", None)
    if schedule is not None and trainer.state.global_step > 0:
        step = trainer.state.global_step
        # compute of this run relative to token-level training on the same tokens (compute is per position)
        summary["patch_level"] = {
            "patch_size": schedule.patch_size,
            "patch_fraction": schedule.patch_fraction,
            "stage_reached": schedule.stage_after(step),
            "patch_steps": min(step, schedule.patch_steps),
            "relative_compute": schedule.positions_after(step) / schedule.tokens_after(step),
        }
    return summary


def _tokens_seen(trainer: Trainer, args: PretrainArguments) -> int:
    schedule = getattr(trainer, "patch_schedule", None)  # a patch-stage step consumes K blocks per sequence
    if schedule is not None:
        return schedule.tokens_after(trainer.state.global_step)
    return trainer.state.num_input_tokens_seen or trainer.state.global_step * _tokens_per_step(trainer, args)


def _tokens_per_step(trainer: Trainer, args: PretrainArguments) -> int:
    targs = trainer.args
    return targs.per_device_train_batch_size * targs.gradient_accumulation_steps * targs.world_size * args.block_size


def pretrain_model_card(model, args: PretrainArguments, training_args: TrainingArguments, metrics: dict) -> dict:
    """Model card fields of a pre-training export: how the model was trained and its final metrics."""
    patch = getattr(training_args, "patch_training_enabled", False)
    return {
        "method": "patch-level pre-training (hf_effitrain pretrain, Shao et al. 2024)"
        if patch
        else "pre-training (hf_effitrain pretrain)",
        "hyperparameters": {
            **(
                {
                    "patch_size": training_args.patch_size,
                    "patch_fraction": training_args.patch_fraction,
                    "patch_batching": training_args.patch_batching,
                    "patch_reset_optimizer": training_args.patch_reset_optimizer,
                }
                if patch
                else {}
            ),
            **({"init_from": args.init_from} if args.init_from else {"preset": args.preset}),
            "architecture": model.config.model_type,
            "block_size": args.block_size,
            "learning_rate": training_args.learning_rate,
            "max_steps": training_args.max_steps,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
        },
        "data": f"corpus={args.corpus} scope={args.scope} max_files={args.max_files}",
        "results": {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
    }
