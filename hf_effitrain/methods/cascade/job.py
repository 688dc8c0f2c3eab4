"""The jobs behind `effitrain cascade-train` and `effitrain cascade-eval`."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, PreTrainedModel

from hf_effitrain.data.tokenizer import load_tokenizer
from hf_effitrain.hub.configuration_cascade import DEFERRAL_LEVELS, DEFERRAL_RULES
from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM

from .curves import METRICS, deferral_curve, summarize_curves
from .plotting import plot_deferral_curves

logger = logging.getLogger(__name__)


@dataclass
class CascadeDataArguments:
    """Corpus options shared by `cascade-train` and `cascade-eval` (see `hf_effitrain.data.load_corpus`)."""

    corpus: str = field(
        default="python",
        metadata={
            "help": "'python' (this interpreter's source), a local text/jsonl file or folder, or a datasets name."
        },
    )
    scope: str = field(default="stdlib", metadata={"help": "For --corpus python: stdlib, site or all."})
    text_column: str = field(default="text", metadata={"help": "Text column of jsonl / datasets corpora."})
    max_files: int | None = field(
        default=None, metadata={"help": "Use at most this many corpus files (deterministic)."}
    )
    validation_fraction: float = field(
        default=0.01, metadata={"help": "Share of documents hashed into the validation split (and into test)."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training / evaluation block."})
    max_eval_blocks: int | None = field(default=256, metadata={"help": "Validation blocks used for evaluation."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization (datasets.map)."})


@dataclass
class CascadeModelArguments:
    """The two members: checkpoint folders (any causal LM) and the tokenizer they share."""

    small_model: str | None = field(default=None, metadata={"help": "Checkpoint folder of the small model."})
    large_model: str | None = field(default=None, metadata={"help": "Checkpoint folder of the large model."})
    cascade: str | None = field(
        default=None,
        metadata={"help": "A saved CascadeForCausalLM whose members are used instead of --small_model/--large_model."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder; default: the small model's folder."}
    )
    deferral: str = field(default="sequence", metadata={"help": f"Deferral level: one of {DEFERRAL_LEVELS}."})
    rule: str = field(default="chow_average", metadata={"help": f"Sequence deferral rule: one of {DEFERRAL_RULES}."})
    threshold: float = field(default=-1.0, metadata={"help": "Defer when the score is below it (<= 0, inf or -inf)."})
    quantile: float = field(default=0.0, metadata={"help": "Alpha of chow_quantile."})

    def __post_init__(self) -> None:
        """Checkpoint folders must exist and hold safetensors weights: checked before any data work."""
        from hf_effitrain.export import require_safetensors

        for name in ("small_model", "large_model", "cascade"):
            folder = getattr(self, name)
            if folder is not None:
                try:
                    require_safetensors(folder)
                except ValueError as error:
                    raise ValueError(f"--{name}: {error}") from None


def load_members(args: CascadeModelArguments) -> tuple[PreTrainedModel, PreTrainedModel, Any]:
    """Small model, large model and tokenizer from the command-line folders."""
    if args.cascade:
        cascade = AutoModelForCausalLM.from_pretrained(args.cascade, trust_remote_code=True, use_safetensors=True)
        tokenizer = load_tokenizer(args.tokenizer or args.cascade)
        return cascade.small, cascade.large, tokenizer
    if not args.small_model or not args.large_model:
        raise ValueError("Give --small_model and --large_model (checkpoint folders), or --cascade.")
    small = AutoModelForCausalLM.from_pretrained(args.small_model, trust_remote_code=True, use_safetensors=True)
    large = AutoModelForCausalLM.from_pretrained(args.large_model, trust_remote_code=True, use_safetensors=True)
    tokenizer = load_tokenizer(args.tokenizer or args.small_model)
    return small, large, tokenizer


def _split_kwargs(data_args: CascadeDataArguments) -> dict[str, Any]:
    """Corpus selection shared by the packed text and the prompt / completion pairs, so their splits agree."""
    return dict(
        scope=data_args.scope,
        max_files=data_args.max_files,
        validation_fraction=data_args.validation_fraction,
        test_fraction=data_args.validation_fraction,
    )


def packed_splits(data_args: CascadeDataArguments, tokenizer, splits=("train", "validation")):
    """The corpus splits packed into `block_size` blocks (validation capped at `max_eval_blocks`)."""
    from hf_effitrain.data import load_corpus, pack_dataset

    corpus = load_corpus(data_args.corpus, text_column=data_args.text_column, **_split_kwargs(data_args))
    out = {}
    for split in splits:
        packed = pack_dataset(
            corpus[split],
            tokenizer,
            data_args.block_size,
            num_proc=data_args.num_proc,
            text_column=data_args.text_column,
        )
        if split != "train" and data_args.max_eval_blocks is not None and len(packed) > data_args.max_eval_blocks:
            packed = packed.select(range(data_args.max_eval_blocks))
        out[split] = packed
    return out


@dataclass
class CascadeExportArguments:
    """Where `cascade-train` exports the cascade built around the trained small model.

    Args:
        export_dir (`str`, *optional*): the export folder; default `<output_dir>/cascade`.
        overwrite_export (`bool`, *optional*, defaults to `False`): allow a non-empty `export_dir` (checked before
            training). The default folder belongs to the run and is rewritten when a resumed run finishes.
    """

    export_dir: str | None = field(
        default=None, metadata={"help": "Export the cascade Hub-ready here (default: <output_dir>/cascade)."}
    )
    overwrite_export: bool = field(default=False, metadata={"help": "Allow --export_dir to be a non-empty folder."})

    def __post_init__(self) -> None:
        from hf_effitrain.export import check_export_dir

        if self.export_dir:
            check_export_dir(self.export_dir, self.overwrite_export, "--overwrite_export")


def run_cascade_train(
    model_args: CascadeModelArguments,
    data_args: CascadeDataArguments,
    training_args,
    callbacks: tuple = (),
    export_args: CascadeExportArguments | None = None,
) -> dict[str, Any]:
    """Fine-tune the small model with the cascade-aware loss, save it (safetensors) and export the resulting cascade
    (model card, `custom_generate/`); `callbacks` are extra `TrainerCallback`s (e.g. a time budget)."""
    from hf_effitrain.methods.cascade.trainer import CascadeAwareTrainer
    from hf_effitrain.training.runner import ExportPlan, run_training_job

    export_args = export_args or CascadeExportArguments()
    small, large, tokenizer = load_members(model_args)
    with training_args.main_process_first(desc="corpus and packing"):
        data = packed_splits(data_args, tokenizer)
    trainer = CascadeAwareTrainer(
        model=small,
        args=training_args,
        large_model=large,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if len(data["validation"]) else None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )

    def build_cascade(trained_small: PreTrainedModel) -> CascadeForCausalLM:
        return CascadeForCausalLM.from_models(
            trained_small,
            large,
            deferral=model_args.deferral,
            rule=model_args.rule,
            threshold=model_args.threshold,
            quantile=model_args.quantile,
        )

    export_dir = export_args.export_dir or Path(training_args.output_dir) / "cascade"
    plan = ExportPlan(
        export_dir,
        tokenizer,
        model_card=lambda metrics: cascade_model_card(model_args, data_args, training_args, metrics),
        overwrite=export_args.overwrite_export or export_args.export_dir is None,
        model_to_export=build_cascade,
    )
    summary = run_training_job(trainer, plan)
    summary["cascade_dir"] = summary.pop("export_dir", str(export_dir))
    summary["loss_weights"] = asdict(training_args.cascade_loss_weights)
    return summary


def cascade_model_card(
    model_args: CascadeModelArguments, data_args: CascadeDataArguments, training_args, metrics: dict
) -> dict:
    """Model card fields of a cascade export: the deferral settings, the CAT loss weights and the final metrics."""
    return {
        "method": "cascade-aware training (CAT) of the small model (hf_effitrain cascade-train)",
        "hyperparameters": {
            "deferral": model_args.deferral,
            "rule": model_args.rule,
            "threshold": model_args.threshold,
            "cascade_preset": training_args.cascade_preset,
            **asdict(training_args.cascade_loss_weights),
            "learning_rate": training_args.learning_rate,
            "max_steps": training_args.max_steps,
        },
        "data": f"corpus={data_args.corpus} scope={data_args.scope} max_files={data_args.max_files}",
        "results": {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
    }


EVAL_SPLITS = ("validation", "test")


@dataclass
class CascadeEvalArguments:
    """What `cascade-eval` measures and where it writes the JSON and PNG."""

    metric: str = field(default="token_accuracy", metadata={"help": f"Quality measure: one of {METRICS}."})
    split: str = field(default="validation", metadata={"help": "Corpus split evaluated: validation or test."})
    num_points: int = field(default=21, metadata={"help": "Thresholds swept between the end points."})
    batch_size: int = field(default=8, metadata={"help": "Evaluation batch size."})
    max_examples: int | None = field(
        default=64, metadata={"help": "exact_match: at most this many prompt/completion pairs."}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "exact_match: decoding budget (default: the reference length)."}
    )
    output_dir: str = field(
        default="cascade_eval", metadata={"help": "Folder for deferral_curve.json and deferral_curve.png."}
    )
    decoded_prompts: int = field(
        default=0,
        metadata={
            "help": "Also decode this many held-out blocks (batch 1, greedy) with every strategy: sequence / token cascades, "
            "speculative cascades (chow, diff, opt) and speculative decoding; writes decoded_curves.json / .png. 0: skip."
        },
    )
    decoded_prompt_len: int = field(
        default=32, metadata={"help": "Decoded curves: prompt tokens taken from each block."}
    )
    decoded_new_tokens: int = field(
        default=32, metadata={"help": "Decoded curves: tokens decoded and compared with the block's next tokens."}
    )
    cascade_draft_len: int = field(
        default=4, metadata={"help": "Decoded curves: small-model drafts per large forward (speculative strategies)."}
    )

    def __post_init__(self) -> None:
        for name in ("decoded_prompt_len", "decoded_new_tokens", "cascade_draft_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.decoded_prompts < 0:
            raise ValueError(f"decoded_prompts must be >= 0 (0 skips the decoded curves), got {self.decoded_prompts}.")
        if self.metric not in METRICS:
            raise ValueError(f"Unknown metric {self.metric!r}; valid metrics are {list(METRICS)}.")
        if self.split not in EVAL_SPLITS:
            raise ValueError(f"Unknown split {self.split!r}; cascade-eval evaluates one of {list(EVAL_SPLITS)}.")
        if self.num_points < 2:
            raise ValueError(f"num_points must be >= 2 (the two end points), got {self.num_points}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        for name in ("max_examples", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {value}.")


def run_cascade_eval(
    model_args: CascadeModelArguments, data_args: CascadeDataArguments, eval_args: CascadeEvalArguments
) -> dict[str, Any]:
    """Deferral curve of the cascade on the chosen split; writes JSON + PNG and returns the summary."""
    small, large, tokenizer = load_members(model_args)
    cascade = CascadeForCausalLM.from_models(
        small,
        large,
        deferral=model_args.deferral,
        rule=model_args.rule,
        threshold=model_args.threshold,
        quantile=model_args.quantile,
    )
    if eval_args.metric == "exact_match":
        from hf_effitrain.data import build_code_sft_dataset

        pairs = build_code_sft_dataset(data_args.corpus, **_split_kwargs(data_args))[eval_args.split]
        if eval_args.max_examples is not None:
            pairs = pairs.select(range(min(eval_args.max_examples, len(pairs))))
        data = pairs
    else:
        data = packed_splits(data_args, tokenizer, splits=(eval_args.split,))[eval_args.split]
    curve = deferral_curve(
        cascade,
        data,
        metric=eval_args.metric,
        tokenizer=tokenizer,
        num_points=eval_args.num_points,
        batch_size=eval_args.batch_size,
        max_new_tokens=eval_args.max_new_tokens,
    )
    out = Path(eval_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deferral_curve.json").write_text(json.dumps(curve.to_dict(), indent=2))
    plot_deferral_curves({"cascade": curve}, out / "deferral_curve.png")
    summary = {"output_dir": str(out), **summarize_curves({"cascade": curve})["cascade"]}
    if eval_args.decoded_prompts:
        summary["decoded"] = _decoded_eval(cascade, data_args, eval_args, tokenizer, out)
    return summary


def _decoded_eval(
    cascade, data_args: CascadeDataArguments, eval_args: CascadeEvalArguments, tokenizer, out: Path
) -> dict[str, Any]:
    """Decoded curves on the split's first blocks: prompt = the first tokens, reference = the next ones."""
    import torch

    from .decoding_curves import decoded_curves, plot_decoded_curves

    needed = eval_args.decoded_prompt_len + eval_args.decoded_new_tokens
    if needed > data_args.block_size:
        raise ValueError(
            f"decoded_prompt_len + decoded_new_tokens = {needed} exceeds block_size={data_args.block_size}: each prompt and its "
            "reference come from one held-out block."
        )
    blocks = packed_splits(data_args, tokenizer, splits=(eval_args.split,))[eval_args.split]
    rows = torch.tensor(blocks["input_ids"][: eval_args.decoded_prompts])
    if rows.numel() == 0:
        raise ValueError(f"The {eval_args.split} split has no blocks to decode.")
    result = decoded_curves(
        cascade,
        rows[:, : eval_args.decoded_prompt_len],
        rows[:, eval_args.decoded_prompt_len : needed],
        draft_len=eval_args.cascade_draft_len,
        num_points=min(eval_args.num_points, 9),
    )
    (out / "decoded_curves.json").write_text(json.dumps(result, indent=2))
    plot_decoded_curves({"cascade": result}, out / "decoded_curves.png")
    return {
        name: {"area": curve["area"], **result["at_large_minus_1pct"][name]} for name, curve in result["curves"].items()
    }


__all__ = [
    "CascadeDataArguments",
    "CascadeEvalArguments",
    "CascadeExportArguments",
    "CascadeModelArguments",
    "EVAL_SPLITS",
    "load_members",
    "packed_splits",
    "run_cascade_eval",
    "run_cascade_train",
]
