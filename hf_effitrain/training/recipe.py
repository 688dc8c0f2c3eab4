"""`effitrain recipe`: the four methods composed in one pipeline, every stage resumable.

tokenizer -> patch-level pre-training of a small and a large model -> Make-Some-Noise fine-tuning of the small one
-> cascade-aware fine-tuning of the small one against the large one -> evaluation -> export of the small model
(default strategy `tr_jacobi`) and of the cascade (default strategy `speculative_cascade`).

Each stage is the package's own job function (`run_pretrain`, `run_sft`, `run_cascade_train`) with its output under
`output_dir/<stage>/`; a finished stage leaves `stage.json` (its arguments and measured figures) and is skipped on
the next run, an interrupted one resumes from its newest complete Trainer checkpoint. Both exports' model cards
record every stage with its figures.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from hf_effitrain.training.resume import last_complete_checkpoint

from .callbacks import TimeBudgetCallback

logger = logging.getLogger(__name__)

STAGES = ("pretrain_small", "pretrain_large", "msn_small", "cat_small", "evaluate", "export")
SMALL_ARCHITECTURES = ("llama", "ode_shared")

# Sizes of the pipeline. `tiny` finishes in about 15 minutes on 2 CPU cores; `gpu` is sized for one H100 / H200
# (about 34M / 126M parameters, ~25 minutes). Steps are optimizer steps; a stage also stops at its share of the
# time budget.
RECIPE_SIZES: dict[str, dict[str, Any]] = {
    "micro": dict(  # tests: about a minute on 2 CPU cores
        small_preset="tiny",
        small_overrides=None,
        large_preset="tiny",
        large_overrides="hidden_size=64,intermediate_size=128",
        max_files=300,
        vocab_size=512,
        block_size=64,
        batch_size=8,
        pretrain_steps=8,
        sft_steps=4,
        cat_steps=4,
        learning_rate=3e-3,
        eval_prompts=2,
        max_new_tokens=8,
        time_budget_s=600.0,
    ),
    "tiny": dict(  # the whole stdlib scope: a smaller subset leaves too few held-out functions to evaluate on
        small_preset="tiny",
        small_overrides="hidden_size=64,intermediate_size=176,num_attention_heads=4,num_key_value_heads=4",
        large_preset="mini",
        large_overrides="num_hidden_layers=2",
        max_files=None,
        vocab_size=2048,
        block_size=128,
        batch_size=16,
        pretrain_steps=500,
        sft_steps=150,
        cat_steps=150,
        learning_rate=3e-3,
        eval_prompts=16,
        max_new_tokens=48,
        time_budget_s=780.0,
    ),
    "gpu": dict(
        small_preset="small",
        small_overrides="num_hidden_layers=8",
        large_preset="base",
        large_overrides=None,
        max_files=None,
        vocab_size=8192,
        block_size=512,
        batch_size=32,
        pretrain_steps=4000,
        sft_steps=800,
        cat_steps=800,
        learning_rate=1e-3,
        eval_prompts=64,
        max_new_tokens=128,
        time_budget_s=1500.0,
    ),
}
# Share of the time budget each training stage may use (the rest is evaluation and exports).
_TIME_SHARES = {"pretrain_small": 0.25, "pretrain_large": 0.35, "msn_small": 0.12, "cat_small": 0.12}


@dataclass
class RecipeArguments:
    """Options of `effitrain recipe`.

    Args:
        output_dir (`str`, *optional*, defaults to `"runs/recipe"`): one sub-folder per stage, `export/small` and
            `export/cascade`, `summary.json`.
        size (`str`, *optional*, defaults to `"tiny"`): one of `RECIPE_SIZES` (models, steps, prompts, budget).
        small_architecture (`str`, *optional*, defaults to `"llama"`): `llama` or `ode_shared` (pre-trained at patch
            level too, evaluated with half the solver steps as well).
        scope (`str`, *optional*, defaults to `"stdlib"`): Python source corpus scope: stdlib, site or all.
        max_files (`int`, *optional*): corpus files (default: the size's).
        time_budget_s (`float`, *optional*): wall-clock budget of the training stages (default: the size's); each
            stage stops at its share and saves.
        patch_size / patch_fraction: patch-level pre-training settings (the paper's K=4, lambda=2/3).
        noise_length (`int`, *optional*, defaults to 5): MSN noise segment length.
        resume (`bool`, *optional*, defaults to `True`): skip finished stages and resume interrupted ones.
    """

    output_dir: str = field(default="runs/recipe", metadata={"help": "Folder of the stages, exports and summary."})
    size: str = field(default="tiny", metadata={"help": f"Pipeline size: one of {sorted(RECIPE_SIZES)}."})
    small_architecture: str = field(
        default="llama", metadata={"help": f"Small model: one of {list(SMALL_ARCHITECTURES)}."}
    )
    scope: str = field(default="stdlib", metadata={"help": "Python source corpus scope: stdlib, site or all."})
    max_files: int | None = field(default=None, metadata={"help": "Corpus files (default: the size's)."})
    time_budget_s: float | None = field(
        default=None, metadata={"help": "Wall-clock budget of the training stages (default: the size's)."}
    )
    patch_size: int = field(default=4, metadata={"help": "K of patch-level pre-training."})
    patch_fraction: float = field(
        default=2 / 3, metadata={"help": "lambda: share of pre-training tokens at patch level."}
    )
    noise_length: int = field(default=5, metadata={"help": "MSN noise segment length (0: plain SFT)."})
    resume: bool = field(
        default=True,
        metadata={"help": "Skip finished stages and resume interrupted ones (--resume false starts over)."},
    )

    def __post_init__(self) -> None:
        if self.size not in RECIPE_SIZES:
            raise ValueError(f"Unknown size {self.size!r}; valid sizes are {sorted(RECIPE_SIZES)}.")
        if self.small_architecture not in SMALL_ARCHITECTURES:
            raise ValueError(
                f"Unknown small_architecture {self.small_architecture!r}; valid ones are {list(SMALL_ARCHITECTURES)}."
            )
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}.")
        if self.max_files is not None and self.max_files < 1:
            raise ValueError(f"max_files must be >= 1 or unset, got {self.max_files}.")
        if self.noise_length < 0:
            raise ValueError(f"noise_length must be >= 0, got {self.noise_length}.")

    def settings(self) -> dict[str, Any]:
        """The size's settings with this run's overrides applied."""
        settings = dict(RECIPE_SIZES[self.size])
        for name in ("max_files", "time_budget_s"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        return settings


def _common_training_kwargs(stage_dir: Path, steps: int, settings: dict[str, Any]) -> dict[str, Any]:
    return dict(
        output_dir=str(stage_dir / "checkpoints"),
        resume_from_checkpoint=last_complete_checkpoint(stage_dir / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        logging_steps=max(1, steps // 10),
        save_steps=max(1, steps // 4),
        save_total_limit=1,
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
    )


def _pretrain_stage(
    args: RecipeArguments, settings: dict, stage_dir: Path, which: str, tokenizer_dir: str | None
) -> dict:
    from hf_effitrain.methods.patch.config import PatchTrainingArguments
    from hf_effitrain.methods.patch.job import PretrainArguments, run_pretrain

    architecture = args.small_architecture if which == "small" else "llama"
    pretrain_args = PretrainArguments(
        preset=settings[f"{which}_preset"],
        architecture=architecture,
        config_overrides=settings[f"{which}_overrides"],
        scope=args.scope,
        max_files=settings["max_files"],
        tokenizer=tokenizer_dir,
        vocab_size=settings["vocab_size"],
        block_size=settings["block_size"],
        max_eval_blocks=64,
        export_dir=str(stage_dir / "export"),
        overwrite_export=True,
    )
    seconds = settings["time_budget_s"] * _TIME_SHARES[f"pretrain_{which}"]
    training_args = PatchTrainingArguments(
        patch_size=args.patch_size,
        patch_fraction=args.patch_fraction,
        **_common_training_kwargs(stage_dir, settings["pretrain_steps"], settings),
    )
    run = run_pretrain(pretrain_args, training_args, callbacks=(TimeBudgetCallback(seconds),))
    k, fraction = args.patch_size, args.patch_fraction
    return {
        "model": run["export_dir"],
        "parameters": run["parameters"],
        "optimizer_steps": run["global_step"],
        "tokens_seen": run["tokens_seen"],
        "eval_loss": run["metrics"].get("eval_loss"),
        # compute relative to token-level training on the same tokens: lambda / K + (1 - lambda)
        "relative_compute": fraction / k + (1 - fraction),
    }


def _msn_stage(args: RecipeArguments, settings: dict, stage_dir: Path, small_dir: str) -> dict:
    from hf_effitrain.methods.msn.config import NoisySFTConfig
    from hf_effitrain.methods.msn.job import SftArguments, run_sft

    seconds = settings["time_budget_s"] * _TIME_SHARES["msn_small"]
    sft_args = SftArguments(
        model=small_dir,
        dataset="python",
        scope=args.scope,
        max_files=settings["max_files"],
        max_eval_samples=64,
        export_dir=str(stage_dir / "export"),
        overwrite_export=True,
    )
    config = NoisySFTConfig(
        noise_length=args.noise_length,
        max_length=settings["block_size"] * 2,
        **_common_training_kwargs(stage_dir, settings["sft_steps"], settings),
    )
    run = run_sft(sft_args, config, callbacks=(TimeBudgetCallback(seconds),))
    return {
        "model": run["export_dir"],
        "noise_length": args.noise_length,
        "optimizer_steps": run["global_step"],
        "eval_loss": run["metrics"].get("eval_loss"),
    }


def _cat_stage(args: RecipeArguments, settings: dict, stage_dir: Path, small_dir: str, large_dir: str) -> dict:
    from hf_effitrain.methods.cascade.config import CascadeAwareTrainingArguments
    from hf_effitrain.methods.cascade.job import CascadeDataArguments, CascadeModelArguments, run_cascade_train

    seconds = settings["time_budget_s"] * _TIME_SHARES["cat_small"]
    model_args = CascadeModelArguments(small_model=small_dir, large_model=large_dir, deferral="token")
    data_args = CascadeDataArguments(
        scope=args.scope, max_files=settings["max_files"], block_size=settings["block_size"], max_eval_blocks=64
    )
    training_args = CascadeAwareTrainingArguments(**_common_training_kwargs(stage_dir, settings["cat_steps"], settings))
    run = run_cascade_train(model_args, data_args, training_args, callbacks=(TimeBudgetCallback(seconds),))
    return {
        "model": training_args.output_dir,
        "optimizer_steps": run["global_step"],
        "loss_weights": run["loss_weights"],
        "eval_loss": run["metrics"].get("eval_loss"),
    }


def _load(path: str):
    from hf_effitrain.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, use_safetensors=True).eval()
    return model, load_tokenizer(path)


def _evaluate_stage(args: RecipeArguments, settings: dict, stages: dict[str, dict]) -> dict:
    from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM

    from .recipe_eval import cascade_quality_and_cost, decoding_speed, held_out_prompts, validation_losses

    small, tokenizer = _load(stages["cat_small"]["model"])
    large, _ = _load(stages["pretrain_large"]["model"])
    models = {stage: _load(stages[stage]["model"])[0] for stage in ("pretrain_small", "msn_small")}
    models.update(cat_small=small, pretrain_large=large)
    losses = validation_losses(models, tokenizer, args.scope, settings["max_files"], settings["block_size"])
    prompts = held_out_prompts(args.scope, settings["max_files"], settings["eval_prompts"])
    extra = None
    if args.small_architecture == "ode_shared":  # the ODE view: the same model integrated with half the steps
        half = max(1, small.config.num_steps // 2) if isinstance(small.config.num_steps, int) else None
        extra = {f"greedy_{half}_steps": {"num_steps": half}} if half else None
    decoding = decoding_speed(small, tokenizer, prompts, settings["max_new_tokens"], extra)
    cascade = CascadeForCausalLM.from_models(small, large, deferral="token")
    cascade_results = cascade_quality_and_cost(cascade, tokenizer, prompts, settings["max_new_tokens"])
    return {"validation_loss": losses, "decoding": decoding, "cascade": cascade_results}


def _card_results(stages: dict[str, dict]) -> dict[str, float]:
    """Every stage's measured numbers as flat `stage.figure` entries of the model cards."""
    results: dict[str, float] = {}
    for stage, summary in stages.items():
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results[f"{stage}.{key}"] = round(float(value), 4)
    for stage, loss in stages.get("evaluate", {}).get("validation_loss", {}).items():
        results[f"{stage}.heldout_loss"] = round(loss, 4)
    for method, row in stages.get("evaluate", {}).get("decoding", {}).get("methods", {}).items():
        results[f"decoding.{method}.tokens_per_second"] = round(row["tokens_per_second"], 2)
        results[f"decoding.{method}.tokens_per_forward"] = round(row["tokens_per_forward"], 3)
    for strategy, row in stages.get("evaluate", {}).get("cascade", {}).items():
        for key in ("agreement_with_large", "small_token_share", "time_vs_large"):
            if key in row:
                results[f"cascade.{strategy}.{key}"] = round(row[key], 4)
    return results


def _export_stage(args: RecipeArguments, stages: dict[str, dict], export_root: Path) -> dict:
    from hf_effitrain.export import export_pretrained
    from hf_effitrain.hub.generation_jacobi import add_strategy_defaults
    from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM

    small, tokenizer = _load(stages["cat_small"]["model"])
    large, _ = _load(stages["pretrain_large"]["model"])
    card = {
        "method": "recipe (patch-level pre-training -> MSN fine-tuning -> cascade-aware fine-tuning)",
        "hyperparameters": {
            "size": args.size,
            "patch_size": args.patch_size,
            "patch_fraction": round(args.patch_fraction, 4),
            "noise_length": args.noise_length,
            "small_architecture": args.small_architecture,
        },
        "data": f"corpus=python scope={args.scope}",
        "results": _card_results(stages),
    }
    small.generation_config.strategy = "tr_jacobi"
    add_strategy_defaults(small.generation_config)
    small_dir = export_pretrained(small, export_root / "small", tokenizer=tokenizer, model_card=card, overwrite=True)
    cascade = CascadeForCausalLM.from_models(small, large, deferral="token")
    cascade.generation_config.strategy = "speculative_cascade"
    cascade_dir = export_pretrained(
        cascade, export_root / "cascade", tokenizer=tokenizer, model_card=card, overwrite=True
    )
    return {"small": str(small_dir), "cascade": str(cascade_dir)}


def _stage_record(stage_dir: Path) -> dict | None:
    path = stage_dir / "stage.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_same_arguments(record: dict, args: RecipeArguments, stage: str) -> None:
    """A finished stage is reused only by a run with the same arguments and size settings (else its figures would
    describe another run)."""
    recorded = {**record["arguments"], **record.get("settings", {})}
    current = {**asdict(args), **args.settings()}
    differing = sorted(
        key for key, value in current.items() if key not in ("resume", "output_dir") and recorded.get(key) != value
    )
    if differing:
        raise ValueError(
            f"Stage {stage!r} in {args.output_dir!r} was run with other arguments ({', '.join(differing)}); pass "
            "--resume false to start over, or use another --output_dir."
        )


def run_recipe(args: RecipeArguments) -> dict[str, Any]:
    """Run (or resume) every stage in order; returns the summary (also written to `output_dir/summary.json`)."""
    settings = args.settings()
    root = Path(args.output_dir)
    if not args.resume and root.exists():
        shutil.rmtree(root)
    stages: dict[str, dict] = {}
    jobs = {
        "pretrain_small": lambda d: _pretrain_stage(args, settings, d, "small", None),
        "pretrain_large": lambda d: _pretrain_stage(args, settings, d, "large", stages["pretrain_small"]["model"]),
        "msn_small": lambda d: _msn_stage(args, settings, d, stages["pretrain_small"]["model"]),
        "cat_small": lambda d: _cat_stage(
            args, settings, d, stages["msn_small"]["model"], stages["pretrain_large"]["model"]
        ),
        "evaluate": lambda d: _evaluate_stage(args, settings, stages),
        "export": lambda d: _export_stage(args, stages, root / "export"),
    }
    for stage in STAGES:
        stage_dir = root / stage
        record = _stage_record(stage_dir)
        if record is not None:
            _check_same_arguments(record, args, stage)
            logger.info("recipe: stage %s already done, reusing %s", stage, stage_dir / "stage.json")
        else:
            logger.info("recipe: running stage %s", stage)
            started = time.perf_counter()
            result = jobs[stage](stage_dir)
            record = {
                "arguments": asdict(args),
                "settings": settings,
                "seconds": round(time.perf_counter() - started, 1),
                "result": result,
            }
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / "stage.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        stages[stage] = record["result"]
    summary = {"arguments": asdict(args), "settings": settings, "stages": stages, "table": summary_table(stages)}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary


def summary_table(stages: dict[str, dict]) -> str:
    """A Markdown table of the run: each stage's validation loss, decoding speed, the cascade strategies."""
    lines = ["| stage / measure | value |", "|---|---|"]
    evaluation = stages.get("evaluate", {})
    for stage, loss in evaluation.get("validation_loss", {}).items():
        compute = stages.get(stage, {}).get("relative_compute")
        extra = f" (pre-training compute {compute:.2f}x of token-level)" if compute is not None else ""
        lines.append(f"| {stage}: held-out causal-LM loss | {loss:.3f}{extra} |")
    for method, row in evaluation.get("decoding", {}).get("methods", {}).items():
        lines.append(
            f"| decode {method} | {row['tokens_per_second']:.1f} tokens/s ({row['speedup_vs_greedy']:.2f}x greedy), "
            f"{row['tokens_per_forward']:.2f} tokens/forward, {row['equal_to_greedy']}/{evaluation['decoding']['prompts']} equal to greedy |"
        )
    for strategy, row in evaluation.get("cascade", {}).items():
        lines.append(
            f"| cascade {strategy} | agreement with large {row['agreement_with_large']:.3f}, small share "
            f"{row['small_token_share']:.3f}, time {row.get('time_vs_large', 1.0):.2f}x large |"
        )
    return "\n".join(lines)
